"""The merging coefficients: the merge formula, their start, the losses, one training
loop (:func:`fit`) for the decoder blocks and the head alike, and statistics.

A merged tensor is theta_0 + sum_i lambda_i * tau_i with lambda in fp32 (element-wise by
default), trained by the scale-free Adam of :mod:`mergekit_prodistill.training.optimizer`.
"""

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.parallel import SINGLE, World
from mergekit_prodistill.training.optimizer import Optimizer, TrainingStep

LOG = logging.getLogger("mergekit_prodistill")

# On a non-finite loss the coefficients are trained again from init with the learning rate
# divided by LR_BACKOFF, at most MAX_RETRIES times.
MAX_RETRIES = 3
LR_BACKOFF = 10.0

Weights = Dict[str, torch.Tensor]


def combine(base: torch.Tensor, deltas: List[torch.Tensor], coeffs: List[torch.Tensor],
            world: World = SINGLE):
    """theta_0 + sum_i lambda_i * tau_i (over every process's experts).

    The products are summed first and the base added last, in the order mergekit's task
    arithmetic uses, so that untrained coefficients reproduce it bit for bit.
    """
    mixed = coeffs[0] * deltas[0]
    for coeff, delta in zip(coeffs[1:], deltas[1:]):
        mixed = mixed + coeff * delta
    if not world.contributes:  # another process adds this expert
        mixed.zero_()
    return base + world.sum_(mixed)


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


def merged_weights(base_w, deltas, coeffs, dtype, world: World = SINGLE):
    """The weights that are written: summed exactly as mergekit's task arithmetic."""
    with torch.no_grad():
        return {
            name: combine(base, [d[name] for d in deltas], [c[name] for c in coeffs],
                          world).to(dtype)
            for name, base in base_w.items()
        }


def written_weights(base_w, deltas, coeffs, precision, world: World = SINGLE):
    """The weights as written: merged (:func:`merged_weights`, in float32), then rounded
    once, to ``precision``'s output dtype (:class:`dtypes.Precision`)."""
    return {name: precision.written(t) for name, t in
            merged_weights(base_w, deltas, coeffs, torch.float32, world).items()}


def gathered_stats(coeffs, world: World) -> Dict[str, List]:
    """:func:`coefficient_stats` of every process's experts, in expert order."""
    return {key: world.gather(values) for key, values in coefficient_stats(coeffs).items()}


@dataclass(frozen=True)
class MergedPart:
    """A part of the model whose coefficients :func:`fit` trains (a decoder block, or the
    final norm and LM head): its name in messages, the base's weights, the task vectors
    of the experts this process owns, the dtype a training step computes in, the world
    whose experts are summed, and the tensors whose coefficients keep ``init``."""

    name: str
    base_w: Weights
    deltas: List[Weights]
    dtype: torch.dtype
    world: World = SINGLE
    frozen: Sequence[str] = ()


class EpochLosses:
    """Each epoch's loss, as :func:`fit` reports it (``on_epoch``); a retry trains again
    from the first epoch, so its losses replace the earlier ones. ``then`` hears each too."""

    def __init__(self, then: Optional[Callable[[int, float], None]] = None):
        self.losses: List[float] = []
        self.then = then

    def __call__(self, epoch: int, loss: float) -> None:
        del self.losses[epoch:]
        self.losses.append(loss)
        if self.then:
            self.then(epoch, loss)


def mean_over_experts(per_expert: List[List[float]], world: World) -> float:
    """The loss per real token of each expert, from ``[loss summed over real tokens,
    their number]`` per owned expert (over every process), averaged over experts."""
    losses = [total / max(tokens, 1) for total, tokens in world.sum_by_expert(per_expert)]
    return sum(losses) / len(losses)


def fit(part: MergedPart, p, epochs: int, batches: Sequence[int],
        loss_of: Callable[[Weights, int, int], torch.Tensor], generator: torch.Generator,
        on_epoch: Optional[Callable[[int, float], None]] = None,
        stop: Optional[Callable[[int, Weights], bool]] = None):
    """Train the coefficients of ``part``; return them and the share of coefficients
    whose first gradient was below Adam's eps (see :class:`Optimizer`).

    Expert i has ``batches[i]`` batches (every expert, over all processes); the part's
    task vectors are those of the experts this process owns (:meth:`World.owned`), and
    ``loss_of(weights, j, b)`` is the loss of the j-th of them on batch b for the merged
    ``weights`` (in the part's dtype). Each step back-propagates one batch of every expert
    into the merged weights, then :class:`TrainingStep` applies the chain rule
    d merged / d lambda_i = tau_i, Adam and the next merged weights. A non-finite loss
    trains again from ``init`` with a smaller learning rate (no saved copy of lambda
    needed); losses are read once per epoch (no synchronisation per step). ``stop(epoch,
    weights)``, asked after every epoch with the merged weights, ends training early.
    """
    lr, retries, epoch, world = p.lr, 0, 0, part.world
    coeffs = init_coefficients(part.base_w, len(part.deltas), p, part.frozen)
    optimizer = Optimizer(unique_parameters(coeffs), lr)
    training = TrainingStep(part.base_w, part.deltas, coeffs, part.dtype, optimizer, world)
    while epoch < epochs:
        losses = run_epoch(training, loss_of, batches, generator)
        # One reduction per tensor: NaN or inf anywhere makes its sum non-finite.
        params = optimizer.params
        finite = bool(torch.stack([t.sum() for t in params]).isfinite().all())
        epoch_loss, broken = world.sum_floats([sum(map(float, losses)), float(not finite)])
        if not (math.isfinite(epoch_loss) and not broken):
            if retries == MAX_RETRIES:
                raise ProDistillError(
                    f"{part.name}: the distillation loss is not finite even with lr={lr:g} "
                    f"after {MAX_RETRIES} retries; lower 'lr' (now {p.lr:g}) or check the "
                    "models for NaN or inf weights"
                )
            retries += 1
            lr /= LR_BACKOFF
            LOG.warning("%s: non-finite loss in epoch %d; training again from the start "
                        "with lr=%g", part.name, epoch + 1, lr)
            with torch.no_grad():
                for t in params:
                    t.fill_(p.init)
            optimizer, epoch = Optimizer(params, lr), 0
            training = TrainingStep(part.base_w, part.deltas, coeffs, part.dtype, optimizer,
                                    world)
            continue
        if on_epoch:
            on_epoch(epoch, epoch_loss / max(batches))
        epoch += 1
        if stop and epoch < epochs and stop(epoch, training.weights):
            break
    small, total = world.sum_floats(optimizer.small_gradients() if world.contributes else [0, 0])
    return [{n: t.detach() for n, t in c.items()} for c in coeffs], small / max(total, 1)


def run_epoch(training: TrainingStep, loss_of, batches: Sequence[int],
              generator: torch.Generator) -> List[torch.Tensor]:
    """One epoch of :func:`fit`: each step back-propagates one batch of every owned expert
    and updates; returns the steps' losses, unread (no synchronisation per step)."""
    owned = training.world.owned(len(batches))
    # Every process draws every expert's order, so the generator stays the same.
    orders = [torch.randperm(n, generator=generator) for n in batches]
    losses = []
    for step in range(max(batches)):
        for j, i in enumerate(owned):
            b = int(orders[i][step % batches[i]])
            loss = loss_of(training.weights, j, b) / len(batches)
            loss.backward()
            losses.append(loss.detach())
        training.update()
    return losses
