"""The merge's units in order: the embeddings, every decoder block, the final norm and head.

Each is read tensor by tensor from the models, merged (by task arithmetic, or trained by
:mod:`distill` and :mod:`head`) and handed to the unit writer as soon as it is finished, so
that a resumed run continues from the last finished unit. Without training every tensor
is task arithmetic, streamed to the output. Over several processes (:mod:`parallel`) each
trains with the experts it owns, and rank 0 alone writes.
"""

import logging
from dataclasses import dataclass, field
from typing import List

import torch
import tqdm
from mergekit.common import dtype_from_name

from mergekit_prodistill import layout
from mergekit_prodistill.models.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.models.dtypes import Precision
from mergekit_prodistill.models.vocab import Vocabulary
from mergekit_prodistill.output.progress import Progress, UnitWriter
from mergekit_prodistill.output.report import MergeResults
from mergekit_prodistill.parallel import World
from mergekit_prodistill.plan.context import RunContext
from mergekit_prodistill.training import distill, fidelity, head
from mergekit_prodistill.training.activations import ActivationStore
from mergekit_prodistill.training.coefficients import MergedPart, written_weights
from mergekit_prodistill.training.weights import ModelTensors, check_shape, task_arithmetic

LOG = logging.getLogger("mergekit_prodistill")

# The units, each saved on its own as soon as it is finished: the embeddings, each decoder
# block, then the final norm and LM head.
EMBEDDINGS_UNIT, HEAD_UNIT = "pre", "post"


def block_unit(index: int) -> str:
    return f"block-{index}"


