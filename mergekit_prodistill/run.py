"""The merge from recipe to written model (temporary split; see distill.py)."""

import logging
import os
import shutil
import time
import torch
import tqdm
from mergekit.architecture import ConfiguredModelArchitecture, get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.io import TensorWriter
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions

from mergekit_prodistill import calibration, continuation, devices, head, output, plan, preflight
from mergekit_prodistill.activations import ActivationStore
from mergekit_prodistill.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.coefficients import coefficient_stats, merged_weights
from mergekit_prodistill.progress import Progress, UnitWriter, fingerprint
from mergekit_prodistill.recipe import ProDistillRecipe, parse_recipe
from mergekit_prodistill.errors import Interrupted, ProDistillError
from mergekit_prodistill.vocab import plan_vocabulary
from mergekit_prodistill.weights import ModelTensors, check_shape, merge

LOG = logging.getLogger("mergekit_prodistill")

# On a non-finite loss the block is trained again from init with the learning rate
# divided by LR_BACKOFF, at most MAX_RETRIES times.
MAX_RETRIES = 3
LR_BACKOFF = 10.0


from mergekit_prodistill.distill import (_cast, _evaluated, denormals_flushed, distill_block,
                                         run_block)


def run_prodistill(
    merge_config: MergeConfiguration,
    out_path: str,
    options: MergeOptions,
    config_source: str = None,
):
    """Merge the recipe's experts into its base with ProDistill and write ``out_path``."""
    started = time.time()
    recipe: ProDistillRecipe = parse_recipe(merge_config)
    p = recipe.params
    checked = preflight.check_before_merge(recipe, merge_config, options, out_path)
    vocabulary = plan_vocabulary(recipe, merge_config, options, checked.vocabulary_rows)
    seed = options.random_seed if options.random_seed is not None else 0
    calib = calibration.load_for_experts(recipe, options, seed)
    # Before any weight is read; the plan also decides where the activation streams go.
    fit = plan.check_fits(recipe, options, out_path, calib)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(options.device or "cpu")

    LoaderCache().setup(options=options)
    arch_info = get_architecture_info(merge_config, options)
    base_config = recipe.base.config(trust_remote_code=options.trust_remote_code)
    module = ConfiguredModelArchitecture(info=arch_info, config=base_config).get_module("default")
    num_layers = module.num_layers()
    for expert in recipe.experts:
        n = module.info.num_layers(expert.model.config(trust_remote_code=options.trust_remote_code))
        if n != num_layers:
            raise ProDistillError(
                f"model {expert.model} has {n} layers but the base model has {num_layers}"
            )

    base = ModelTensors(recipe.base, recipe.dtype, str(device))
    experts = [ModelTensors(e.model, recipe.dtype, str(device)) for e in recipe.experts]
    out_dtype = recipe.out_dtype or recipe.dtype
    cast_out = (lambda t: t.to(dtype_from_name(out_dtype))) if out_dtype else (lambda t: t)

    merged_ids = vocabulary.calibration_ids(calib)  # every prompt token has a merged row
    created_out = not os.path.exists(out_path)
    staging = output.start_staging(out_path)
    writer = TensorWriter(
        staging,
        max_shard_size=options.out_shard_size,
        safe_serialization=options.safe_serialization,
    )
    # With no training the merge is streaming task arithmetic: nothing worth resuming, and
    # no continuations to generate. The fingerprint covers the prompts before continuation.
    checkpoint = None
    if p.epochs:
        checkpoint = Progress(staging, fingerprint(
            repr(merge_config),  # to_yaml() refuses recipes that share YAML anchors
            {"seed": seed, "device": device.type, "dtype": recipe.dtype},
            [f for m in [base, *experts] for f in m.shard_files()],
            calib.batches,
        ))
    resumed = checkpoint.restore_or_reset() if checkpoint else None
    units = UnitWriter(writer, checkpoint)

    try:
        facts = {"activation_dtype": fit.dtypes["cache"],
                 "epochs": p.epochs_for(max(len(b) for b in calib.batches))} if p.epochs else {}
        if checkpoint is not None and p.continue_tokens:
            continued = time.time()
            calib = _continued(recipe, options, calib, device, checkpoint)
            merged_ids = vocabulary.calibration_ids(calib)
            facts["continuation_seconds"] = time.time() - continued
        with denormals_flushed(bool(p.epochs)):
            report_blocks, head_report = _merge(
                recipe, module, base, experts, calib, merged_ids, vocabulary, device,
                generator, units, cast_out, checkpoint, resumed, options, fit)
        units.finalize(["pre", *(f"block-{i}" for i in range(num_layers)), "post"])
        output.finish(
            staging, out_path, merge_config, arch_info, options, config_source, recipe,
            calib, report_blocks, started, device, vocabulary, head_report,
            facts=facts,
        )
    except BaseException as exc:
        # Saved continuations alone are kept when the run was stopped, not when it failed:
        # a failure is usually fixed by changing the recipe, which voids them.
        resumable = checkpoint is not None and (checkpoint.has_progress() or (
            isinstance(exc, KeyboardInterrupt) and checkpoint.has_continuations()))
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


