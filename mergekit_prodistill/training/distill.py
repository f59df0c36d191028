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
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from mergekit_prodistill.models.blocks import BatchContext, BlockRunner
from mergekit_prodistill.models.dtypes import Precision
from mergekit_prodistill.parallel import SINGLE, World
from mergekit_prodistill.training.activations import on_device
from mergekit_prodistill.training.coefficients import (EpochLosses, MergedPart, Weights, at_init,
                                                       fit, gathered_stats, masked_mse,
                                                       mean_over_experts, written_weights)
from mergekit_prodistill.training.early_stop import EarlyStop
from mergekit_prodistill.training.fidelity import Heldout

LOG = logging.getLogger("mergekit_prodistill")

Stream = List[List[torch.Tensor]]  # [expert][batch] -> [batch, length, width]


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

    def hidden_states(self, layout) -> "Streams":
        """These streams' hidden states alone (``layout``: what else a batch carries)."""
        def hidden(stream):
            return [[layout.hidden_of(batch) for batch in batches] for batches in stream]
        h = self.heldout
        held = dataclasses.replace(h, merged=hidden(h.merged), expert=hidden(h.expert),
                                   task_arithmetic=hidden(h.task_arithmetic)) if h else None
        return dataclasses.replace(self, merged=hidden(self.merged), expert=hidden(self.expert),
                                   heldout=held)

    def roles(self, inputs: str):
        """(student inputs, teacher inputs, where the teacher outputs go)."""
        if inputs == "dual":
            return self.merged, self.expert, self.expert  # each batch read before written
        if inputs == "merged":
            return self.merged, self.merged, self.expert
        return self.expert, self.expert, self.merged

    def advance(self, block: "Block", block_w: Weights, inputs: str) -> None:
        """The merged streams (the held-out prompts' too) through the block with
        ``block_w``. After an ``inputs: expert`` block the teacher outputs are the expert
        stream."""
        if inputs != "expert":
            block.advance(block_w, self.merged, self.contexts)
        if self.heldout:
            block.advance(block_w, self.heldout.merged, self.heldout.contexts)
        if inputs == "expert":
            self.merged, self.expert = self.expert, self.merged


@dataclass(frozen=True)
class Block:
    """The decoder block being merged, and what every pass through it needs: the runner,
    the block's index and weightless module (``layer``), the precision (passes compute in
    ``precision.compute``) and the world whose experts its losses average over."""

    runner: BlockRunner
    index: int
    layer: torch.nn.Module
    precision: Precision
    world: World = SINGLE

    @classmethod
    def of(cls, runner: BlockRunner, index: int, precision: Precision,
           world: World = SINGLE) -> "Block":
        return cls(runner, index, runner.layer(index), precision, world)

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.compute

    def merged_part(self, base_w: Weights, deltas: List[Weights]) -> MergedPart:
        """What :func:`fit` trains: the block's coefficients for these task vectors."""
        return MergedPart(f"block {self.index}", base_w, deltas, self.dtype, self.world)

    def run(self, weights: Weights, stream: torch.Tensor, context: BatchContext, stored=None):
        """One stream batch (on any device) through the block with ``weights``: its output
        hidden states (and in ``stored``, the keys and values it keeps for later blocks)."""
        return self.runner.forward(self.index, self.layer, weights,
                                   on_device(stream, self.runner.device), context, stored)

    def target(self, stream: Stream, i: int, b: int) -> torch.Tensor:
        """The hidden states of expert i's batch b of ``stream``, on the device."""
        return on_device(self.runner.layout.hidden_of(stream[i][b]), self.runner.device)

    def forward(self, weights: List[Weights], inputs: Stream, contexts,
                outputs: Optional[Stream] = None,
                targets: Optional[Stream] = None) -> List[List[float]]:
        """Every batch of every expert through the block (expert i with ``weights[i]``),
        without gradients. Results go to ``outputs`` (which may be ``inputs``: each batch
        is read before it is overwritten). With ``targets``, returns per expert its
        distillation loss summed over real tokens, and their number."""
        per_expert = []
        with torch.no_grad():
            for i, (w, batch_contexts) in enumerate(zip(weights, contexts)):
                total, tokens = 0.0, 0
                for b, context in enumerate(batch_contexts):
                    stored = {}
                    out = self.run(w, inputs[i][b], context, stored)
                    if targets is not None:
                        n = int(context.token_mask.sum())
                        total += float(masked_mse(out, self.target(targets, i, b),
                                                  context.token_mask)) * n
                        tokens += n
                    if outputs is not None:
                        self.runner.layout.write(outputs[i][b], inputs[i][b], out, stored,
                                                 self.index)
                per_expert.append([total, tokens])
        return per_expert

    def loss(self, block_w: Weights, inputs: Stream, contexts, targets: Stream) -> float:
        """The distillation loss of ``block_w`` on every batch, averaged over experts."""
        return mean_over_experts(self.forward([block_w] * len(contexts), inputs, contexts,
                                              targets=targets), self.world)

    def advance(self, block_w: Weights, stream: Stream, contexts) -> None:
        """``stream`` through the block with ``block_w``, in place."""
        self.forward([block_w] * len(contexts), stream, contexts, stream)

    def loss_of(self, inputs: Stream, targets: Stream, contexts):
        """The training loss of owned expert i's batch b, for :func:`fit`: a batch split
        over processes counts its rows' share."""
        def loss_of(weights, i, b):
            context = contexts[i][b]
            out = self.run(weights, inputs[i][b], context)
            return masked_mse(out, self.target(targets, i, b), context.token_mask) * context.share
        return loss_of


