"""Training the final norm and LM head after the blocks."""

import json

import pytest
import torch

from helpers import load_tensors, merge


@pytest.mark.parametrize("arch,head_tensor", [("llama", "lm_head.weight"), ("qwen3", None)])
def test_head_training_lowers_kl_and_changes_only_the_head(families, tmp_path, arch, head_tensor):
    fam = families(arch, 2)
    common = dict(epochs=2, shots=8, batch_size=4, lr=0.05, continue_tokens=0)
    plain = merge(fam.recipe("prodistill", head_epochs=0, **common), tmp_path / "plain")
    headed = merge(fam.recipe("prodistill", head_epochs=10, **common), tmp_path / "headed")

    report = json.loads((headed / "prodistill_report.json").read_text())["head"]
    assert report["loss_after"] < report["loss_before"]
    assert len(report["epoch_losses"]) == 10
    a, b = load_tensors(plain), load_tensors(headed)
    assert sorted(a) == sorted(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # Tied embeddings (qwen3 here) have no LM head tensor: only the final norm is trained.
    assert changed == {"model.norm.weight", *([head_tensor] if head_tensor else [])}
    assert (head_tensor in b) == (head_tensor is not None)
    assert "LM head coefficients were trained" in (headed / "README.md").read_text()


def test_head_training_and_continuations_with_differing_vocabularies(families, tmp_path):
    fam = families("llama", 2, extra_tokens=((), ("[PAD]",)))  # expert 1 adds a row
    out = merge(fam.recipe("prodistill", epochs=2, shots=8, batch_size=4, lr=0.05,
                           continue_tokens=4, head_epochs=5), tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert report["head"]["loss_after"] < report["head"]["loss_before"]
    merged, base = load_tensors(out), load_tensors(fam.base)
    assert merged["lm_head.weight"].shape == (769, 64)
    assert not torch.equal(merged["lm_head.weight"][:768], base["lm_head.weight"])
    assert torch.isfinite(merged["lm_head.weight"]).all()
