"""The ProDistill merge: one decoder block at a time, read, train, write, free.

For every expert i we keep two activation streams over its calibration prompts: z1, the
merged model's own activations, and z2, expert i's activations. Block l is merged as
theta_0 + sum_i lambda_i * tau_i with element-wise coefficients lambda trained by Adam so
that merged_block(z1) matches expert_block_i(z2) (masked mean squared error, averaged over
experts). Then z1 advances through the trained merged block and z2 through the expert's.
Embeddings, the final norm and the LM head are merged by task arithmetic with
lambda = init. Only one block of the base and of each expert is ever in memory.
"""

import contextlib
import logging
import math
import os
import shutil
import time
from typing import Dict, List

import torch
import tqdm
from mergekit.architecture import ConfiguredModelArchitecture, get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.io import TensorWriter
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions

from mergekit_prodistill import calibration, continuation, dtypes, head, output, plan, preflight
from mergekit_prodistill.activations import ActivationStore
from mergekit_prodistill.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.coefficients import (Optimizer, chain_rule, coefficient_stats,
                                              init_coefficients, merged_weights,
                                              training_weights, unique_parameters)
from mergekit_prodistill.checkpoint import Checkpoint, UnitWriter, fingerprint
from mergekit_prodistill.config import ProDistillParameters, ProDistillRecipe, parse_recipe
from mergekit_prodistill.errors import Interrupted, ProDistillError
from mergekit_prodistill.vocab import plan_vocabulary
from mergekit_prodistill.weights import ModelTensors, check_shape, merge

LOG = logging.getLogger("mergekit_prodistill")

# On a non-finite loss the block is trained again from init with the learning rate
# divided by LR_BACKOFF, at most MAX_RETRIES times.
MAX_RETRIES = 3
LR_BACKOFF = 10.0


def masked_mse(out: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor):
    """Mean squared error per hidden unit over real tokens only (padding excluded)."""
    err = (out.float() - target.float()).pow(2).mean(-1)
    return (err * token_mask).sum() / token_mask.sum()


def distill_block(runner, index, layer, base_w, deltas, student_in, targets, contexts,
                  p: ProDistillParameters, generator, on_epoch=None):
    """Train block ``index``'s coefficients.

    Returns them (one dict of tensors per expert) and the share of coefficients whose
    first gradient was below Adam's eps (see :class:`coefficients.Optimizer`).
    """
    compute_dtype = student_in[0][0].dtype
    steps = max(len(batches) for batches in student_in)
    epochs = p.epochs_for(steps)
    lr, retries, epoch = p.lr, 0, 0
    coeffs = init_coefficients(base_w, len(deltas), p)
    optimizer = Optimizer(unique_parameters(coeffs), lr)
    while epoch < epochs:
        orders = [torch.randperm(len(b), generator=generator) for b in student_in]
        epoch_loss = 0.0
        for step in range(steps):
            if not math.isfinite(epoch_loss):
                break
            # Materialise sum_i lambda_i tau_i once per step; back-propagate every expert's
            # batch into it, then apply the chain rule d merged / d lambda_i = tau_i by hand.
            merged = training_weights(base_w, deltas, coeffs, compute_dtype)
            for i, order in enumerate(orders):
                b = int(order[step % len(order)])
                x = student_in[i][b].to(runner.device, non_blocking=True)
                y = targets[i][b].to(runner.device, non_blocking=True)
                out = runner.forward(index, layer, merged, x, contexts[i][b])
                loss = masked_mse(out, y, contexts[i][b].token_mask) / len(orders)
                loss.backward()
                epoch_loss += loss.item()
            chain_rule(merged, deltas, coeffs)
            optimizer.step()
        # One reduction per tensor: NaN or inf anywhere makes its sum non-finite.
        params = optimizer.params
        if not (math.isfinite(epoch_loss) and torch.stack([t.sum() for t in params]).isfinite().all()):
            if retries == MAX_RETRIES:
                raise ProDistillError(
                    f"block {index}: the distillation loss is not finite even with lr={lr:g} "
                    f"after {MAX_RETRIES} retries; lower 'lr' (now {p.lr:g}) or check the "
                    "models for NaN or inf weights"
                )
            retries += 1
            lr /= LR_BACKOFF
            LOG.warning("block %d: non-finite loss in epoch %d; training the block again "
                        "from the start with lr=%g", index, epoch + 1, lr)
            # Restarting from init needs no saved copy of lambda (4 bytes per coefficient).
            with torch.no_grad():
                for t in params:
                    t.fill_(p.init)
            optimizer, epoch = Optimizer(params, lr), 0
            continue
        if on_epoch:
            on_epoch(epoch, epoch_loss / steps)
        epoch += 1
    return [{n: t.detach() for n, t in c.items()} for c in coeffs], optimizer.small_gradient_share


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


