"""Half-precision checkpoints at real task-vector sizes: task vectors formed before any
rounding, the compute dtype that keeps them, and the warning when the output erases them."""

import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergekit_prodistill.models import dtypes
from mergekit_prodistill.training import distill

from helpers import BIN, load_tensors, merge, run_cli

BIN_PLAN = BIN / "mergekit-prodistill"


def stored_as(fam, dtype: torch.dtype, root):
    """A copy of ``fam`` whose checkpoints store ``dtype`` (as their configs say)."""
    copy = type(fam)(root, root / "base", [root / e.name for e in fam.experts],
                     fam.calibration, fam.arch, fam.flavours)
    for src, dst in zip([fam.base, *fam.experts], [copy.base, *copy.experts]):
        shutil.copytree(src, dst)
        for shard in dst.glob("*.safetensors"):
            save_file({n: t.to(dtype) for n, t in load_file(shard).items()}, shard,
                      metadata={"format": "pt"})
        config = json.loads((dst / "config.json").read_text())
        config["dtype"] = str(dtype).replace("torch.", "")
        (dst / "config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def float16_family(tmp_path_factory):
    """Experts that moved each weight by ~1e-3 of the weights' spread, stored in float16:
    the flagship's checkpoints in miniature."""
    from mergekit_prodistill.tiny import build_tiny_family

    root = tmp_path_factory.mktemp("fp16")
    fam = build_tiny_family(root / "fp32", "llama", 2, expert_scale=1e-3)
    return stored_as(fam, torch.float16, root / "fp16")


def with_dtype(fam, dtype: str, **params) -> str:
    doc = yaml.safe_load(fam.recipe("prodistill", **params))
    doc["dtype"] = dtype
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", "cuda", True, "float32"),  # TF32 matmuls: dtypes.fast_float32_matmuls
    ("auto", "cpu", False, "float32"),
    ("bfloat16", "cuda", True, "bfloat16"),
    ("bfloat16", "cuda", False, "float32"),  # emulated bfloat16: slower than float32
    ("bfloat16", "cpu", True, "bfloat16"),
    ("float32", "cuda", True, "float32"),
])
def test_blocks_compute_in_float32_unless_bfloat16_is_asked_for_and_native(
        monkeypatch, requested, device, bf16, expected):
    monkeypatch.setattr(dtypes, "bfloat16_supported", lambda d: bf16)
    assert dtypes.activation_dtype(requested, torch.device(device)) == expected


@pytest.mark.parametrize("recipe_dtype, stored, expected", [
    (None, ["float16", "float16"], "float16"),
    ("float16", ["float16", "float16"], "float16"),
    ("bfloat16", ["float16", "float16"], "float32"),
    ("bfloat16", ["bfloat16", "float32"], "float32"),
    (None, ["bfloat16", "float32"], "float32"),
])
def test_task_vectors_keep_the_stored_dtype_only_where_mergekit_does(recipe_dtype, stored,
                                                                     expected):
    assert dtypes.task_vector_dtype(recipe_dtype, stored) == expected


def test_zero_epochs_forms_task_vectors_before_rounding_to_the_output(float16_family,
                                                                      tmp_path):
    fam = float16_family
    out = merge(with_dtype(fam, "bfloat16", epochs=0, init=0.5, shots=4), tmp_path / "pd")
    base, experts = load_tensors(fam.base), [load_tensors(e) for e in fam.experts]
    merged = load_tensors(out)
    name = "model.layers.0.mlp.up_proj.weight"
    exact = (base[name].float() + sum(0.5 * (e[name].float() - base[name].float())
                                      for e in experts)).to(torch.bfloat16)
    assert torch.equal(merged[name], exact)
    # mergekit casts every model to bfloat16 first, which erases most of each task vector.
    cast_first = [e[name].bfloat16() - base[name].bfloat16() for e in experts]
    assert float(sum((t == 0).float().mean() for t in cast_first)) / 2 > 0.5
    ta = load_tensors(merge(fam.recipe("task_arithmetic", weight=0.5).replace(
        "dtype: float32", "dtype: bfloat16"), tmp_path / "ta"))
    assert not torch.equal(ta[name], merged[name])


