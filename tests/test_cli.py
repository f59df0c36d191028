"""The commands a user runs, as subprocesses of the installed package."""

import json
import os
import re
import sys

import pytest
import torch
import transformers
import yaml

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.output import output_folder

from helpers import BIN, merge, recipe, refused, run_cli


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


# Flags and paths the merge cannot use: refused by the checks before any weight is read,
# here in-process through mergekit's run_merge (the route mergekit-yaml takes).


@pytest.mark.parametrize("options,message", [
    ({"device": "meta"}, "--device meta: meta tensors hold no values to merge; use cpu or cuda"),
    ({"multi_gpu": True},
     "--multi-gpu (also set by --gpu-rich): a prodistill process computes on one device; use "
     "--cuda for one GPU, or launch one process per GPU with torchrun --nproc-per-node N "
     "(see docs/distributed.md)"),
    ({"unsafe_truncate_embeddings": True},
     "--unsafe-truncate-embeddings: prodistill never truncates embeddings; it aligns the "
     "vocabularies by token (tokenizer_source, see docs/vocabularies.md), so remove the flag"),
    ({"lora_merge_dtype": "fp8"}, "--lora-merge-dtype fp8 is not one of bfloat16, float16, "
                                  "float32"),
], ids=["meta-device", "multi-gpu", "truncate-embeddings", "lora-merge-dtype"])
def test_flags_the_merge_cannot_honour(families, tmp_path, no_weight_reads, options, message):
    refused(recipe(families("llama", 2), epochs=1), tmp_path / "out",
            f"^{re.escape(message)}$", **options)


def test_a_cuda_device_torch_cannot_use(families, tmp_path, no_weight_reads, monkeypatch):
    doc = recipe(families("llama", 2), epochs=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    refused(doc, tmp_path / "out", "^" + re.escape(
        f"--device cuda: this torch ({torch.__version__}) is built without CUDA; leave out "
        "--cuda / --device to merge on the CPU, or run where torch has a cuda device") + "$",
        cuda=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused(doc, tmp_path / "out",
            r"^--device cuda:1: this machine has 1 cuda device \(cuda:0\)$", device="cuda:1")


def test_an_output_path_the_merge_cannot_make(families, tmp_path, no_weight_reads, monkeypatch):
    doc = recipe(families("llama", 2), epochs=1)
    taken = tmp_path / "taken"
    taken.write_text("")
    refused(doc, taken / "out", "^" + re.escape(
        f"output path {taken / 'out'} cannot be a folder: {taken} is a file") + "$")
    # Root writes anywhere whatever the mode, so simulate the answer the OS would give.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_folder.os, "access",
                        lambda path, mode: path != str(locked) and real_access(path, mode))
    refused(doc, locked / "out", "^" + re.escape(
        f"output path {locked / 'out'} cannot be created: {locked} is not writable") + "$")
    with pytest.raises(ProDistillError, match="^" + re.escape(
            f"output path {locked} is not writable") + "$"):
        merge(yaml.safe_dump(doc), locked)
    assert os.listdir(locked) == []


def test_lora_adapters_and_their_cache_are_checked(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    doc = recipe(fam, epochs=1)
    cache = tmp_path / "cache"
    for adapter, message in (
            (tmp_path / "missing", "LoRA folder {a} does not exist"),
            (tmp_path, "LoRA folder {a} holds no adapter_config.json; give a PEFT adapter's "
                       "folder")):
        doc["models"][0]["model"] = f"{fam.experts[0]}+{adapter}"
        refused(doc, tmp_path / "out", "^" + re.escape(
            f"model {fam.experts[0]}+{adapter}: " + message.format(a=adapter)) + "$",
            lora_merge_cache=str(cache))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    doc["models"][0]["model"] = f"{fam.experts[0]}+{adapter}"
    taken = tmp_path / "taken"
    taken.write_text("")
    refused(doc, tmp_path / "out", "^" + re.escape(
        f"--lora-merge-cache {taken / 'cache'} cannot be a folder: {taken} is a file") + "$",
        lora_merge_cache=str(taken / "cache"))
    assert not cache.exists()


# The same refusals from both commands, as one line on stderr with exit status 2.


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-prodistill"])
@pytest.mark.parametrize("case", ["meta-device", "unknown-device", "output-below-a-file"])
def test_unusable_flag_or_path_is_one_line_from_both_commands(families, tmp_path, command,
                                                               case):
    path = tmp_path / "recipe.yml"
    path.write_text(families("llama", 2).recipe("prodistill", epochs=1))
    taken = tmp_path / "taken"
    taken.write_text("")
    out, flags, message = {
        "meta-device": (tmp_path / "out", ["--device", "meta"],
                        "--device meta: meta tensors hold no values to merge; use cpu or cuda"),
        "unknown-device": (tmp_path / "out", ["--device", "gpu"],
                           "--device gpu: not a device torch knows; use cpu, cuda or cuda:N "
                           "(or --cuda)"),
        "output-below-a-file": (taken / "out", [],
                                f"output path {taken / 'out'} cannot be a folder: {taken} is a "
                                "file"),
    }[case]
    proc = run_cli(BIN / command, path, out, *flags, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mergekit-prodistill: error: {message}"]
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--random-seed", "-1"], "--random-seed -1: a seed is a whole number from 0 to 4294967295"),
    (["--num-threads", "0"], "--num-threads 0: give 1 or more threads"),
    (["--out-shard-size", "5GB"],
     "--out-shard-size 5GB: not a size; give a whole number of parameters per shard, with K, "
     "M or B for thousands, millions or billions (e.g. 5B)"),
    (["--device", "gpu"], "--device gpu: not a device torch knows; use cpu, cuda or cuda:N (or "
                          "--cuda)"),
], ids=["seed", "threads", "shard-size", "device-name"])
def test_flag_values_mergekit_cannot_apply_are_one_line(families, tmp_path, args, message):
    # mergekit-yaml applies these flags itself, before it reads the recipe: there they end
    # as mergekit ends them, for every merge method.
    path = tmp_path / "recipe.yml"
    path.write_text(families("llama", 2).recipe("prodistill", epochs=1))
    commands = [[path, tmp_path / "out"]] + ([["plan", path]] if args[0] != "--random-seed"
                                             else [])
    for command in commands:
        proc = run_cli(BIN / "mergekit-prodistill", *command, *args, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"mergekit-prodistill: error: {message}"]
    assert not (tmp_path / "out").exists()
