"""The ProDistill block loop: train one decoder block's merging coefficients, then advance.

For every expert i we keep two activation streams over its calibration prompts: the
merged model's own activations and expert i's. Block l is merged as
theta_0 + sum_i lambda_i * tau_i with element-wise coefficients lambda trained so that
the merged block, fed the merged stream, matches expert i's block fed expert i's stream
(masked mean squared error, averaged over experts). Then the merged stream advances
through the trained merged block and each expert's stream through the expert's block.
Each expert's held-out prompts advance alongside, forward only (:mod:`fidelity`).
Only one block of the base and of each expert is ever in memory. Over several processes
each holds the streams and blocks of the experts it owns (:mod:`parallel`).
"""

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from mergekit_prodistill.training.activations import on_device
from mergekit_prodistill.models.blocks import BatchContext, BlockRunner
from mergekit_prodistill.training.coefficients import (Weights, at_init, fit, gathered_stats,
                                              masked_mse, written_weights)
from mergekit_prodistill.models.dtypes import Precision
from mergekit_prodistill.training.fidelity import Heldout
from mergekit_prodistill.parallel import SINGLE, World

LOG = logging.getLogger("mergekit_prodistill")

Stream = List[List[torch.Tensor]]  # [expert][batch] -> [batch, length, hidden]


@dataclass
class Streams:
    """The activations entering the next block, per expert and batch.

    ``merged`` is the merged model's stream and ``expert`` each expert's own. Under the
    paper's single-input ablations one of them is not computed, and its buffer holds the
    teacher outputs instead: ``expert`` under ``inputs: merged``, ``merged`` under
    ``inputs: expert``.
    """

    merged: Stream
    expert: Stream
    contexts: List[List[BatchContext]]  # masks and positions of every batch
    batch_counts: List[int]  # every expert's number of batches, owned here or not
    heldout: Optional[Heldout] = None  # the held-out prompts' streams

    def saved(self) -> List[Stream]:
        """Every stream, in the order the progress files keep them."""
        h = self.heldout
        return [self.merged, self.expert] + ([h.merged, h.task_arithmetic, h.expert] if h else [])

    def roles(self, inputs: str):
        """(student inputs, teacher inputs, where the teacher outputs go)."""
        if inputs == "dual":
            return self.merged, self.expert, self.expert  # each batch read before written
        if inputs == "merged":
            return self.merged, self.merged, self.expert
        return self.expert, self.expert, self.merged

    def advance(self, inputs: str) -> None:
        """After an ``inputs: expert`` block the teacher outputs are the expert stream."""
        if inputs == "expert":
            self.merged, self.expert = self.expert, self.merged


def forward_batches(runner: BlockRunner, index: int, layer, weights: List[Weights],
                    inputs: Stream, contexts, outputs: Optional[Stream] = None,
                    targets: Optional[Stream] = None) -> List[List[float]]:
    """Every batch of every expert through block ``index`` (expert i with ``weights[i]``),
    without gradients. Results go to ``outputs`` (which may be ``inputs``: each batch is
    read before it is overwritten). With ``targets``, returns per expert its distillation
    loss summed over real tokens, and their number (:func:`mean_loss` averages them)."""
    per_expert = []
    with torch.no_grad():
        for i, (w, ctxs) in enumerate(zip(weights, contexts)):
            total, tokens = 0.0, 0
            for b, ctx in enumerate(ctxs):
                x = on_device(inputs[i][b], runner.device)
                out = runner.forward(index, layer, w, x, ctx)
                if targets is not None:
                    n = int(ctx.token_mask.sum())
                    total += float(masked_mse(out, on_device(targets[i][b], runner.device),
                                              ctx.token_mask)) * n
                    tokens += n
                if outputs is not None:
                    outputs[i][b].copy_(out)
            per_expert.append([total, tokens])
    return per_expert


def mean_loss(per_expert: List[List[float]], world: World) -> float:
    """The loss per real token of each expert (over every process), averaged over experts."""
    losses = [total / max(tokens, 1) for total, tokens in world.sum_by_expert(per_expert)]
    return sum(losses) / len(losses)


