"""One ProDistill merge, from the recipe to the published output folder.

Each step is a call into the module that does that job; read this file top to bottom to
follow a merge. Everything below it imports downwards, and mergekit's ``MergeOptions``
stops here except where it is handed back to mergekit (model folders, the output's
config and tokenizer) or mirrors mergekit's flags (the plan). Launched by ``torchrun`` the
same steps run in every process, each with the experts it owns (``parallel``).

1. the recipe, and every check that reads no weight (``recipe``, ``preflight``);
2. the merged vocabulary (``vocab``);
3. the calibration prompts, read and tokenised once (``calibration``);
4. the plan: where every tensor lives, in which dtype, and whether it fits (``plan``);
5. the staging folder and the saved progress of an interrupted run (``progress``);
6. each expert's greedy continuation of its prompts (``continuation``);
7. the embeddings, then every decoder block (``distill``), then the final norm and LM
   head (``head``), each unit saved as it is finished (``merger``); the held-out prompts
   measure how much of each expert the merge kept (``fidelity``);
8. the shards, config, tokenizer, model card and report, moved into place (``output``).
"""

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from typing import Optional, Tuple

from mergekit.io import TensorWriter
from mergekit.io.tasks import LoaderCache

from mergekit_prodistill import parallel, preflight
from mergekit_prodistill.errors import Interrupted
from mergekit_prodistill.inputs import calibration, continuation, prompt_writing
from mergekit_prodistill.models import dtypes
from mergekit_prodistill.models.model_files import full_weights_folder
from mergekit_prodistill.models.vocab import build_vocabulary
from mergekit_prodistill.output import staging
from mergekit_prodistill.output.progress import Progress, UnitWriter, fingerprint
from mergekit_prodistill.output.report import Report
from mergekit_prodistill.plan import devices, fits
from mergekit_prodistill.plan.context import RunContext
from mergekit_prodistill.quiet import honours_quiet
from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.training import distill
from mergekit_prodistill.training.merger import Merger, training_epochs
from mergekit_prodistill.training.weights import ModelTensors

LOG = logging.getLogger("mergekit_prodistill")


def run_prodistill(merge_config, out_path: str, options, config_source: str = None):
    """Merge the recipe's experts into its base with ProDistill and write ``out_path``;
    under ``torchrun``, together with the other processes."""
    world = parallel.start(RunContext.of(options).device)
    if not world.leader:  # one set of progress bars: rank 0's
        options = options.model_copy(update={"quiet": True})
    try:
        _merge(merge_config, out_path, options, config_source, world)
    except BaseException as exc:
        # Leaving the group waits for its unfinished sums, which a dead peer never ends.
        parallel.stop(leave_group=False)
        if parallel.interrupted(exc) and not isinstance(exc, Interrupted):
            raise Interrupted("interrupted; nothing was written") from None  # before step 5
        raise
    parallel.stop()