@dataclass
class Merger:
    """The models being merged, read tensor by tensor, and where merged tensors go."""

    recipe: object
    module: object  # mergekit's configured architecture module of the base
    base: ModelTensors
    experts: List[ModelTensors]
    vocabulary: Vocabulary
    units: UnitWriter
    precision: Precision
    ctx: RunContext
    world: World
    # Where the streams were allocated: their disk-backed files go when training ends.
    stores: List[ActivationStore] = field(default_factory=list, init=False)

    @property
    def owned(self) -> range:
        return self.world.owned(len(self.experts))

    def held(self, weight) -> bool:
        return self.base.has(weight) or any(e.has(weight) for e in self.experts)

    def present(self, weight) -> bool:
        """Optional tensors no model holds (e.g. Granite's biases) are skipped, as mergekit
        skips them."""
        return not weight.optional or self.held(weight)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.world.leader:
            self.units.save_tensor(name, self.precision.written(tensor))

    def end_unit(self, unit: str) -> None:
        if self.world.leader:
            self.units.end_unit(unit)

    def unit_names(self) -> List[str]:
        """Every unit, in the order the output holds them."""
        return [EMBEDDINGS_UNIT, *map(block_unit, range(self.module.num_layers())), HEAD_UNIT]

    def merge_tensor(self, weight):
        """One tensor by task arithmetic, written; returns it and the experts' tensors."""
        init = torch.tensor(self.recipe.params.init, dtype=torch.float32)
        merged, expert_ts = task_arithmetic(weight, self.base, self.experts,
                                            self.vocabulary.align, init, self.precision)
        self.write(weight.name, merged)
        return merged, expert_ts

    def task_arithmetic(self) -> MergeResults:
        """Every tensor with lambda = init, streamed to the output (``epochs: 0``)."""
        if not self.world.leader:
            return MergeResults()
        for weights in (self.module.pre_weights(),
                        *(self.module.layer_weights(i) for i in range(self.module.num_layers())),
                        self.module.post_weights()):
            for weight in filter(self.present, weights):
                self.merge_tensor(weight)
        return MergeResults()

    def trained(self, calib, decided, epochs: int, resumed,
                progress: Progress) -> MergeResults:
        """Embeddings by task arithmetic, every block distilled for ``epochs``
        (:func:`training_epochs`), the head trained or merged by task arithmetic; returns
        the blocks' reports, the head's (or None) and the fidelity on held-out prompts (or
        None). Disk-backed streams are deleted when it ends, however it ends: a resumed run
        starts from the saved progress, not them."""
        try:
            return self._trained(calib, decided, epochs, resumed, progress)
        finally:
            for store in self.stores:
                store.remove_files()

    def _trained(self, calib, decided, epochs: int, resumed,
                 progress: Progress) -> MergeResults:
        p, device = self.recipe.params, self.ctx.device
        runner = BlockRunner(self.module.config, device)
        # Processes that share an expert each take some rows of its batches.
        whole, calib = calib, calib.rows(*self.world.part(len(self.experts)))
        streams = self._streams(calib, decided, runner.layout.width)
        blocks_done = resumed["blocks_done"] if resumed else 0
        reports = resumed["report_blocks"] if resumed else []
        generator = torch.Generator().manual_seed(self.ctx.seed)
        if resumed:
            progress.load_streams(blocks_done, streams.saved(), generator)
        else:
            self._embeddings(runner, calib, streams)
        dtype = self.precision.compute
        streams.contexts = self._contexts(runner, calib.batches, whole.batches, dtype)
        if streams.heldout:
            streams.heldout.contexts = self._contexts(runner, calib.holdout_batches,
                                                      whole.holdout_batches, dtype)
        bar = tqdm.tqdm(total=self.module.num_layers(), initial=blocks_done,
                        desc="ProDistill blocks", disable=self.ctx.quiet)
        for index in range(blocks_done, self.module.num_layers()):
            block = distill.Block.of(runner, index, self.precision, self.world)
            infos = [w for w in self.module.layer_weights(index) if self.present(w)]
            for weight in (w for w in infos if not runner.runs(w.name)):
                self.merge_tensor(weight)  # stored, but not loaded: task arithmetic
            infos = [w for w in infos if runner.runs(w.name)]
            names = layer_weight_names(block.layer, [w.name for w in infos])
            base_w = {names[n]: t for n, t in self.base.load_all(infos).items()}
            final, report = distill.distill_block(
                block, base_w, self._expert_blocks(infos, names, base_w), streams, p, epochs,
                generator, on_epoch=lambda epoch, loss: bar.set_postfix(
                    block=index, epoch=epoch + 1, loss=f"{loss:.3g}"))
            for full_name, own_name in names.items():
                self.write(full_name, final[own_name])
            self.end_unit(block_unit(index))
            reports.append(report)
            progress.save_state(index + 1, streams.saved(), generator, reports)
            bar.set_postfix(block=index, loss=f"{report['loss_before']:.3g}->"
                            f"{report['loss_after']:.3g}")
            bar.update()
            del base_w, final
        # The head reads the last block's hidden states alone.
        head_report, kept = self._final(streams.hidden_states(runner.layout), generator)
        if kept:
            bar.set_postfix_str(f"next-token choices kept: {fidelity.summary(kept)}")
        bar.close()
        return MergeResults(reports, head_report, kept)

    def _contexts(self, runner, batches, whole, dtype):
        """Masks and positions of the owned experts' batches, each with its share of its
        whole batch's tokens."""
        contexts = []
        for i in self.owned:
            contexts.append([])
            for batch, full in zip(batches[i], whole[i]):
                context = runner.context(batch.attention_mask, dtype)
                context.share = batch.num_tokens / full.num_tokens
                contexts[-1].append(context)
        return contexts

    def _streams(self, calib, decided, width: int) -> distill.Streams:
        """The owned experts' activation streams, ``width`` wide (``StreamLayout``), where
        and in the dtype the plan decided."""
        def store(holdout: bool):
            shapes = calib.shapes(holdout)
            self.stores.append(ActivationStore(
                [shapes[i] for i in self.owned], width, dtype_from_name(decided.dtypes["cache"]),
                decided.placement, self.ctx.device, decided.activation_dir))
            return self.stores[-1]

        def allocate(store, name):
            return store.allocate(layout.per_process(name, self.world.rank, self.world.size))

        training = store(False)
        streams = distill.Streams(allocate(training, "merged"), allocate(training, "expert"),
                                  [], [len(b) for b in calib.batches])
        if any(calib.holdout_batches):
            held = store(True)
            streams.heldout = fidelity.Heldout(
                allocate(held, "heldout-merged"), allocate(held, "heldout-task-arithmetic"),
                allocate(held, "heldout-expert"), [])
        return streams

    def _expert_blocks(self, infos, names, base_w):
        """Each owned expert's block in turn, under the block module's parameter names."""
        for expert in (self.experts[i] for i in self.owned):
            block = {names[n]: t for n, t in expert.load_all(infos).items()}
            for name in block:
                check_shape(name, base_w[name], block[name], expert.model)
            yield block
            del block  # before the next expert's block is read

    def _embeddings(self, runner: BlockRunner, calib, streams) -> None:
        """Merge the tensors before the blocks; the merged ones start the merged streams and
        each expert's own its streams (the same prompts, as ids of the merged vocabulary
        and of the expert's own), through the model's own modules (``BlockRunner.start``),
        so that a family's scaling (Gemma, Granite) and per-layer inputs are as its own."""
        h = streams.heldout
        starts = [(calib.batches, [streams.merged], streams.expert)]
        if h:
            starts.append((calib.holdout_batches, [h.merged, h.task_arithmetic], h.expert))
        inputs = {}  # the decoder's name -> the merged tensor and the experts'
        for weight in filter(self.present, self.module.pre_weights()):
            merged, expert_ts = self.merge_tensor(weight)
            own = runner.input_tensor(weight)
            if own:
                inputs[own] = (merged, expert_ts)
            del merged, expert_ts
        merged = {n: m for n, (m, _) in inputs.items()}
        for batches_per_expert, merged_streams, expert_stream in starts:
            ids = self.vocabulary.calibration_ids(batches_per_expert, calib.sources)
            for j, i in enumerate(self.owned):
                experts = {n: e[i] for n, (_, e) in inputs.items()}
                for b, batch in enumerate(batches_per_expert[i]):
                    start = runner.start(merged, ids[i][b])
                    for stream in merged_streams:
                        stream[j][b].copy_(start)
                    expert_stream[j][b].copy_(runner.start(experts, batch.input_ids))
        del inputs, merged
        self.end_unit(EMBEDDINGS_UNIT)

    def _final(self, streams, generator):
        """The final norm and LM head, trained with ``head_epochs``, else task arithmetic;
        then the fidelity on the held-out prompts, from ``streams``: the last block's
        hidden states. Returns the head's report and the fidelity (each None when not
        measured)."""
        p, post = self.recipe.params, self.module.post_weights()
        trained, report, kept = {}, None, None
        if p.head_epochs or streams.heldout:
            norm, lm_head, untied = head.find_norm_and_head(
                self.module.pre_weights(), post, self.held)
            base_w, deltas = head.load_norm_and_head(norm, lm_head, self.base, self.experts,
                                                     self.vocabulary.align, self.precision)
            deltas = [deltas[i] for i in self.owned]
            at_init = torch.tensor(p.init, dtype=torch.float32)
            task_arithmetic = written_weights(
                base_w, deltas, [{n: at_init for n in base_w}] * len(deltas), self.precision,
                self.world)
            final = task_arithmetic
            if p.head_epochs:
                part = MergedPart("final norm and LM head", base_w, deltas,
                                  self.precision.compute, self.world, () if untied else ("head",))
                final, report = head.train_head(part, streams, self.module.config, p, generator,
                                                self.ctx.device, self.precision)
                trained = {norm.name: final["weight"], **({lm_head.name: final["head"]}
                                                          if untied else {})}
            if streams.heldout:
                counts = fidelity.measure(
                    streams.heldout, head.HeadForward(self.module.config), base_w, deltas,
                    {"prodistill": final, "task_arithmetic": task_arithmetic}, self.ctx.device)
                kept = fidelity.results([str(e.model) for e in self.experts],
                                        self.world.sum_by_expert(counts))
                fidelity.warn_if_behind(kept)
            del base_w, deltas
        for weight in filter(self.present, post):
            if weight.name in trained:
                self.write(weight.name, trained[weight.name])
            elif self.world.leader:
                self.merge_tensor(weight)
        self.end_unit(HEAD_UNIT)
        return report, kept


def training_epochs(p, calib, planned: int) -> int:
    """Every block's epochs: the plan's, or with ``written_prompts``, those of the prompts
    actually written (the plan counts as many as asked for, and fewer may be kept)."""
    return p.epochs_for(*calib.steps(p.batch_size)) if p.written_prompts else planned
