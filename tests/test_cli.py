"""The commands a user runs, as subprocesses of the installed package."""

import json
import sys

import pytest
import transformers
import yaml

from helpers import BIN, run_cli


def test_mergekit_yaml_runs_prodistill_and_output_loads(families, tmp_path):
    fam = families("llama", 2)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epochs=2, lr=0.05, shots=8, batch_size=4))
    out = tmp_path / "merged"
    run_cli(BIN / "mergekit-yaml", recipe, out, "--out-shard-size", "40K", "--random-seed", "3")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not (out / ".prodistill-staging").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert {"mergekit", "merge", "prodistill"} <= set(meta["tags"])
    assert "### ProDistill" in card and "| block | loss before | loss after |" in card
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text()
    report = json.loads((out / "prodistill_report.json").read_text())
    assert report["seed"] == 3 and len(report["blocks"]) == 2 and report["peak_rss_bytes"] > 0

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("What is two plus three?", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_other_methods_still_run_through_mergekit(families, tmp_path):
    fam = families("llama", 2)
    recipe = tmp_path / "ties.yml"
    recipe.write_text(fam.recipe("ties", weight=0.5, density=0.5))
    run_cli(BIN / "mergekit-yaml", recipe, tmp_path / "ties")
    card = (tmp_path / "ties" / "README.md").read_text()
    assert "TIES" in card and "prodistill" not in card
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ties")


@pytest.mark.parametrize(
    "command", [[BIN / "mergekit-prodistill"], [sys.executable, "-m", "mergekit_prodistill"]]
)
def test_own_command_has_mergekit_flags_and_merges(families, tmp_path, command):
    help_text = run_cli(*command, "--help").stdout
    for flag in ("--cuda", "--device", "--out-shard-size", "--copy-tokenizer", "--random-seed", "--quiet"):
        assert flag in help_text
    fam = families("qwen3", 2)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epochs=1, shots=4))
    run_cli(*command, recipe, tmp_path / "out", "--quiet")
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-prodistill"])
def test_recipe_error_is_one_clear_line_and_writes_nothing(families, tmp_path, command):
    fam = families("llama", 2)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epoch=3))
    out = tmp_path / "out"
    proc = run_cli(BIN / command, recipe, out, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "mergekit-prodistill: error: recipe parameters: unknown parameter 'epoch' (did you "
        "mean 'epochs'?); valid keys: init, lr, epochs, "
    )
    assert not out.exists()


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-prodistill"])
def test_a_prodistill_recipe_mergekit_refuses_is_one_line(tmp_path, command):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: prodistill\nbase_model: /models/base\nmodels: []\n")
    proc = run_cli(BIN / command, recipe, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "not a valid mergekit recipe" in line and "'models'" in line
    assert not (tmp_path / "out").exists()


def test_other_methods_keep_mergekits_own_validation(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: linear\nmodels: []\n")
    proc = run_cli(BIN / "mergekit-yaml", recipe, tmp_path / "out", check=False)
    assert proc.returncode != 0 and "RuntimeError: Exactly one of" in proc.stderr