@honours_quiet
def _merge(merge_config, out_path: str, options, config_source, world: parallel.World):
    started = time.time()
    ctx = RunContext.of(options).in_world(world)
    # 1. The recipe, and every check that reads no weight.
    recipe = parse_recipe(merge_config)
    p = recipe.params
    world = world.for_experts(len(recipe.experts))
    checked = preflight.check_before_merge(recipe, merge_config, options, out_path)
    # 2. The merged vocabulary.
    vocabulary = build_vocabulary(recipe, merge_config, ctx.trust_remote_code,
                                  checked.vocabulary_rows)
    # 3. The calibration prompts, read and tokenised once; every prompt token must have a
    #    row in the merged vocabulary.
    calib = calibration.load_for_experts(recipe, ctx.trust_remote_code, ctx.seed)
    for batches in (calib.batches, calib.holdout_batches):
        vocabulary.calibration_ids(batches, calib.sources)
    # 4. The plan, checked against the memory free now, before any weight is read (and
    #    whether batches split over processes that share an expert).
    decided = fits.check_fits(recipe, options, out_path, calib, world=world,
                              models=checked.models)
    world = world.with_timeout(devices.collective_timeout(decided))
    LoaderCache().setup(options=options)
    # Every model is read in the dtype it stores (dtypes.py).
    base = ModelTensors(recipe.base, None, str(ctx.device))
    experts = [ModelTensors(e.model, None, str(ctx.device)) for e in recipe.experts]
    precision = dtypes.Precision.of(decided.dtypes)
    facts = {"activation_dtype": decided.dtypes["cache"]} if p.epochs else {}
    facts["towers"] = checked.module.towers or None

    # 5. The staging folder; with training, the progress a resumed run continues from.
    # Rank 0 alone writes the output; the others save their own streams beside it.
    created_out = not os.path.exists(out_path)
    staging_dir = world.from_leader(lambda: staging.start_staging(out_path))
    writer = TensorWriter(staging_dir, max_shard_size=options.out_shard_size,
                          safe_serialization=options.safe_serialization) if world.leader else None
    # Without training the merge is streaming task arithmetic: nothing worth resuming.
    progress, resumed = _progress(staging_dir, merge_config, recipe, checked, calib, ctx,
                                  world) if p.epochs else (None, None)
    units = UnitWriter(writer, progress)
    merger = Merger(recipe, checked.module, base, experts, vocabulary, units, precision, ctx, world)
    with _staged(staging_dir, out_path, created_out, progress, world):
        # 6. Each expert's prompts, with those written for it, continued; generated once
        #    and saved.
        if progress is not None and (p.continue_tokens or p.written_prompts):
            continued = time.time()
            calib = _continued(recipe, checked, calib, ctx, options, progress, world)
            facts["continuation_seconds"] = time.time() - continued
        if p.epochs:  # the prompts actually written may change the planned epochs
            facts["epochs"] = training_epochs(p, calib, decided.epochs)
        # 7. The embeddings, every decoder block, the final norm and LM head.
        with distill.denormals_flushed(bool(p.epochs)), dtypes.fast_float32_matmuls(
                ctx.device, decided.dtypes["compute"]):
            results = (merger.trained(calib, decided, facts["epochs"], resumed, progress)
                       if p.epochs else merger.task_arithmetic())
        if world.leader:
            units.finalize(merger.unit_names())
            # 8. The output, moved into place once complete.
            report = Report.of_run(recipe, config_source or merge_config.to_yaml(), calib,
                                   vocabulary.summary, results, ctx, started,
                                   processes=world.size, **facts)
            staging.finish(staging_dir, out_path, merge_config, checked.arch_info, options,
                          vocabulary, report)
        world.barrier()  # every process keeps its streams until the output is complete


def _progress(staging_dir: str, merge_config, recipe, checked, calib, ctx: RunContext,
              world: parallel.World) -> Tuple[Progress, Optional[dict]]:
    """Where this merge saves its progress, and the state saved by an interrupted run of
    it (None if none). A run continues another only when the recipe, the settings, the
    checkpoints and the prompts are the same (its fingerprint)."""
    settings = {"seed": ctx.seed, "device": ctx.device.type, "dtype": recipe.dtype}
    if world.distributed:
        settings["processes"] = world.size
    progress = Progress(staging_dir, fingerprint(
        repr(merge_config),  # to_yaml() refuses recipes that share YAML anchors
        settings, [f for files in checked.models.values() for f in files.shards],
        [*calib.batches, *calib.holdout_batches],
    ), world)
    return progress, progress.restore_or_reset()