def test_zero_epochs_equals_mergekit_when_the_recipe_dtype_is_the_stored_one(float16_family,
                                                                           tmp_path):
    fam = float16_family
    ta = load_tensors(merge(fam.recipe("task_arithmetic", weight=0.5).replace(
        "dtype: float32", "dtype: float16"), tmp_path / "ta"))
    pd = load_tensors(merge(with_dtype(fam, "float16", epochs=0, init=0.5, shots=4),
                            tmp_path / "pd"))
    assert sorted(ta) == sorted(pd)
    assert all(torch.equal(ta[k], pd[k]) for k in ta)
    assert pd["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16


def test_a_trained_float16_merge_written_as_bfloat16_computes_in_float32(float16_family,
                                                                        tmp_path):
    fam = float16_family
    out = merge(with_dtype(fam, "bfloat16", epochs=2, shots=4, continue_tokens=0),
                tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert report["activation_dtype"] == "float32"
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(out).values())


def test_writing_float16_experts_as_bfloat16_warns_once_per_expert(float16_family, tmp_path,
                                                                   caplog):
    fam = float16_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(with_dtype(fam, "bfloat16", epochs=0, shots=4))
    plan = run_cli(BIN_PLAN, "plan", recipe)
    lines = [line for line in plan.stderr.splitlines() if "erases" in line]
    assert len(lines) == 2, plan.stderr
    for expert, line in zip(fam.experts, lines):
        assert str(expert) in line and "'dtype: float16'" in line
        share = float(line.split("erases ")[1].split("%")[0])
        assert 50 < share < 100
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        merge(recipe.read_text(), tmp_path / "out")
    assert sum("erases" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        merge(with_dtype(fam, "float16", epochs=0, shots=4), tmp_path / "kept")
    assert not any("erases" in r.getMessage() for r in caplog.records)


def test_the_keep_task_arithmetic_guard_judges_on_held_out_prompts(families, tmp_path,
                                                                   monkeypatch, caplog):
    fam = families("llama", 2)
    # Held-out prompts that training made worse, while the calibration loss fell.
    losses = iter([1.0, 2.0] * 8)
    monkeypatch.setattr(distill, "held_loss",
                        lambda block, weights, held: next(losses) if held else None)
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        out = merge(fam.recipe("prodistill", epochs=2, shots=8, holdout=0.25,
                               continue_tokens=0), tmp_path / "out")
    blocks = json.loads((out / "prodistill_report.json").read_text())["blocks"]
    assert all(b["kept_task_arithmetic"] for b in blocks)
    assert all(b["loss_after"] == b["loss_before"] for b in blocks)
    assert all(b["heldout_loss_after"] == b["heldout_loss_before"] == 1.0 for b in blocks)
    assert "training raised the loss on the held-out prompts" in caplog.text


def test_trained_blocks_are_no_worse_than_task_arithmetic_on_held_out_prompts(families,
                                                                             tmp_path):
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=3, shots=8, holdout=0.25, continue_tokens=0),
                tmp_path / "out")
    blocks = json.loads((out / "prodistill_report.json").read_text())["blocks"]
    assert all(b["heldout_loss_after"] <= b["heldout_loss_before"] for b in blocks)
    assert any(not b["kept_task_arithmetic"] for b in blocks)


def test_the_cpu_and_an_absent_gpu_count_as_native_bfloat16():
    assert dtypes.bfloat16_supported(torch.device("cpu"))
    if not torch.cuda.is_available():  # planning --cuda on a machine without one
        assert dtypes.bfloat16_supported(torch.device("cuda"))


def test_bfloat16_activations_train(families, tmp_path):
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=3, lr=0.05, shots=8, activation_dtype="bfloat16"),
                tmp_path / "out")
    report = json.loads((out / "prodistill_report.json").read_text())
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])