def _continued(recipe, options, calib, device, checkpoint):
    """Every expert's prompts, each followed by its greedy continuation.

    Generated once, one expert at a time, and saved in the progress folder: a run that
    continues this merge reads them back instead of generating them again.
    """
    sequences = checkpoint.load_continuations()
    if sequences is None:
        sequences = []
        for expert, prompts in zip(recipe.experts, calib.sequences):
            tokenizer = calibration.load_tokenizer(expert.model, recipe.base,
                                                   options.trust_remote_code)
            free = devices.free_memory(device)
            sequences.append(continuation.continue_prompts(
                expert.model.local_path(cache_dir=options.transformers_cache), prompts,
                recipe.params.continue_tokens, tokenizer, dtype=recipe.dtype, device=device,
                free=free, trust_remote_code=options.trust_remote_code))
        checkpoint.save_continuations(sequences)
    return calib.with_sequences(sequences, recipe.params.batch_size)


def _merge(recipe, module, base, experts, calib, merged_ids, vocabulary, device, generator,
           units, cast_out, checkpoint, resumed, options, fit):
    """Merge every tensor in order; returns the per-block report and the head's (or None)."""
    p = recipe.params
    num_layers = module.num_layers()
    train = bool(p.epochs)
    init = [torch.tensor(p.init, dtype=torch.float32)] * len(experts)

    def task_arithmetic(weight):
        """Merge one non-block tensor with lambda = init; also return the inputs."""
        base_t = base.load(weight)
        expert_ts = [e.load(weight) for e in experts]
        base_a, aligned = vocabulary.align(weight, base_t, expert_ts)
        for e, t in zip(experts, aligned):
            check_shape(weight.name, base_a, t, e.model)
        merged = merge(base_a, [t - base_a for t in aligned], init).to(base_t.dtype)
        units.save_tensor(weight.name, cast_out(merged))
        return merged, expert_ts

    # Optional tensors no model holds (e.g. Granite's biases) are skipped, as mergekit does.
    present = lambda w: base.has(w) or any(e.has(w) for e in experts)  # noqa: E731

    # Embeddings: merged rows start z1, each expert's own rows start its z2 (the same
    # prompts, as ids of the merged vocabulary and of the expert's own), through the
    # model's own embedding, so that a family's scaling (Gemma, Granite) is applied.
    z1 = z2 = store = contexts = runner = None
    if train:
        runner = BlockRunner(module.config, device, options.trust_remote_code)
        hidden = module.config.hidden_size
        store = ActivationStore(calib.shapes(), hidden, dtype_from_name(fit.dtypes["cache"]),
                                fit.placement, device, fit.activation_dir)
        z1, z2 = store.allocate("z1"), store.allocate("z2")
    blocks_done = resumed["blocks_done"] if resumed else 0
    report_blocks = resumed["report_blocks"] if resumed else []
    if resumed:
        checkpoint.load_streams([z1, z2], generator)
    else:
        for weight in module.pre_weights():
            merged, expert_ts = task_arithmetic(weight)
            if train and weight.vocabulary_axis == 0:
                for i, batches in enumerate(calib.batches):
                    for b, batch in enumerate(batches):
                        z1[i][b].copy_(runner.embed(merged, merged_ids[i][b]))
                        z2[i][b].copy_(runner.embed(expert_ts[i], batch.input_ids))
            del merged, expert_ts
        units.end_unit("pre")
    if train:
        contexts = [[runner.context(b, z1[0][0].dtype) for b in batches]
                    for batches in calib.batches]

    progress = tqdm.tqdm(total=num_layers, initial=blocks_done, desc="ProDistill blocks",
                         disable=options.quiet)
    for index in range(blocks_done, num_layers):
        block_started = time.time()
        weight_infos = [w for w in module.layer_weights(index) if not w.optional or present(w)]
        if not train:
            for weight in weight_infos:
                task_arithmetic(weight)
            units.end_unit(f"block-{index}")
            progress.update()
            continue

        layer = runner.layer(index)
        names = layer_weight_names(layer, [w.name for w in weight_infos])
        base_w = {names[n]: t for n, t in base.load_all(weight_infos).items()}
        compute_dtype = z1[0][0].dtype

        # Which stream feeds the student and the teacher (dual inputs unless ablated); the
        # teacher outputs go to the buffer the student does not read, in place.
        student = z1 if p.inputs in ("dual", "merged") else z2
        teacher = z2 if p.inputs in ("dual", "expert") else z1
        targets = z2 if student is z1 else z1
        # The teacher outputs never change during training: compute them once. They are
        # also the expert stream's next input.
        deltas = []
        for i, expert in enumerate(experts):
            expert_w = {names[n]: t for n, t in expert.load_all(weight_infos).items()}
            # No loop variable may outlive expert_w: any of its tensors keeps the whole
            # memory-mapped shard, every page read from it, in memory.
            for n in expert_w:
                check_shape(n, base_w[n], expert_w[n], expert.model)
            run_block(runner, index, layer, [_cast(expert_w, compute_dtype)], [teacher[i]],
                      [contexts[i]], [targets[i]])
            deltas.append({n: expert_w[n] - base_w[n] for n in base_w})
            del expert_w

        init_w = merged_weights(base_w, deltas, [{n: init[0] for n in base_w} for _ in deltas],
                                compute_dtype)
        loss_before = run_block(runner, index, layer, [init_w] * len(experts), student,
                                contexts, None, targets)
        del init_w

        epoch_losses = []

        def on_epoch(epoch, loss):
            del epoch_losses[epoch:]  # a retry trains the block again from its first epoch
            epoch_losses.append(loss)
            progress.set_postfix(block=index, epoch=epoch + 1, loss=f"{loss:.3g}")

        coeffs, small_share = distill_block(runner, index, layer, base_w, deltas, student,
                                            targets, contexts, p, generator, on_epoch)
        final, block_w, loss_after = _evaluated(runner, index, layer, base_w, deltas, coeffs,
                                                student, contexts, targets, compute_dtype)
        if not loss_after <= loss_before:
            # A block never ends worse on its calibration data than the task arithmetic it
            # started from (a too large lr, or a scalar coefficient that overshoots).
            LOG.warning("block %d: training raised the loss (%.4g -> %.4g); keeping task "
                        "arithmetic for this block (lower 'lr' if this recurs)",
                        index, loss_before, loss_after)
            coeffs = [{n: torch.full_like(t, p.init) for n, t in c.items()} for c in coeffs]
            final, block_w, loss_after = _evaluated(runner, index, layer, base_w, deltas,
                                                    coeffs, student, contexts, targets,
                                                    compute_dtype)
        for full_name, own_name in names.items():
            units.save_tensor(full_name, cast_out(final[own_name]))
        units.end_unit(f"block-{index}")

        # Advance the merged stream through exactly the weights just written.
        if p.inputs != "expert":
            run_block(runner, index, layer, [block_w] * len(experts), student, contexts, student)
        if p.inputs == "expert":
            z1, z2 = z2, z1  # the teacher outputs, in z1's buffer, are the next expert stream
        report_blocks.append({
            "block": index,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "epoch_losses": epoch_losses,
            **coefficient_stats(coeffs),
            "small_gradient_share": small_share,
            "seconds": time.time() - block_started,
        })
        checkpoint.save_state(index + 1, [z1, z2], generator, report_blocks)
        progress.set_postfix(block=index, loss=f"{loss_before:.3g}->{loss_after:.3g}")
        progress.update()
        LOG.info("block %d: loss %.4g -> %.4g", index, loss_before, loss_after)
        del base_w, deltas, coeffs, final, block_w
    progress.close()

    trained_head, head_report = {}, None
    if p.head_epochs and train:
        norm_w, head_w, untied = head.find_norm_and_head(
            module.pre_weights(), module.post_weights(), present)
        trained_head, head_report = head.train_head(
            norm_w, head_w, untied, base, experts, vocabulary.align, z1, z2, contexts,
            module.config, p, generator, device)
    for weight in module.post_weights():
        if weight.optional and not present(weight):
            continue  # e.g. no lm_head with tied embeddings, as mergekit does
        if weight.name in trained_head:
            units.save_tensor(weight.name, cast_out(trained_head[weight.name]))
        else:
            task_arithmetic(weight)
    units.end_unit("post")
    return report_blocks, head_report

