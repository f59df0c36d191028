"""One ProDistill merge, from the recipe to the published output folder.

Each step is a call into the module that does that job; read this file top to bottom to
follow a merge. Everything below it imports downwards, and mergekit's ``MergeOptions``
stops here except where it is handed back to mergekit (model folders, the output's
config and tokenizer) or mirrors mergekit's flags (the plan).

1. the recipe, and every check that reads no weight (``recipe``, ``preflight``);
2. the merged vocabulary (``vocab``);
3. the calibration prompts, read and tokenised once (``calibration``);
4. the plan: where every tensor lives, in which dtype, and whether it fits (``plan``);
5. the staging folder and the saved progress of an interrupted run (``progress``);
6. each expert's greedy continuation of its prompts (``continuation``);
7. the embeddings, then every decoder block (``distill``), then the final norm and LM
   head (``head``), each unit saved as it is finished;
8. the shards, config, tokenizer, model card and report, moved into place (``output``).
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import tqdm
from mergekit.common import dtype_from_name
from mergekit.io import TensorWriter
from mergekit.io.tasks import LoaderCache

from mergekit_prodistill import (calibration, continuation, devices, distill, dtypes, head,
                                 output, plan, preflight)
from mergekit_prodistill.activations import ActivationStore
from mergekit_prodistill.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.errors import Interrupted
from mergekit_prodistill.progress import Progress, UnitWriter, fingerprint
from mergekit_prodistill.quiet import honours_quiet
from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.report import Report
from mergekit_prodistill.vocab import Vocabulary, build_vocabulary
from mergekit_prodistill.weights import ModelTensors, check_shape, task_arithmetic

LOG = logging.getLogger("mergekit_prodistill")


@dataclass(frozen=True)
class Context:
    """What the run takes from the command line besides the recipe."""

    device: torch.device
    seed: int
    trust_remote_code: bool
    quiet: bool

    @classmethod
    def of(cls, options) -> "Context":
        seed = options.random_seed if options.random_seed is not None else 0
        return cls(torch.device(options.device or "cpu"), seed, options.trust_remote_code,
                   options.quiet)


@honours_quiet
def run_prodistill(merge_config, out_path: str, options, config_source: str = None):
    """Merge the recipe's experts into its base with ProDistill and write ``out_path``."""
    started = time.time()
    ctx = Context.of(options)
    # 1. The recipe, and every check that reads no weight.
    recipe = parse_recipe(merge_config)
    p = recipe.params
    checked = preflight.check_before_merge(recipe, merge_config, options, out_path)
    # 2. The merged vocabulary.
    vocabulary = build_vocabulary(recipe, merge_config, ctx.trust_remote_code,
                                  checked.vocabulary_rows)
    # 3. The calibration prompts, read and tokenised once; every prompt token must have a
    #    row in the merged vocabulary.
    calib = calibration.load_for_experts(recipe, ctx.trust_remote_code, ctx.seed)
    vocabulary.calibration_ids(calib)
    # 4. The plan, checked against the memory free now, before any weight is read.
    decided = plan.check_fits(recipe, options, out_path, calib)

    LoaderCache().setup(options=options)
    module = checked.module
    base = ModelTensors(recipe.base, recipe.dtype, str(ctx.device))
    experts = [ModelTensors(e.model, recipe.dtype, str(ctx.device)) for e in recipe.experts]
    out_dtype = recipe.out_dtype or recipe.dtype
    facts = {"activation_dtype": decided.dtypes["cache"],
             "epochs": p.epochs_for(max(len(b) for b in calib.batches))} if p.epochs else {}

    # 5. The staging folder; with training, the progress a resumed run continues from.
    # Without training the merge is streaming task arithmetic: nothing worth resuming.
    created_out = not os.path.exists(out_path)
    staging = output.start_staging(out_path)
    writer = TensorWriter(staging, max_shard_size=options.out_shard_size,
                          safe_serialization=options.safe_serialization)
    progress = None
    if p.epochs:
        progress = Progress(staging, fingerprint(
            repr(merge_config),  # to_yaml() refuses recipes that share YAML anchors
            {"seed": ctx.seed, "device": ctx.device.type, "dtype": recipe.dtype},
            [f for files in checked.models.values() for f in files.shards],
            calib.batches,
        ))
    resumed = progress.restore_or_reset() if progress else None
    units = UnitWriter(writer, progress)
    merger = Merger(recipe, module, base, experts, vocabulary, units,
                  dtype_from_name(out_dtype) if out_dtype else None, ctx)
    try:
        # 6. Each expert's continuation of its prompts, generated once and saved.
        if progress is not None and p.continue_tokens:
            continued = time.time()
            calib = _continued(recipe, checked, calib, ctx, progress)
            facts["continuation_seconds"] = time.time() - continued
        # 7. The embeddings, every decoder block, the final norm and LM head.
        with distill.denormals_flushed(bool(p.epochs)):
            if p.epochs:
                report_blocks, head_report = merger.trained(
                    calib, decided, resumed, progress)
            else:
                report_blocks, head_report = merger.task_arithmetic(), None
        units.finalize(["pre", *(f"block-{i}" for i in range(module.num_layers())), "post"])
        # 8. The output, moved into place once complete.
        report = Report.of_run(recipe, config_source or merge_config.to_yaml(), calib,
                               vocabulary.summary, report_blocks, head_report, seed=ctx.seed,
                               device=ctx.device, started=started, **facts)
        output.finish(staging, out_path, merge_config, checked.arch_info, options, vocabulary,
                      report)
    except BaseException as exc:
        # Saved continuations alone are kept when the run was stopped, not when it failed:
        # a failure is usually fixed by changing the recipe, which voids them.
        resumable = progress is not None and (progress.has_progress() or (
            isinstance(exc, KeyboardInterrupt) and progress.has_continuations()))
        if not resumable:  # nothing worth keeping: leave no trace
            output.discard(staging, out_path, created_out)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(
                "interrupted; run the same command again to continue from the last "
                f"finished block (progress is kept in {staging})" if resumable else
                "interrupted; nothing was written"
            ) from None
        raise
    shutil.rmtree(staging)


