"""The merging coefficients: the merge formula, their start, the losses, the optimiser,
one training loop (:func:`fit`) for the decoder blocks and the head alike, and statistics.

A merged tensor is theta_0 + sum_i lambda_i * tau_i with lambda in fp32 (element-wise by
default). Gradients reach lambda as dL/dW * tau_i, so their size follows the task
vectors' size (~1e-3 per element in real fine-tunes), the model's width and the loss's
scale: raw values of 1e-11 to 1e-9 at 13B shapes, near Adam's usual eps, where Adam turns
into plain SGD with steps proportional to tau squared. :class:`Optimizer` therefore runs
Adam on gradients measured in units of their own RMS at the first step (per tensor and
expert), which makes every step independent of those scales.
"""

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergekit_prodistill.errors import ProDistillError

LOG = logging.getLogger("mergekit_prodistill")

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
# On a non-finite loss the coefficients are trained again from init with the learning rate
# divided by LR_BACKOFF, at most MAX_RETRIES times.
MAX_RETRIES = 3
LR_BACKOFF = 10.0

Weights = Dict[str, torch.Tensor]


def combine(base: torch.Tensor, deltas: List[torch.Tensor], coeffs: List[torch.Tensor]):
    """theta_0 + sum_i lambda_i * tau_i.

    The products are summed first and the base added last, in the order mergekit's task
    arithmetic uses, so that untrained coefficients reproduce it bit for bit.
    """
    mixed = coeffs[0] * deltas[0]
    for coeff, delta in zip(coeffs[1:], deltas[1:]):
        mixed = mixed + coeff * delta
    return base + mixed


def init_coefficients(base_w, num_experts, p, frozen: Sequence[str] = ()) -> List[Weights]:
    """lambda in fp32, whatever the weight dtype; shape set by the granularity. Tensors
    named in ``frozen`` keep ``init`` (task arithmetic) and are not trained."""
    coeffs = []
    device = next(iter(base_w.values())).device
    for _ in range(num_experts):
        shared = torch.nn.Parameter(torch.tensor(p.init, dtype=torch.float32, device=device))
        coeffs.append({
            name: torch.tensor(p.init, dtype=torch.float32, device=w.device) if name in frozen
            else shared if p.granularity == "task" else torch.nn.Parameter(torch.full(
                w.shape if p.granularity == "element" else (), p.init,
                dtype=torch.float32, device=w.device))
            for name, w in base_w.items()
        })
    return coeffs


def at_init(coeffs: List[Weights], init: float) -> List[Weights]:
    """Coefficients of the same shapes, all at ``init``: the task arithmetic start."""
    return [{n: torch.full_like(t, init) for n, t in c.items()} for c in coeffs]


def masked_mse(out: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor):
    """Mean squared error per hidden unit over real tokens only (padding excluded)."""
    err = (out.float() - target.float()).pow(2).mean(-1)
    return (err * token_mask).sum() / token_mask.sum()


def masked_kl(student_logp, teacher_logp, token_mask):
    """KL(teacher || student) per real token, averaged over real tokens."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (kl * token_mask).sum() / token_mask.sum()


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
            name: combine(base, [d[name] for d in deltas], [c[name] for c in coeffs]).to(dtype)
            for name, base in base_w.items()
        }


def training_weights(base_w, deltas, coeffs, dtype):
    """The same sum for a training step, with fused in-place updates (fewer passes); the
    tensors with a trained coefficient take a gradient."""
    with torch.no_grad():
        merged = {}
        for name, base in base_w.items():
            w = base.to(torch.float32, copy=True)
            for c, d in zip(coeffs, deltas):
                w.addcmul_(c[name], d[name])
            merged[name] = w.to(dtype).requires_grad_(any(c[name].requires_grad for c in coeffs))
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


def fit(base_w: Weights, deltas: List[Weights], p, epochs: int, batches: Sequence[int],
        loss_of: Callable[[Weights, int, int], torch.Tensor], dtype: torch.dtype,
        generator: torch.Generator, where: str, frozen: Sequence[str] = (),
        on_epoch: Optional[Callable[[int, float], None]] = None):
    """Train the coefficients of theta_0 + sum_i lambda_i tau_i; return them and the share
    of coefficients whose first gradient was below Adam's eps (see :class:`Optimizer`).

    Expert i has ``batches[i]`` batches; ``loss_of(weights, i, b)`` is its loss on batch b
    for the merged ``weights`` (in ``dtype``). Each step materialises the merged weights
    once, back-propagates one batch of every expert into them, and applies the chain rule
    d merged / d lambda_i = tau_i by hand. A non-finite loss trains again from ``init``
    with a smaller learning rate (no saved copy of lambda needed).
    """
    lr, retries, epoch = p.lr, 0, 0
    coeffs = init_coefficients(base_w, len(deltas), p, frozen)
    optimizer = Optimizer(unique_parameters(coeffs), lr)
    steps = max(batches)
    while epoch < epochs:
        orders = [torch.randperm(n, generator=generator) for n in batches]
        epoch_loss = 0.0
        for step in range(steps):
            if not math.isfinite(epoch_loss):
                break
            merged = training_weights(base_w, deltas, coeffs, dtype)
            for i, order in enumerate(orders):
                loss = loss_of(merged, i, int(order[step % len(order)])) / len(orders)
                loss.backward()
                epoch_loss += loss.item()
            chain_rule(merged, deltas, coeffs)
            optimizer.step()
        # One reduction per tensor: NaN or inf anywhere makes its sum non-finite.
        params = optimizer.params
        if not (math.isfinite(epoch_loss) and torch.stack([t.sum() for t in params]).isfinite().all()):
            if retries == MAX_RETRIES:
                raise ProDistillError(
                    f"{where}: the distillation loss is not finite even with lr={lr:g} "
                    f"after {MAX_RETRIES} retries; lower 'lr' (now {p.lr:g}) or check the "
                    "models for NaN or inf weights"
                )
            retries += 1
            lr /= LR_BACKOFF
            LOG.warning("%s: non-finite loss in epoch %d; training again from the start "
                        "with lr=%g", where, epoch + 1, lr)
            with torch.no_grad():
                for t in params:
                    t.fill_(p.init)
            optimizer, epoch = Optimizer(params, lr), 0
            continue
        if on_epoch:
            on_epoch(epoch, epoch_loss / steps)
        epoch += 1
    return [{n: t.detach() for n, t in c.items()} for c in coeffs], optimizer.small_gradient_share