def run_block(runner, index, layer, weights, inputs, contexts, outputs, targets=None):
    """Forward every batch of every expert through one block, without gradients.

    Results go into ``outputs`` (which may be ``inputs``: each batch is read before it is
    overwritten). With ``targets``, returns the distillation loss averaged over experts.
    """
    per_expert = []
    with torch.no_grad():
        for i, (w, ctxs) in enumerate(zip(weights, contexts)):
            total, tokens = 0.0, 0
            for b, ctx in enumerate(ctxs):
                out = runner.forward(index, layer, w, inputs[i][b].to(runner.device), ctx)
                if targets is not None:
                    n = int(ctx.token_mask.sum())
                    y = targets[i][b].to(runner.device)
                    total += float(masked_mse(out, y, ctx.token_mask)) * n
                    tokens += n
                if outputs is not None:
                    outputs[i][b].copy_(out)
            per_expert.append(total / max(tokens, 1))
    return sum(per_expert) / len(per_expert)


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
    plan.check_fits(recipe, options)  # before any weight is read
    seed = options.random_seed if options.random_seed is not None else 0
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

    activation_dtype = dtypes.activation_dtype(
        p.activation_dtype, dtypes.weights_dtype(recipe, base_config), device)
    calib = calibration.load_for_experts(recipe, options, seed)
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
        checkpoint = Checkpoint(staging, fingerprint(
            repr(merge_config),  # to_yaml() refuses recipes that share YAML anchors
            {"seed": seed, "device": device.type, "dtype": recipe.dtype},
            [f for m in [base, *experts] for f in m.shard_files()],
            calib.batches,
        ))
    resumed = checkpoint.resume() if checkpoint else None
    units = UnitWriter(writer, checkpoint)

    try:
        facts = {"activation_dtype": activation_dtype,
                 "epochs": p.epochs_for(max(len(b) for b in calib.batches))} if p.epochs else {}
        if checkpoint is not None and p.continue_tokens:
            continued = time.time()
            calib = _continued(recipe, options, calib, device, checkpoint)
            merged_ids = vocabulary.calibration_ids(calib)
            facts["continuation_seconds"] = time.time() - continued
        with denormals_flushed(bool(p.epochs)):
            report_blocks, head_report = _merge(
                recipe, module, base, experts, calib, merged_ids, vocabulary, device,
                generator, units, cast_out, checkpoint, resumed, options,
                p.activation_dir or os.path.join(staging, output.SCRATCH), activation_dtype)
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
            free = {str(device): plan.available_memory(device),
                    "cpu": plan.available_memory(torch.device("cpu"))}
            sequences.append(continuation.continue_prompts(
                expert.model.local_path(cache_dir=options.transformers_cache), prompts,
                recipe.params.continue_tokens, tokenizer, dtype=recipe.dtype, device=device,
                free=free, trust_remote_code=options.trust_remote_code))
        checkpoint.save_continuations(sequences)
    return calib.with_sequences(sequences, recipe.params.batch_size)


def _merge(recipe, module, base, experts, calib, merged_ids, vocabulary, device, generator,
           units, cast_out, checkpoint, resumed, options, activation_dir, activation_dtype):
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
        store = ActivationStore(calib.shapes(), hidden, dtype_from_name(activation_dtype),
                                p.activation_placement, device, activation_dir)
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


def _evaluated(runner, index, layer, base_w, deltas, coeffs, student, contexts, targets,
               compute_dtype):
    """The block to write (in the weights' dtype), the same in the compute dtype, and its
    loss on the merged stream."""
    final = {n: t.to(base_w[n].dtype) for n, t in
             merged_weights(base_w, deltas, coeffs, torch.float32).items()}
    block_w = _cast(final, compute_dtype)
    loss = run_block(runner, index, layer, [block_w] * len(deltas), student, contexts, None,
                     targets)
    return final, block_w, loss


def _cast(weights: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {n: t.to(dtype) for n, t in weights.items()}
