"""Interrupted merges continue to the same bits."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from mergekit_prodistill import parallel
from mergekit_prodistill.errors import Interrupted, ProDistillError
from mergekit_prodistill.inputs import continuation
from mergekit_prodistill.output.progress import Progress
from mergekit_prodistill.tiny import ModelSpec
from mergekit_prodistill.training.weights import ModelTensors

from helpers import BIN, load_tensors, merge, refuse_to_generate, run_cli

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


def test_a_signal_that_surfaces_as_another_error_still_stops_cleanly(
        families, tmp_path, monkeypatch):
    # Ctrl-C landing inside safetensors' reader comes out as its ValueError, not as
    # KeyboardInterrupt; the merge must still end as interrupted, its progress kept.
    fam = families("llama", 2, model=ModelSpec(num_layers=4))
    out = tmp_path / "out"
    load = ModelTensors.load

    def load_until_told_to_stop(self, weight):
        if progress(out) >= 1:
            try:
                parallel._interrupt(signal.SIGINT, None)
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type "
                                 "'torch.storage.UntypedStorage'") from None
        return load(self, weight)

    monkeypatch.setattr(ModelTensors, "load", load_until_told_to_stop)
    with pytest.raises(Interrupted, match="run the same command again to continue"):
        merge(fam.recipe("prodistill", epochs=2, shots=4), out)
    assert progress(out) >= 1 and not (out / "config.json").exists()


def whole_and_stopped(monkeypatch, tmp_path, recipe, method: str, when=lambda *_: True):
    """``recipe``'s merge (seed 3) whole, and the folder of the same merge stopped by
    Ctrl-C just after ``Progress.<method>`` saved what it saves (where ``when`` its
    arguments)."""
    whole, out = load_tensors(merge(recipe, tmp_path / "whole", random_seed=3)), tmp_path / "out"
    save = getattr(Progress, method)

    def save_then_stop(self, *args):
        save(self, *args)
        if when(*args):
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Progress, method, save_then_stop)
        with pytest.raises(Interrupted, match="run the same command again"):
            merge(recipe, out, random_seed=3)
    return whole, out


def resumes_to(whole, recipe, out) -> bool:
    resumed = load_tensors(merge(recipe, out, random_seed=3))
    return sorted(whole) == sorted(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resume_reads_the_saved_continuations_instead_of_generating_them(
        families, tmp_path, monkeypatch):
    fam = families("llama", 2)
    recipe = fam.recipe("prodistill", epochs=3, lr=0.05, shots=6, batch_size=4,
                        continue_tokens=6)
    whole, out = whole_and_stopped(monkeypatch, tmp_path, recipe, "save_continuations")
    assert (out / STAGING / ".progress" / "continuations.json").exists()
    monkeypatch.setattr(continuation, "loaded", refuse_to_generate)
    assert resumes_to(whole, recipe, out)


def test_a_resume_keeps_what_later_blocks_read_beside_the_hidden_states(
        families, tmp_path, monkeypatch):
    # Gemma 4 E2B's blocks each read a per-layer input, and its last two the keys and values
    # blocks 0 and 1 stored: a merge stopped after block 2 reads them from the saved streams.
    fam = families("gemma4_e2b", 2)
    recipe = fam.recipe("prodistill", epochs=3, lr=0.05, shots=6, batch_size=4,
                        continue_tokens=0)
    whole, out = whole_and_stopped(monkeypatch, tmp_path, recipe, "save_state",
                                   when=lambda blocks_done, *_: blocks_done == 2)
    assert progress(out) == 2
    assert resumes_to(whole, recipe, out)