def _continued(recipe, checked, calib, ctx: Context, progress: Progress):
    """Every expert's prompts, each followed by its greedy continuation, generated in the
    dtype the merge reads the expert in.

    Generated once, one expert at a time, and saved in the progress folder: a run that
    continues this merge reads them back instead of generating them again.
    """
    sequences = progress.load_continuations()
    if sequences is None:
        sequences = []
        for expert, tokenizer, prompts in zip(recipe.experts, calib.tokenizers,
                                              calib.sequences):
            files = checked.models[expert.model]
            dtype = dtypes.read_dtype(recipe, expert.model, files.config)
            sequences.append(continuation.continue_prompts(
                files.folder, prompts, recipe.params.continue_tokens, tokenizer,
                dtype=dtype, device=ctx.device, free=devices.free_memory(ctx.device),
                trust_remote_code=ctx.trust_remote_code))
        progress.save_continuations(sequences)
    return calib.with_sequences(sequences, recipe.params.batch_size)


@dataclass
class Merger:
    """The models being merged, read tensor by tensor, and where merged tensors go."""

    recipe: object
    module: object  # mergekit's configured architecture module of the base
    base: ModelTensors
    experts: List[ModelTensors]
    vocabulary: Vocabulary
    units: UnitWriter
    out_dtype: Optional[torch.dtype]
    ctx: Context

    def held(self, weight) -> bool:
        return self.base.has(weight) or any(e.has(weight) for e in self.experts)

    def present(self, weight) -> bool:
        """Optional tensors no model holds (e.g. Granite's biases) are skipped, as mergekit
        skips them."""
        return not weight.optional or self.held(weight)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.units.save_tensor(name, tensor.to(self.out_dtype) if self.out_dtype else tensor)

    def merge_tensor(self, weight):
        """One tensor by task arithmetic, written; returns it and the experts' tensors."""
        init = torch.tensor(self.recipe.params.init, dtype=torch.float32)
        merged, expert_ts = task_arithmetic(weight, self.base, self.experts,
                                            self.vocabulary.align, init)
        self.write(weight.name, merged)
        return merged, expert_ts

    def task_arithmetic(self) -> list:
        """Every tensor with lambda = init, streamed to the output (``epochs: 0``)."""
        for weights in (self.module.pre_weights(),
                        *(self.module.layer_weights(i) for i in range(self.module.num_layers())),
                        self.module.post_weights()):
            for weight in filter(self.present, weights):
                self.merge_tensor(weight)
        return []

    def trained(self, calib, decided, resumed, progress: Progress):
        """Embeddings by task arithmetic, every block distilled, the head trained or merged
        by task arithmetic; returns the blocks' reports and the head's (or None)."""
        p, device = self.recipe.params, self.ctx.device
        runner = BlockRunner(self.module.config, device, self.ctx.trust_remote_code)
        store = ActivationStore(calib.shapes(), self.module.config.hidden_size,
                                dtype_from_name(decided.dtypes["cache"]),
                                decided.placement, device, decided.activation_dir)
        streams = distill.Streams(store.allocate("merged"), store.allocate("expert"), [])
        blocks_done = resumed["blocks_done"] if resumed else 0
        reports = resumed["report_blocks"] if resumed else []
        generator = torch.Generator().manual_seed(self.ctx.seed)
        if resumed:
            progress.load_streams([streams.merged, streams.expert], generator)
        else:
            self._embeddings(runner, calib, streams)
        dtype = streams.merged[0][0].dtype
        streams.contexts = [[runner.context(b, dtype) for b in batches]
                            for batches in calib.batches]
        epochs = p.epochs_for(max(len(b) for b in calib.batches))

        bar = tqdm.tqdm(total=self.module.num_layers(), initial=blocks_done,
                        desc="ProDistill blocks", disable=self.ctx.quiet)
        for index in range(blocks_done, self.module.num_layers()):
            infos = [w for w in self.module.layer_weights(index) if self.present(w)]
            names = layer_weight_names(runner.layer(index), [w.name for w in infos])
            base_w = {names[n]: t for n, t in self.base.load_all(infos).items()}
            final, report = distill.distill_block(
                runner, index, base_w, self._expert_blocks(infos, names, base_w), streams,
                p, epochs, generator, on_epoch=lambda epoch, loss: bar.set_postfix(
                    block=index, epoch=epoch + 1, loss=f"{loss:.3g}"))
            for full_name, own_name in names.items():
                self.write(full_name, final[own_name])
            self.units.end_unit(f"block-{index}")
            reports.append(report)
            progress.save_state(index + 1, [streams.merged, streams.expert], generator, reports)
            bar.set_postfix(block=index, loss=f"{report['loss_before']:.3g}->"
                            f"{report['loss_after']:.3g}")
            bar.update()
            del base_w, final
        bar.close()
        return reports, self._final(streams, runner, generator)

    def _expert_blocks(self, infos, names, base_w):
        """Each expert's block in turn, under the block module's parameter names."""
        for expert in self.experts:
            block = {names[n]: t for n, t in expert.load_all(infos).items()}
            for name in block:
                check_shape(name, base_w[name], block[name], expert.model)
            yield block
            del block  # before the next expert's block is read

    def _embeddings(self, runner: BlockRunner, calib, streams) -> None:
        """Merge the embeddings; the merged rows start the merged stream and each expert's
        own rows its stream (the same prompts, as ids of the merged vocabulary and of the
        expert's own), through the model's own embedding module, so that a family's
        scaling (Gemma, Granite) is applied."""
        merged_ids = self.vocabulary.calibration_ids(calib)
        for weight in filter(self.present, self.module.pre_weights()):
            merged, expert_ts = self.merge_tensor(weight)
            if weight.vocabulary_axis == 0:
                for i, batches in enumerate(calib.batches):
                    for b, batch in enumerate(batches):
                        streams.merged[i][b].copy_(runner.embed(merged, merged_ids[i][b]))
                        streams.expert[i][b].copy_(runner.embed(expert_ts[i], batch.input_ids))
            del merged, expert_ts
        self.units.end_unit("pre")

    def _final(self, streams, runner, generator) -> Optional[dict]:
        """The final norm and LM head: trained with ``head_epochs``, else task arithmetic."""
        p, trained, report = self.recipe.params, {}, None
        post = self.module.post_weights()
        if p.head_epochs:
            norm_w, head_w, untied = head.find_norm_and_head(
                self.module.pre_weights(), post, self.held)
            trained, report = head.train_head(
                norm_w, head_w, untied, self.base, self.experts, self.vocabulary.align,
                streams, streams.contexts, self.module.config, p, generator, self.ctx.device)
        for weight in filter(self.present, post):
            if weight.name in trained:
                self.write(weight.name, trained[weight.name])
            else:
                self.merge_tensor(weight)
        self.units.end_unit("post")
        return report
