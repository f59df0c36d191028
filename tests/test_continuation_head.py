"""Calibration on the experts' own continuations, and training the final norm and LM head."""

import json

import pytest
import torch
import transformers

from conftest import merge
from mergekit_prodistill import continuation
from mergekit_prodistill.calibration import read_prompts, tokenize
from mergekit_prodistill.errors import ProDistillError
from test_merge import load_tensors


def test_cut_at_stop_keeps_tokens_before_end_or_padding():
    assert continuation.cut_at_stop([5, 6, 2, 7], {2}, 3) == [5, 6]
    assert continuation.cut_at_stop([5, 3, 3], {2}, 3) == [5]
    assert continuation.cut_at_stop([5, 6], {2}, 3) == [5, 6]


def test_continuations_are_the_experts_greedy_tokens_even_offloaded_to_disk(families, monkeypatch):
    fam = families("llama", 2)
    expert = str(fam.experts[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(expert)
    sequences = tokenize(read_prompts(str(fam.calibration[0]))[:3], tokenizer, 64)
    assert len({len(s) for s in sequences}) > 1, "prompts of different lengths get left-padded"

    placements = []
    load = continuation.load_offloaded

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        placements.extend(model.hf_device_map.values())
        return model

    monkeypatch.setattr(continuation, "load_offloaded", spy)
    monkeypatch.setattr(continuation, "memory_budget", lambda path, layers: 1)  # all on disk
    out = continuation.continue_prompts(expert, sequences, 6, tokenizer, dtype="float32",
                                        device=torch.device("cpu"), batch_size=2)
    assert "disk" in placements

    model = transformers.AutoModelForCausalLM.from_pretrained(expert)
    for seq, got in zip(sequences, out):
        ids = torch.tensor([seq])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)[0].tolist()
        want = seq + continuation.cut_at_stop(want[len(seq):], {tokenizer.eos_token_id},
                                              tokenizer.pad_token_id)
        assert got == want
        assert len(seq) < len(got) <= len(seq) + 6


def test_continue_tokens_extend_every_calibration_prompt(families, tmp_path):
    fam = families("llama", 2)
    common = dict(epochs=1, shots=4, batch_size=4, lr=0.05, head_epochs=0)
    plain = merge(fam.recipe("prodistill", continue_tokens=0, **common), tmp_path / "plain")
    longer = merge(fam.recipe("prodistill", continue_tokens=5, **common), tmp_path / "longer")
    before = json.loads((plain / "prodistill_report.json").read_text())["calibration"]
    after = json.loads((longer / "prodistill_report.json").read_text())["calibration"]
    for a, b in zip(before, after):
        assert a["prompts"] == b["prompts"] == 4
        assert a["tokens"] < b["tokens"] <= a["tokens"] + 5 * 4
    assert "own greedy continuation (up to 5 tokens)" in (longer / "README.md").read_text()
    assert "greedy continuation" not in (plain / "README.md").read_text()


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


@pytest.mark.parametrize("key,value", [("continue_tokens", -1), ("head_epochs", -2)])
def test_new_parameters_are_validated(families, tmp_path, key, value):
    fam = families("llama", 2)
    with pytest.raises(ProDistillError, match=rf"parameter '{key}' = {value}"):
        merge(fam.recipe("prodistill", **{key: value}), tmp_path / "out")


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