def distill_block(block: Block, base_w: Weights, expert_blocks: Iterable[Weights],
                  streams: Streams, p, epochs: int, generator: torch.Generator,
                  on_epoch=None):
    """Merge the block: returns its weights as written (the output dtype, own parameter
    names) and its report. ``expert_blocks`` yields each owned expert's block in turn, so
    that only one is in memory; the streams advance past the block."""
    started = time.time()
    student, _, targets = streams.roles(p.inputs)
    contexts, held = streams.contexts, streams.heldout

    def evaluated(coeffs):
        """The block as written, the same in the compute dtype, and its loss."""
        final = written_weights(base_w, deltas, coeffs, block.precision, block.world)
        block_w = cast(final, block.dtype)
        return final, block_w, block.loss(block_w, student, contexts, targets)

    # 1. The teacher outputs never change during training: compute them once.
    deltas = teacher_outputs(block, base_w, expert_blocks, streams, p.inputs)

    # 2. The loss to beat: task arithmetic as written, every coefficient at init.
    _, init_w, loss_before = evaluated([{name: torch.tensor(p.init) for name in base_w}]
                                       * len(contexts))
    held_before = held_loss(block, init_w, held)
    if held:
        block.advance(init_w, held.task_arithmetic, held.contexts)
    del init_w

    # 3. Train the coefficients.
    losses = EpochLosses(on_epoch)
    early = EarlyStop(p.patience, max(streams.batch_counts),
                      lambda weights: held_loss(block, weights, held))
    coeffs, small_share = fit(block.merged_part(base_w, deltas), p, epochs, streams.batch_counts,
                              block.loss_of(student, targets, contexts), generator,
                              losses, early if held and p.patience else None)

    # 4. Evaluate exactly the block that is written. A block never ends worse than the
    #    task arithmetic it started from: on the held-out prompts where there are some
    #    (the calibration prompts are the ones it was fitted to), else on those.
    final, block_w, loss_after = evaluated(coeffs)
    held_after = held_loss(block, block_w, held)
    judged = "held-out" if held else "calibration"
    before, after = (held_before, held_after) if held else (loss_before, loss_after)
    kept = not after <= before
    if kept:
        LOG.warning("block %d: training raised the loss on the %s prompts (%.4g -> %.4g); "
                    "keeping task arithmetic for this block (lower 'lr' or raise 'shots' "
                    "if this recurs)", block.index, judged, before, after)
        coeffs = at_init(coeffs, p.init)
        final, block_w, loss_after = evaluated(coeffs)
        held_after = held_before

    # 5. Advance the merged stream through exactly the weights just written.
    streams.advance(block, block_w, p.inputs)
    report = {"block": block.index, "loss_before": loss_before, "loss_after": loss_after,
              "heldout_loss_before": held_before, "heldout_loss_after": held_after,
              "kept_task_arithmetic": kept, "epoch_losses": losses.losses,
              "heldout_checks": early.losses,
              **gathered_stats(coeffs, block.world), "small_gradient_share": small_share}
    LOG.info("block %d: loss %.4g -> %.4g", block.index, loss_before, loss_after)
    return final, report | {"seconds": time.time() - started}


def teacher_outputs(block: Block, base_w: Weights, expert_blocks: Iterable[Weights],
                    streams: Streams, inputs: str) -> List[Weights]:
    """Each owned expert's block on its teacher inputs, into the teacher outputs (and on
    its held-out prompts, in place); returns the experts' task vectors."""
    _, teacher, targets = streams.roles(inputs)
    contexts, held = streams.contexts, streams.heldout
    deltas = []
    for i, expert_w in enumerate(expert_blocks):
        own = cast(expert_w, block.dtype)
        block.forward([own], [teacher[i]], [contexts[i]], [targets[i]])
        if held:
            block.forward([own], [held.expert[i]], [held.contexts[i]], [held.expert[i]])
        deltas.append({name: block.precision.task_vector(expert_w[name], base_w[name])
                       for name in base_w})
        del expert_w, own  # the block holds its memory-mapped shard's pages
    return deltas


def held_loss(block: Block, block_w: Weights, held: Optional[Heldout]) -> Optional[float]:
    """The block's loss on the held-out prompts' merged stream against the experts'
    outputs there (already computed), weighted as the training loss; None without
    held-out prompts."""
    if not held:
        return None
    return block.loss(block_w, held.merged, held.contexts, held.expert)


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
