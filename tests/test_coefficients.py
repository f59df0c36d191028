"""The coefficients' contract: the merge formula, the optimiser, and the one training loop
(`fit`) that the decoder blocks and the head share, with its policy on non-finite losses."""

import json
import logging

import pytest
import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.recipe import ProDistillParameters
from mergekit_prodistill.training import coefficients, head, optimizer
from mergekit_prodistill.training.coefficients import (MergedPart, Optimizer, coefficient_stats,
                                                       combine, fit, init_coefficients,
                                                       merged_weights, unique_parameters)
from mergekit_prodistill.training.optimizer import TrainingStep, chain_rule, training_weights

from helpers import merge, nan_on_first_training_call


def test_the_merge_formula_sums_products_before_adding_the_base():
    # mergekit's task arithmetic order: an untrained merge equals it bit for bit only so.
    base = torch.tensor([1.0, 1e8, -3.0])
    deltas = [torch.tensor([1e-8, 1.0, 0.1]), torch.tensor([3e-8, 1.0, 0.2])]
    init = [torch.tensor(0.5)] * 2
    assert torch.equal(combine(base, deltas, init), base + (0.5 * deltas[0] + 0.5 * deltas[1]))
    merged = merged_weights({"w": base}, [{"w": d} for d in deltas], [{"w": c} for c in init],
                            torch.float32)
    assert torch.equal(merged["w"], combine(base, deltas, init))


def test_optimizer_steps_do_not_depend_on_the_gradient_scale():
    # Coefficient gradients are ~1e-11 to 1e-9 at 13B widths and ~1e-4 on tiny models:
    # the same problem at either scale must take the same steps.
    torch.manual_seed(0)
    grads = [torch.randn(64, 32) * torch.rand(64, 32) for _ in range(5)]
    runs = []
    for scale in (1.0, 1e-10):
        lam = torch.nn.Parameter(torch.full((64, 32), 0.5))
        opt = Optimizer([lam], lr=0.1)
        for g in grads:
            lam.grad = g * scale
            opt.step()
        runs.append(lam.detach().clone())
    assert not torch.equal(runs[0], torch.full((64, 32), 0.5))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_coefficient_spread_is_pooled_over_every_element():
    # Tensor by tensor, without concatenating them: the same figures as over all elements.
    torch.manual_seed(0)
    shared = torch.tensor(0.7)  # a task-wise coefficient, shared by names: counted once
    experts = [{"a": 0.5 + 0.1 * torch.randn(40, 30), "b": 0.2 + torch.rand(7),
                "c": torch.tensor(0.3), "d": shared, "e": shared}, {"a": torch.tensor(0.5)}]
    stats = coefficient_stats(experts)
    for i, cf in enumerate(experts):
        flat = torch.cat([t.reshape(-1) for t in {id(t): t for t in cf.values()}.values()])
        expected_std = float(flat.double().std()) if flat.numel() > 1 else 0.0
        assert stats["coefficient_std"][i] == pytest.approx(expected_std, rel=1e-6)
        assert stats["coefficient_range"][i] == [float(flat.min()), float(flat.max())]
    assert stats["coefficient_mean"][1] == pytest.approx(0.5)



def quadratic_problem(nan_steps=()):
    """Two experts whose best merge is known: the loss pulls the merged weight to a target."""
    torch.manual_seed(0)
    base = {"w": torch.randn(8, 4)}
    deltas = [{"w": torch.randn(8, 4)}, {"w": torch.randn(8, 4)}]
    target = base["w"] + 0.8 * deltas[0]["w"] + 0.3 * deltas[1]["w"]
    calls = {"n": 0}

    def loss_of(weights, i, b):
        calls["n"] += 1
        loss = (weights["w"] - target).pow(2).mean()
        return loss * float("nan") if calls["n"] in nan_steps else loss

    return base, deltas, loss_of


def test_fit_lowers_the_loss_from_task_arithmetic():
    base, deltas, loss_of = quadratic_problem()
    p = ProDistillParameters(lr=0.05)
    coeffs, _ = fit(MergedPart("test", base, deltas, torch.float32), p, 40, [1, 1], loss_of,
                    torch.Generator().manual_seed(0))
    start = [{"w": torch.tensor(p.init)}] * 2
    before = float(loss_of(merged_weights(base, deltas, start, torch.float32), 0, 0))
    after = float(loss_of(merged_weights(base, deltas, coeffs, torch.float32), 0, 0))
    assert after < 0.2 * before


def test_fit_trains_again_from_init_with_a_lower_lr_after_a_non_finite_loss(caplog):
    base, deltas, loss_of = quadratic_problem(nan_steps={1})
    p = ProDistillParameters(lr=0.05)
    losses = []
    coeffs, _ = fit(MergedPart("block 7", base, deltas, torch.float32), p, 3, [1, 1], loss_of,
                    torch.Generator().manual_seed(0),
                    on_epoch=lambda epoch, loss: losses.append((epoch, loss)))
    assert "block 7: non-finite loss in epoch 1; training again from the start with lr=0.005" \
        in caplog.text
    assert [e for e, _ in losses] == [0, 1, 2]
    assert all(torch.isfinite(t).all() for c in coeffs for t in c.values())


