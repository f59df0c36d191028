"""Inputs are data: nothing in a recipe or a prompt runs, nothing is written elsewhere."""

import json
import os

import yaml
from click.testing import CliRunner

from mergekit_prodistill import cli
from mergekit_prodistill.inputs.sources import read_prompts
from mergekit_prodistill.inputs.templates import apply_template, resolve_template

from helpers import BIN, run_cli

HOSTILE = [
    "{__import__('os').system('touch PWNED')}",
    "{prompt} {0.__class__} %(x)s ${HOME} $(touch PWNED) `touch PWNED`",
    "!!python/object/apply:os.system ['touch PWNED']",
    '{"text": "nested json"}',
]


def tree(root):
    """Every file under ``root`` with its size and modification time."""
    return {
        os.path.relpath(os.path.join(d, f), root): (os.path.getsize(os.path.join(d, f)),
                                                   os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(root) for f in files
    }


def test_prompts_are_text_not_code(tmp_path):
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in HOSTILE))
    assert read_prompts(str(path)) == HOSTILE
    plain = tmp_path / "hostile.txt"
    plain.write_text("\n".join(HOSTILE) + "\n")
    assert read_prompts(str(plain)) == HOSTILE
    for text in HOSTILE:
        filled = apply_template(resolve_template("alpaca"), text)
        assert filled.count(text) == 1 and filled.endswith("\n\n### Response:")
    assert not list(tmp_path.rglob("PWNED"))


def test_recipe_yaml_cannot_construct_objects(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: !!python/object/apply:os.system ['touch PWNED']\n")
    result = CliRunner().invoke(cli.main, [str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"mergekit-prodistill: error: {recipe} is not a valid mergekit "
                           "recipe: could not determine a constructor for the tag")
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("PWNED"))


def test_merge_writes_only_its_output_folder(families, tmp_path, monkeypatch):
    """A full run (vocabularies differing, so a tokenizer is built) touches nothing else."""
    fam = families("llama", 2, extra_tokens=((), ("[PAD]",)))
    work, home, tmp = (tmp_path / n for n in ("work", "home", "tmp"))
    for d in (work, home, tmp):
        d.mkdir()
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in HOSTILE))
    doc = yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=4, batch_size=4))
    doc["models"][1]["parameters"]["calibration"] = "prompts.jsonl"  # relative to the cwd
    (work / "recipe.yml").write_text(yaml.safe_dump(doc))
    inputs_before, work_before = tree(fam.root), tree(work)

    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    run_cli(BIN / "mergekit-prodistill", "recipe.yml", "merged", cwd=work)

    assert tree(fam.root) == inputs_before
    written = tree(work)
    assert {k: v for k, v in written.items() if not k.startswith("merged" + os.sep)} == work_before
    assert "merged/model.safetensors" in written and "merged/tokenizer.json" in written
    # matplotlib (the card's loss plot) keeps its own font cache, as it does for any user.
    home_written = {k for k in tree(home) if not k.startswith(".cache/matplotlib/")}
    assert home_written == set() and tree(tmp) == {}
    assert not list(tmp_path.rglob("PWNED"))