@contextlib.contextmanager
def _staged(staging_dir: str, out_path: str, created_out: bool,
            progress: Optional[Progress], world: parallel.World):
    """Steps 6 to 8 in the staging folder, which every process removes once they are done.
    When they fail, it is kept only where it holds what a rerun continues from; Ctrl-C
    ends in one line that says which."""
    try:
        yield
    except BaseException as exc:
        # Saved continuations alone are kept when the run was stopped (by the user, or by
        # another process's end), not when it failed: a failure is usually fixed by
        # changing the recipe, which voids them.
        signalled = parallel.interrupted(exc)
        stopped = signalled or isinstance(exc, parallel.PeerStopped)
        resumable = progress is not None and (progress.has_progress() or (
            stopped and progress.has_continuations()))
        if not resumable and world.leader:  # nothing worth keeping: leave no trace
            staging.discard(staging_dir, out_path, created_out)
        if signalled:
            raise Interrupted(
                "interrupted; run the same command again to continue from the last "
                f"finished block (progress is kept in {staging_dir})" if resumable else
                "interrupted; nothing was written"
            ) from None
        raise
    if world.leader:
        shutil.rmtree(staging_dir)
    world.barrier()
    # Nodes that do not share rank 0's disk hold their own processes' streams here.
    shutil.rmtree(staging_dir, ignore_errors=True)


def _continued(recipe, checked, calib, ctx: RunContext, options, progress: Progress,
               world: parallel.World):
    """Every expert's prompts, with those written for it (``written_prompts``), each
    followed by its greedy continuation, generated in the dtype the merge reads the expert
    in (a LoRA expert merged into its base).

    Generated once, one expert at a time (each process its own experts), and saved in the
    progress folder: a run that continues this merge reads them back instead of
    generating them again. Each expert is loaded once, to write and to continue; the base,
    where it writes, once for all of them.
    """
    p = recipe.params
    sequences = progress.load_continuations()
    if sequences is None:  # held-out prompts are continued too, after the others
        free = devices.free_memory(ctx.device, sharing=world.local_size)
        mine = list(world.owned(len(recipe.experts))) if world.contributes else []
        count = p.written_prompts
        offers = prompt_writing.base_offers(
            _loader(recipe, checked, recipe.base, ctx, options, free),
            {i: calib.sequences[i] for i in mine}, count, calib.tokenizers,
            ctx.seed) if count and mine else {}
        own = []
        # Processes that share an expert take its continuations from the first of them.
        for i in mine:
            real, held, tokenizer = calib.sequences[i], calib.holdout[i], calib.tokenizers[i]
            if not (p.continue_tokens or count):
                own.append(real + held)
                continue
            model = recipe.experts[i].model
            lengths = [len(s) for s in real + held] + [prompt_writing.longest(real)] * count
            load = _loader(recipe, checked, model, ctx, options, free)
            with load(lengths, p.continue_tokens, tokenizer) as m:
                written = prompt_writing.best(
                    [prompt_writing.offer(m, "expert", real, count, ctx.seed + i, tokenizer),
                     offers[i]], f"model {model}").prompts if count else []
                prompts = real + written + held
                own.append(continuation.continued_greedily(m, prompts, p.continue_tokens)
                           if p.continue_tokens else prompts)
        sequences = world.gather(own)
        progress.save_continuations(sequences)
    held = [len(h) for h in calib.holdout]
    extended = calib.with_sequences([s[:len(s) - h] for s, h in zip(sequences, held)],
                                    [s[len(s) - h:] for s, h in zip(sequences, held)],
                                    p.batch_size)
    return dataclasses.replace(extended, written=[
        len(s) - h - len(real) for s, h, real in zip(sequences, held, calib.sequences)])


def _generation_dtype(recipe, checked, model) -> str:
    files = checked.models[model]
    return dtypes.generation_dtype(recipe, dtypes.stored_dtype(model, files.config, files))


def _loader(recipe, checked, model, ctx: RunContext, options, free):
    """``load(lengths, max_new_tokens, tokenizer)``: ``model`` (the base or an expert)
    loaded whole for generation (:func:`continuation.loaded`), in the dtype the merge reads
    it in, from the memory ``free`` now."""
    return functools.partial(continuation.loaded, full_weights_folder(model, options),
                             dtype=_generation_dtype(recipe, checked, model),
                             device=ctx.device, free=free,
                             trust_remote_code=ctx.trust_remote_code)