def test_fit_gives_up_with_one_line_after_its_retries():
    base, deltas, loss_of = quadratic_problem(nan_steps=set(range(1, 1000)))
    with pytest.raises(ProDistillError, match="block 3: the distillation loss is not finite"):
        fit(MergedPart("block 3", base, deltas, torch.float32), ProDistillParameters(), 2,
            [1, 1], loss_of, torch.Generator().manual_seed(0))


def test_frozen_coefficients_stay_at_init():
    base, deltas, loss_of = quadratic_problem()
    base["v"] = torch.randn(3)
    for d in deltas:
        d["v"] = torch.randn(3)
    coeffs, _ = fit(MergedPart("test", base, deltas, torch.float32, frozen=("v",)),
                    ProDistillParameters(), 5, [1, 1], loss_of, torch.Generator().manual_seed(0))
    assert all(float(c["v"]) == 0.5 for c in coeffs)
    assert all(not torch.equal(c["w"], torch.full_like(c["w"], 0.5)) for c in coeffs)


def test_the_head_retries_a_non_finite_loss_as_the_blocks_do(families, tmp_path, monkeypatch,
                                                            caplog):
    monkeypatch.setattr(head, "masked_kl", nan_on_first_training_call(coefficients.masked_kl))
    fam = families("llama", 2)
    out = merge(fam.recipe("prodistill", epochs=1, head_epochs=2, lr=0.05, shots=4,
                           continue_tokens=0), tmp_path / "out")
    assert "final norm and LM head: non-finite loss in epoch 1; training again" in caplog.text
    report = json.loads((out / "prodistill_report.json").read_text())
    assert len(report["head"]["epoch_losses"]) == 2


def test_the_fused_step_takes_the_steps_of_the_separate_passes(monkeypatch):
    # After the first step one pass per tensor, chunk by chunk, applies the chain rule,
    # Adam and the next merged weight: the same numbers as whole-tensor passes.
    monkeypatch.setattr(optimizer, "CHUNK_CPU", 7)  # several chunks and a short tail
    torch.manual_seed(0)
    base = {"w": torch.randn(6, 5).bfloat16(), "b": torch.randn(6).bfloat16()}
    deltas = [{n: (0.1 * torch.randn(t.shape)).bfloat16() for n, t in base.items()}
              for _ in range(2)]
    target = torch.randn(6, 5)
    runs = []
    for fused in (True, False):
        coeffs = init_coefficients(base, 2, ProDistillParameters())
        opt = Optimizer(unique_parameters(coeffs), lr=0.05)
        step = TrainingStep(base, deltas, coeffs, torch.bfloat16, opt)
        for _ in range(4):
            w = step.weights
            ((w["w"].float() * w["b"].float()[:, None] - target).pow(2).mean()).backward()
            if fused:
                step.update()
            else:
                chain_rule(w, deltas, coeffs, step.trained)
                opt.step()
                step.weights = training_weights(base, deltas, coeffs, torch.bfloat16)
        runs.append([*step.weights.values(), *(t for c in coeffs for t in c.values())])
    assert not torch.equal(runs[0][-1], torch.full_like(runs[0][-1], 0.5))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _steps_of(compiled, monkeypatch, steps=4):
    """Weights and coefficients after ``steps`` fused steps, by the compiled pass or the
    chunked one."""
    monkeypatch.setattr(optimizer, "COMPILED_ON", ("cpu",) if compiled else ())
    torch.manual_seed(0)
    base = {"w": torch.randn(6, 5).bfloat16(), "b": torch.randn(6).bfloat16()}
    deltas = [{n: (0.1 * torch.randn(t.shape)).bfloat16() for n, t in base.items()}
              for _ in range(2)]
    target = torch.randn(6, 5)
    coeffs = init_coefficients(base, 2, ProDistillParameters())
    step = TrainingStep(base, deltas, coeffs, torch.float32,
                        Optimizer(unique_parameters(coeffs), lr=0.05))
    assert step.compiled == compiled
    for _ in range(steps):
        w = step.weights
        ((w["w"] * w["b"][:, None] - target).pow(2).mean()).backward()
        step.update()
    return [*step.weights.values(), *(t for c in coeffs for t in c.values())]


def test_the_compiled_pass_takes_the_steps_of_the_chunked_one(monkeypatch):
    # One compiled kernel per tensor (as on CUDA) against the chunked pass: the same
    # steps, up to the rounding of fused multiply-adds.
    compiled, chunked = _steps_of(True, monkeypatch), _steps_of(False, monkeypatch)
    assert not torch.equal(chunked[-1], torch.full_like(chunked[-1], 0.5))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(compiled, chunked))


def test_a_pass_that_cannot_compile_falls_back_once_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler\nfound")

    monkeypatch.setattr(optimizer, "_compiled", {"step": broken})
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        fallen = _steps_of(True, monkeypatch)
        assert optimizer.compiled_elementwise_step() is None
        assert not TrainingStep({"w": torch.ones(2)}, [{"w": torch.ones(2)}],
                                init_coefficients({"w": torch.ones(2)}, 1,
                                                  ProDistillParameters()),
                                torch.float32, Optimizer([], 0.1)).compiled
    assert caplog.text.count("could not compile") == 1
    assert "no working C++ compiler found" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fallen, _steps_of(False, monkeypatch)))
