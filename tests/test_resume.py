"""Interrupted merges continue to the same bits; bad training stops cleanly."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import BIN, merge, nan_on_first_training_call, run_cli
from mergekit_prodistill.inputs import continuation
from mergekit_prodistill.training import distill
from mergekit_prodistill.output.progress import Progress
from mergekit_prodistill.tiny import ModelSpec
from mergekit_prodistill.errors import Interrupted, ProDistillError
from helpers import load_tensors

STAGING = ".prodistill-staging"


def progress(out):
    path = out / STAGING / ".progress" / "state.json"
    try:
        return json.loads(path.read_text())["blocks_done"]
    except (OSError, ValueError):
        return 0


def test_sigkill_then_rerun_gives_identical_tensors(families, tmp_path):
    fam = families("llama", 2, model=ModelSpec(num_layers=6))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epochs=20, lr=0.05, shots=8, batch_size=4,
                                 continue_tokens=8))
    merge(recipe.read_text(), tmp_path / "whole", random_seed=7)

    out = tmp_path / "resumed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([BIN / "mergekit-prodistill", recipe, out, "--random-seed", "7",
                             "--quiet"], env=env)
    deadline = time.time() + 300
    while progress(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = progress(out)
    assert 2 <= done < 6, f"the kill should land mid-merge, after block {done}"
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()

    run_cli(BIN / "mergekit-prodistill", recipe, out, "--random-seed", "7", "--quiet")
    whole, resumed = load_tensors(tmp_path / "whole"), load_tensors(out)
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    report = json.loads((out / "prodistill_report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == list(range(6))
    assert not (out / STAGING).exists()


def test_changed_recipe_is_not_resumed(families, tmp_path):
    fam = families("llama", 2)
    out = tmp_path / "out"
    (out / STAGING / ".progress").mkdir(parents=True)
    (out / STAGING / ".progress" / "state.json").write_text(
        json.dumps({"fingerprint": "another merge", "blocks_done": 1, "report_blocks": []}))
    with pytest.raises(ProDistillError, match="unfinished merge of a different recipe"):
        merge(fam.recipe("prodistill", epochs=1, shots=4), out)


def test_non_finite_loss_fails_cleanly_after_retries(families, tmp_path):
    fam = families("llama", 2)
    out = tmp_path / "out"
    with pytest.raises(ProDistillError, match=r"block 0: the distillation loss is not finite"):
        merge(fam.recipe("prodistill", epochs=2, lr=1e30, shots=4), out)
    assert not out.exists(), "a run that failed before finishing a block leaves nothing"


def test_non_finite_loss_trains_the_block_again_with_a_lower_lr(families, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(distill, "masked_mse", nan_on_first_training_call(distill.masked_mse))
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=2, lr=0.05, shots=4), tmp_path / "out")
    assert "block 0: non-finite loss in epoch 1; training again from the start with lr=0.005" in caplog.text
    tensors = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    report = json.loads((out / "prodistill_report.json").read_text())
    assert len(report["blocks"][0]["epoch_losses"]) == 2


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_activation_placements_give_identical_merges(families, tmp_path, placement):
    fam = families("qwen2", 2)
    params = dict(epochs=3, lr=0.05, shots=8)
    ref = load_tensors(merge(fam.recipe("prodistill", **params), tmp_path / "ref"))
    extra = {"activation_dir": str(tmp_path / "acts")} if placement == "disk" else {}
    out = merge(fam.recipe("prodistill", activation_placement=placement, **params, **extra),
                tmp_path / "out")
    got = load_tensors(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    if placement == "disk":
        assert list((tmp_path / "acts").glob("*.bin"))


def test_bfloat16_activations_train(families, tmp_path):
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=3, lr=0.05, shots=8, activation_dtype="bfloat16"),
                tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(families, tmp_path):
    fam = families("llama", 2, model=ModelSpec(num_layers=6))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(fam.recipe("prodistill", epochs=20, lr=0.05, shots=8, batch_size=4,
                                 continue_tokens=8))
    out = tmp_path / "out"
    proc = subprocess.Popen([BIN / "mergekit-yaml", recipe, out, "--quiet"],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while progress(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith(
        "mergekit-prodistill: error: interrupted; run the same command again to continue")
    assert progress(out) >= 1 and not (out / "config.json").exists()


def refuse_to_generate(*args, **kwargs):
    raise AssertionError("the continuations were generated again")


def test_resume_reads_the_saved_continuations_instead_of_generating_them(
        families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    recipe = fam.recipe("prodistill", epochs=3, lr=0.05, shots=6, batch_size=4,
                        continue_tokens=6)
    whole = load_tensors(merge(recipe, tmp_path / "whole", random_seed=3))

    save = Progress.save_continuations

    def save_then_stop(self, sequences):
        save(self, sequences)
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    monkeypatch.setattr(Progress, "save_continuations", save_then_stop)
    with pytest.raises(Interrupted, match="run the same command again"):
        merge(recipe, out, random_seed=3)
    assert (out / STAGING / ".progress" / "continuations.json").exists()

    monkeypatch.setattr(Progress, "save_continuations", save)
    monkeypatch.setattr(continuation, "continue_prompts", refuse_to_generate)
    resumed = load_tensors(merge(recipe, out, random_seed=3))
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_untrained_merge_generates_no_continuations(families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    plain = load_tensors(merge(fam.recipe("prodistill", epochs=0, shots=4, continue_tokens=0),
                               tmp_path / "plain"))
    monkeypatch.setattr(continuation, "continue_prompts", refuse_to_generate)
    out = merge(fam.recipe("prodistill", epochs=0, shots=4, continue_tokens=16),
                tmp_path / "out")
    got = load_tensors(out)
    assert all(torch.equal(plain[k], got[k]) for k in plain)
    assert "greedy continuation" not in (out / "README.md").read_text()