def distill_block(runner: BlockRunner, index: int, base_w: Weights,
                  expert_blocks: Iterable[Weights], streams: Streams, p, epochs: int,
                  generator: torch.Generator, precision: Precision, world: World = SINGLE,
                  on_epoch=None):
    """Merge block ``index``: returns its weights as written (the output dtype, own
    parameter names) and its report. ``expert_blocks`` yields each owned expert's block in
    turn, so that only one is in memory; the streams advance past the block."""
    started = time.time()
    layer = runner.layer(index)
    dtype = precision.compute
    student, teacher, targets = streams.roles(p.inputs)
    contexts = streams.contexts
    n = len(contexts)

    held = streams.heldout

    def evaluated(coeffs):
        """The block as written (the output dtype), the same in the compute dtype, and
        its loss on the student stream."""
        final = written_weights(base_w, deltas, coeffs, precision, world)
        block_w = cast(final, dtype)
        return final, block_w, mean_loss(forward_batches(
            runner, index, layer, [block_w] * n, student, contexts, targets=targets), world)

    # 1. The teacher outputs never change during training: compute them once.
    deltas = []
    for i, expert_w in enumerate(expert_blocks):
        own = cast(expert_w, dtype)
        forward_batches(runner, index, layer, [own], [teacher[i]], [contexts[i]], [targets[i]])
        if held:
            forward_batches(runner, index, layer, [own], [held.expert[i]], [held.contexts[i]],
                            [held.expert[i]])
        deltas.append({name: precision.task_vector(expert_w[name], base_w[name])
                       for name in base_w})
        del expert_w, own  # the block holds its memory-mapped shard's pages

    # 2. The loss to beat: task arithmetic as written, every coefficient at init.
    init = [{name: torch.tensor(p.init) for name in base_w}] * n
    _, init_w, loss_before = evaluated(init)
    held_before = held_loss(runner, index, layer, init_w, held, world)
    if held:
        forward_batches(runner, index, layer, [init_w] * n, held.task_arithmetic,
                        held.contexts, held.task_arithmetic)
    del init_w

    # 3. Train the coefficients.
    epoch_losses = []

    def record(epoch, loss):
        del epoch_losses[epoch:]  # a retry trains the block again from its first epoch
        epoch_losses.append(loss)
        if on_epoch:
            on_epoch(epoch, loss)

    def loss_of(weights, i, b):
        ctx = contexts[i][b]
        out = runner.forward(index, layer, weights, on_device(student[i][b], runner.device),
                             ctx)
        target = on_device(targets[i][b], runner.device)
        return masked_mse(out, target, ctx.token_mask) * ctx.share

    early = EarlyStop(p.patience, max(streams.batch_counts),
                      lambda weights: held_loss(runner, index, layer, weights, held, world))
    coeffs, small_share = fit(base_w, deltas, p, epochs, streams.batch_counts, loss_of,
                              dtype, generator, f"block {index}", on_epoch=record,
                              world=world, stop=early if held and p.patience else None)

    # 4. Evaluate exactly the block that is written. A block never ends worse than the
    #    task arithmetic it started from: on the held-out prompts where there are some
    #    (the calibration prompts are the ones it was fitted to), else on those.
    final, block_w, loss_after = evaluated(coeffs)
    held_after = held_loss(runner, index, layer, block_w, held, world)
    judged = "held-out" if held else "calibration"
    before, after = (held_before, held_after) if held else (loss_before, loss_after)
    kept = not after <= before
    if kept:
        LOG.warning("block %d: training raised the loss on the %s prompts (%.4g -> %.4g); "
                    "keeping task arithmetic for this block (lower 'lr' or raise 'shots' "
                    "if this recurs)", index, judged, before, after)
        coeffs = at_init(coeffs, p.init)
        final, block_w, loss_after = evaluated(coeffs)
        held_after = held_before

    # 5. Advance the merged stream through exactly the weights just written.
    if p.inputs != "expert":
        forward_batches(runner, index, layer, [block_w] * n, student, contexts, student)
    if held:
        forward_batches(runner, index, layer, [block_w] * n, held.merged, held.contexts,
                        held.merged)
    streams.advance(p.inputs)
    report = {"block": index, "loss_before": loss_before, "loss_after": loss_after,
              "heldout_loss_before": held_before, "heldout_loss_after": held_after,
              "kept_task_arithmetic": kept, "epoch_losses": epoch_losses,
              "heldout_checks": early.losses,
              **gathered_stats(coeffs, world), "small_gradient_share": small_share}
    LOG.info("block %d: loss %.4g -> %.4g", index, loss_before, loss_after)
    return final, report | {"seconds": time.time() - started}


class EarlyStop:
    """Ends a block's training once its loss on the held-out prompts has not improved by
    MIN_GAIN for ``patience`` checks in a row; it is checked every CHECK_STEPS optimiser
    steps (rounded to whole epochs of ``steps_per_epoch``)."""

    CHECK_STEPS = 10
    MIN_GAIN = 0.01  # relative

    def __init__(self, patience: int, steps_per_epoch: int, loss_of):
        self.patience, self.loss_of = patience, loss_of
        self.every = max(1, round(self.CHECK_STEPS / steps_per_epoch))
        self.losses: List[float] = []  # every check's held-out loss
        self.best, self.waited, self.epoch = float("inf"), 0, 0

    def __call__(self, epoch: int, weights) -> bool:
        if epoch <= self.epoch:  # a retry after a non-finite loss trains from the start
            self.losses.clear()
            self.best, self.waited = float("inf"), 0
        self.epoch = epoch
        if epoch % self.every:
            return False
        loss = self.loss_of(weights)
        self.losses.append(loss)
        if loss < self.best * (1 - self.MIN_GAIN):
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


def held_loss(runner, index, layer, block_w, held: Optional[Heldout], world) -> Optional[float]:
    """The block's loss on the held-out prompts' merged stream against the experts'
    outputs there (already computed), weighted as the training loss; None without
    held-out prompts."""
    if not held:
        return None
    return mean_loss(forward_batches(runner, index, layer, [block_w] * len(held.contexts),
                                     held.merged, held.contexts, targets=held.expert), world)


def cast(weights: Weights, dtype: torch.dtype) -> Weights:
    return {name: t.to(dtype) for name, t in weights.items()}


@contextlib.contextmanager
def denormals_flushed(enabled: bool):
    """Flush subnormal floats to zero while training.

    Tiny activations and task-vector products become subnormal, which makes CPU kernels
    many times slower (24x on the tiny test merge) and carries no signal for the
    coefficients. Untrained merges keep exact IEEE arithmetic, so that they equal
    mergekit's task arithmetic bit for bit.
    """
    if not enabled:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
