"""The merging coefficients: their start, the merge formula, statistics, and the optimiser.

A merged tensor is theta_0 + sum_i lambda_i * tau_i with lambda in fp32 (element-wise by
default). Gradients reach lambda as dL/dW * tau_i, so their size follows the task
vectors' size (~1e-3 per element in real fine-tunes), the model's width and the loss's
scale: raw values of 1e-11 to 1e-9 at 13B shapes, near Adam's usual eps, where Adam turns
into plain SGD with steps proportional to tau squared. :class:`Optimizer` therefore runs
Adam on gradients measured in units of their own RMS at the first step (per tensor and
expert), which makes every step independent of those scales.
"""

import math
from typing import Dict, List

import torch

from mergekit_prodistill.weights import merge

# Adam's eps in units of each tensor's first-step gradient RMS: elements whose gradient
# stays far below the typical one move little, the rest by about the learning rate.
ADAM_EPS = 1e-2
# Adam moves every coefficient by about lr per step, all in the direction that lowers the
# loss, so a weight's output moves by the sum over its inputs: n-fold for n inputs, while
# the error being corrected (a sum of independent task-vector terms) grows only sqrt(n)-
# fold. Element-wise coefficients of a weight with more than FAN_IN_REF inputs per output
# therefore step by lr * sqrt(FAN_IN_REF / inputs): the same share of the error per step
# at every width (at hidden 1024 the unscaled first steps raised the loss tenfold).
FAN_IN_REF = 64


def init_coefficients(base_w, num_experts, p) -> List[Dict[str, torch.Tensor]]:
    """lambda in fp32, whatever the weight dtype; shape set by the granularity."""
    coeffs = []
    device = next(iter(base_w.values())).device
    for _ in range(num_experts):
        shared = torch.nn.Parameter(torch.tensor(p.init, dtype=torch.float32, device=device))
        coeffs.append({
            name: shared if p.granularity == "task" else torch.nn.Parameter(torch.full(
                w.shape if p.granularity == "element" else (), p.init,
                dtype=torch.float32, device=w.device))
            for name, w in base_w.items()
        })
    return coeffs


def unique_parameters(coeffs) -> List[torch.Tensor]:
    """Every trainable coefficient tensor once (a task-wise lambda is shared by names)."""
    return list({id(t): t for c in coeffs for t in c.values() if t.requires_grad}.values())


def coefficient_stats(coeffs) -> Dict[str, List]:
    """Per expert: mean of the tensors' mean coefficients, and spread over all elements.

    The spread is pooled from each tensor's own variance: concatenating an expert's
    coefficients would copy them (4 bytes each, twice with the std's temporaries).
    """
    stats = {"coefficient_mean": [], "coefficient_std": [], "coefficient_range": []}
    for cf in coeffs:
        tensors = list({id(t): t.detach().float() for t in cf.values()}.values())
        moments = [(t.numel(), *map(float, torch.var_mean(t, correction=0))) for t in tensors]
        count = sum(n for n, _, _ in moments)
        mean = sum(n * m for n, _, m in moments) / count
        squares = sum(n * (v + (m - mean) ** 2) for n, v, m in moments)
        stats["coefficient_mean"].append(
            float(torch.stack([t.detach().float().mean() for t in cf.values()]).mean()))
        stats["coefficient_std"].append(math.sqrt(squares / (count - 1)) if count > 1 else 0.0)
        stats["coefficient_range"].append([min(float(t.min()) for t in tensors),
                                           max(float(t.max()) for t in tensors)])
    return stats


def merged_weights(base_w, deltas, coeffs, dtype):
    """The weights that are written: summed exactly as mergekit's task arithmetic."""
    with torch.no_grad():
        return {
            name: merge(base, [d[name] for d in deltas], [c[name] for c in coeffs]).to(dtype)
            for name, base in base_w.items()
        }


def training_weights(base_w, deltas, coeffs, dtype):
    """The same sum for a training step, with fused in-place updates (fewer passes)."""
    with torch.no_grad():
        merged = {}
        for name, base in base_w.items():
            w = base.to(torch.float32, copy=True)
            for c, d in zip(coeffs, deltas):
                w.addcmul_(c[name], d[name])
            merged[name] = w.to(dtype).requires_grad_()
        return merged


def chain_rule(merged, deltas, coeffs) -> None:
    """Set lambda_i's gradient to dL/dW * tau_i from the merged weights' gradients."""
    for c, d in zip(coeffs, deltas):
        for name, coeff in c.items():
            if not coeff.requires_grad:
                continue
            grad = merged[name].grad.float() * d[name]
            grad = grad if coeff.dim() else grad.sum()
            coeff.grad = grad if coeff.grad is None else coeff.grad.add_(grad)


def width_factor(coefficient: torch.Tensor) -> float:
    """The share of lr an element-wise coefficient of a weight steps by (see FAN_IN_REF)."""
    inputs = coefficient.shape[-1] if coefficient.dim() >= 2 else 1
    return min(1.0, math.sqrt(FAN_IN_REF / inputs))


class Optimizer:
    """Adam on gradients in units of their first-step RMS, per tensor (scale-free), with
    steps scaled to the weights' widths (:func:`width_factor`).

    ``small_gradient_share`` is the share of coefficients whose first gradient is below
    eps in those units: the ones Adam moves like SGD rather than by about ``lr``.
    """

    def __init__(self, params: List[torch.Tensor], lr: float):
        self.params = params
        self.eps = ADAM_EPS
        groups: Dict[float, List[torch.Tensor]] = {}
        for p in params:
            groups.setdefault(lr * width_factor(p), []).append(p)
        # The fused kernel does Adam's update in one pass over each tensor.
        self.adam = torch.optim.Adam([{"params": ps, "lr": g} for g, ps in groups.items()],
                                     lr=lr, eps=self.eps, fused=True)
        self.scales = None
        self._small = None

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.scales is None:
            # One norm per tensor, kept on the device: no synchronisation per step.
            rms = [n / math.sqrt(g.numel()) for n, g in zip(torch._foreach_norm(grads), grads)]
            self.scales = [torch.where(r > 0, 1 / r, torch.zeros_like(r)) for r in rms]
            self._small = sum(((g.abs() * s) < self.eps).sum() for g, s in zip(grads, self.scales))
        torch._foreach_mul_(grads, self.scales)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)

    @property
    def small_gradient_share(self) -> float:
        if self._small is None:
            return 0.0
        return float(self._small) / sum(p.numel() for p in self.params)
