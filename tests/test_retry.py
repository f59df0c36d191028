"""A non-finite loss trains the block again from the start with a lower learning rate, and
stops the merge cleanly, with nothing written, once the retries run out."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.training import distill

from helpers import merge, nan_on_first_training_call


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
