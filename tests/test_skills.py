"""The quick start's skill family has skills its scoring can see: each expert is far better
than the base at its own task, and scoring against the wrong answers finds nothing. The
table reports each merge's accuracy over the expert's, and its recipes validate."""

import yaml
from mergekit.config import MergeConfiguration
from transformers import AutoTokenizer

from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.tiny.skills import held_out_sets, score_model
from mergekit_prodistill.tiny.skills.quickstart import kept, plot, table, write_recipes


def test_the_base_is_fair_at_every_task_and_each_expert_masters_its_own(skill_family):
    # What the quick start says of its family: a base fair at every task (>= 35%: it adds
    # only sums below 1000, about 40% of the test sums), and experts that master theirs
    # (>= 95%), well above the base.
    tokenizer = AutoTokenizer.from_pretrained(skill_family.base)
    tests = held_out_sets(skill_family.settings)
    base = score_model(skill_family.base, tokenizer, tests)
    for task, path in skill_family.experts.items():
        expert = score_model(path, tokenizer, {task: tests[task]})[task]["exact"]
        assert expert >= 0.95, (task, expert)
        assert base[task]["exact"] >= 0.35, (task, base[task])
        assert base[task]["exact"] <= expert - 0.15, (task, base[task], expert)


def test_scoring_against_another_tasks_answers_finds_no_skill(skill_family):
    tokenizer = AutoTokenizer.from_pretrained(skill_family.base)
    rot = held_out_sets(skill_family.settings)["rot"]
    # The rot expert's prompts, graded with sort's answers to the same letters.
    graded_as_sort = [(p, "".join(sorted(p[len("rot:"):-1]))) for p, _ in rot]
    right = score_model(skill_family.experts["rot"], tokenizer, {"rot": rot})["rot"]
    wrong = score_model(skill_family.experts["rot"], tokenizer, {"rot": graded_as_sort})["rot"]
    assert right["exact"] >= 0.9 and wrong["exact"] <= 0.05


def test_the_quick_start_recipes_validate(skill_family, tmp_path):
    for method, path in write_recipes(skill_family, tmp_path).items():
        config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
        assert config.merge_method == method
        assert [str(m.model.model.path) for m in config.models] == [
            str(p) for p in skill_family.experts.values()]
    recipe = parse_recipe(MergeConfiguration.model_validate(
        yaml.safe_load((tmp_path / "prodistill.yml").read_text())))
    assert [str(e.params.calibration) for e in recipe.experts] == [
        str(p) for p in skill_family.calibration.values()]


def test_the_table_shows_the_share_of_each_experts_skill_kept(tmp_path):
    scores = {"base": {"rot": 0.1, "add": 0.3}, "expert": {"rot": 0.8, "add": 1.0},
              "task_arithmetic": {"rot": 0.4, "add": 0.5},
              "prodistill": {"rot": 0.8, "add": 0.9}}
    assert kept(scores, "task_arithmetic") == {"rot": 0.5, "add": 0.5}
    lines = table(scores).splitlines()
    assert lines[0].split() == ["task", "base", "expert", "task", "arithmetic", "(kept)",
                                "ProDistill", "(kept)"]
    assert lines[1].split() == ["rot", "10%", "80%", "40%", "(50%)", "80%", "(100%)"]
    assert lines[-1].split() == ["mean", "kept", "50%", "95%"]
    plot(scores, tmp_path / "skills.png")
    assert (tmp_path / "skills.png").read_bytes()[:4] == b"\x89PNG"
