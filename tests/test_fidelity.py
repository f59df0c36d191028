"""The fidelity report: how much of each expert a merge keeps on prompts it never trained on."""

import json
import shutil

import yaml

from mergekit_prodistill.inputs.calibration import sample_prompts

from helpers import merge


def test_held_out_prompts_are_never_trained_on_and_leave_training_unchanged():
    prompts = [f"prompt {i}" for i in range(40)]
    training, held = sample_prompts(prompts, 16, seed=3, holdout=4)
    assert len(held) == 4 and not set(held) & set(training)
    assert sample_prompts(prompts, 16, seed=3) == (training, [])  # the same training prompts
    assert sample_prompts(prompts, 16, seed=3, holdout=4) == (training, held)  # reproducible
    assert sample_prompts(prompts[:18], 16, seed=3, holdout=4)[1].__len__() == 2  # what is left
    assert sample_prompts(prompts[:10], 16, seed=3, holdout=4) == (prompts[:10], [])


def test_where_task_arithmetic_is_exact_both_keep_every_choice(families, tmp_path):
    # Two identical experts at init 0.5: task arithmetic is base + tau, the expert itself.
    fam = families("llama", 2)
    twin = tmp_path / "twin"
    shutil.copytree(fam.experts[0], twin)
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=2, shots=8, continue_tokens=4))
    (entry,) = [m for m in doc["models"] if m["model"] == str(fam.experts[1])]
    entry["model"] = str(twin)
    entry["parameters"]["calibration"] = str(fam.calibration[0])
    out = merge(yaml.safe_dump(doc, sort_keys=False), tmp_path / "out")
    kept = json.loads((out / "prodistill_report.json").read_text())["fidelity"]
    assert [k["prompts"] for k in kept] == [1, 1] and all(k["tokens"] > 0 for k in kept)
    for k in kept:
        for merge_name in ("prodistill", "task_arithmetic"):
            assert k[merge_name]["agreement"] == 1.0
            assert k[merge_name]["kl"] < 1e-6


def test_without_held_out_prompts_there_is_no_report(families, tmp_path):
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=1, shots=4, holdout=0, continue_tokens=0),
                tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert "fidelity" not in report
    assert "What the merge kept" not in (out / "README.md").read_text()


def test_on_experts_with_real_skills_prodistill_keeps_more_than_task_arithmetic(
        skill_family, tmp_path):
    from mergekit_prodistill.tiny.skills.quickstart import PRODISTILL_PARAMETERS

    out = merge(skill_family.recipe("prodistill", PRODISTILL_PARAMETERS), tmp_path / "out")
    kept = json.loads((out / "prodistill_report.json").read_text())["fidelity"]
    assert len(kept) == 3 and all(k["prompts"] == 4 for k in kept)  # 1/8 of 32 shots
    for k in kept:
        assert k["prodistill"]["agreement"] > k["task_arithmetic"]["agreement"], k
        assert k["prodistill"]["kl"] < k["task_arithmetic"]["kl"], k
