"""The ProDistill merge: one decoder block at a time, read, train, write, free.

For every expert i we keep two activation streams over its calibration prompts: z1, the
merged model's own activations, and z2, expert i's activations. Block l is merged as
theta_0 + sum_i lambda_i * tau_i with element-wise coefficients lambda trained by Adam so
that merged_block(z1) matches expert_block_i(z2) (masked mean squared error, averaged over
experts). Then z1 advances through the trained merged block and z2 through the expert's.
Embeddings, the final norm and the LM head are merged by task arithmetic with
lambda = init. Only one block of the base and of each expert is ever in memory.
"""

import logging
import math
import os
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

from mergekit_prodistill import calibration, output, plan
from mergekit_prodistill.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.config import ProDistillParameters, ProDistillRecipe, parse_recipe
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.weights import ModelTensors, check_shape, merge

LOG = logging.getLogger("mergekit_prodistill")


def masked_mse(out: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor):
    """Mean squared error per hidden unit over real tokens only (padding excluded)."""
    err = (out.float() - target.float()).pow(2).mean(-1)
    return (err * token_mask).sum() / token_mask.sum()


def init_coefficients(base_w, num_experts, p: ProDistillParameters):
    """lambda in fp32, whatever the weight dtype; shape set by the granularity."""
    coeffs = []
    device = next(iter(base_w.values())).device
    for _ in range(num_experts):
        shared = torch.nn.Parameter(torch.tensor(p.init, dtype=torch.float32, device=device))
        coeffs.append(
            {
                name: shared
                if p.granularity == "task"
                else torch.nn.Parameter(
                    torch.full(w.shape if p.granularity == "element" else (), p.init,
                               dtype=torch.float32, device=w.device)
                )
                for name, w in base_w.items()
            }
        )
    return coeffs


def merged_weights(base_w, deltas, coeffs, dtype):
    with torch.no_grad():
        return {
            name: merge(base, [d[name] for d in deltas], [c[name] for c in coeffs]).to(dtype)
            for name, base in base_w.items()
        }


def distill_block(runner, index, layer, base_w, deltas, student_in, targets, contexts,
                  p: ProDistillParameters, generator, on_epoch=None) -> List[Dict]:
    """Train block ``index``'s coefficients; return them (one dict of tensors per expert)."""
    coeffs = init_coefficients(base_w, len(deltas), p)
    params = list({id(t): t for c in coeffs for t in c.values()}.values())
    optimizer = torch.optim.Adam(params, lr=p.lr)
    compute_dtype = student_in[0][0].dtype
    steps = max(len(batches) for batches in student_in)
    for epoch in range(p.epochs):
        orders = [torch.randperm(len(b), generator=generator) for b in student_in]
        epoch_loss = 0.0
        for step in range(steps):
            # Materialise sum_i lambda_i tau_i once per step; back-propagate every expert's
            # batch into it, then apply the chain rule d merged / d lambda_i = tau_i by hand.
            merged = {n: w.requires_grad_() for n, w in
                      merged_weights(base_w, deltas, coeffs, compute_dtype).items()}
            step_loss = 0.0
            for i, order in enumerate(orders):
                b = int(order[step % len(order)])
                x = student_in[i][b].to(runner.device, non_blocking=True)
                y = targets[i][b].to(runner.device, non_blocking=True)
                out = runner.forward(index, layer, merged, x, contexts[i][b])
                loss = masked_mse(out, y, contexts[i][b].token_mask) / len(orders)
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                raise ProDistillError(
                    f"block {index}: the distillation loss became {step_loss} at epoch "
                    f"{epoch + 1}; lower 'lr' (now {p.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            for c, d in zip(coeffs, deltas):
                for name, coeff in c.items():
                    grad = merged[name].grad.float() * d[name]
                    grad = grad if coeff.dim() else grad.sum()
                    coeff.grad = grad if coeff.grad is None else coeff.grad + grad
            optimizer.step()
            epoch_loss += step_loss
        if on_epoch:
            on_epoch(epoch, epoch_loss / steps)
    return [{n: t.detach() for n, t in c.items()} for c in coeffs]


def run_block(runner, index, layer, weights, inputs, contexts, cache_device):
    """Forward every batch of every expert through one block, without gradients."""
    with torch.no_grad():
        return [
            [
                runner.forward(index, layer, w, x.to(runner.device), ctx).to(cache_device)
                for x, ctx in zip(batches, ctxs)
            ]
            for w, batches, ctxs in zip(weights, inputs, contexts)
        ]


def stream_loss(outputs, targets, contexts) -> float:
    """Distillation loss of whole streams, averaged over experts."""
    per_expert = []
    for outs, tgts, ctxs in zip(outputs, targets, contexts):
        tokens = sum(int(c.token_mask.sum()) for c in ctxs)
        total = sum(
            float(masked_mse(o, t.to(o.device), c.token_mask.to(o.device))) * int(c.token_mask.sum())
            for o, t, c in zip(outs, tgts, ctxs)
        )
        per_expert.append(total / tokens)
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
    plan.check_fits(recipe, options)  # before any weight is read
    seed = options.random_seed if options.random_seed is not None else 0
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(options.device or "cpu")
    cache_device = torch.device("cpu")

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

    calib = calibration.load_for_experts(recipe, options, seed)
    runner = BlockRunner(base_config, device)
    staging = output.start_staging(out_path)
    writer = TensorWriter(
        staging,
        max_shard_size=options.out_shard_size,
        safe_serialization=options.safe_serialization,
    )
    init = [torch.tensor(p.init, dtype=torch.float32)] * len(experts)

    def task_arithmetic(weight):
        """Merge one non-block tensor with lambda = init; also return the inputs."""
        base_t = base.load(weight)
        expert_ts = [e.load(weight) for e in experts]
        for e, t in zip(experts, expert_ts):
            check_shape(weight.name, base_t, t, e.model)
        merged = merge(base_t, [t - base_t for t in expert_ts], init).to(base_t.dtype)
        writer.save_tensor(weight.name, cast_out(merged))
        return merged, expert_ts

    # Embeddings: merged rows start z1, each expert's own rows start its z2.
    z1, z2 = None, None
    for weight in module.pre_weights():
        merged, expert_ts = task_arithmetic(weight)
        if weight.vocabulary_axis == 0 and z1 is None:
            z1 = [[merged[b.input_ids].to(cache_device) for b in batches] for batches in calib.batches]
            z2 = [[t[b.input_ids].to(cache_device) for b in batches]
                  for t, batches in zip(expert_ts, calib.batches)]
        del merged, expert_ts
    if z1 is None:
        raise ProDistillError("no input embedding found among the model's first weights")
    compute_dtype = z1[0][0].dtype
    contexts = [
        [runner.context(b, x.to(device)) for b, x in zip(batches, xs)]
        for batches, xs in zip(calib.batches, z1)
    ]

    report_blocks = []
    progress = tqdm.tqdm(range(num_layers), desc="ProDistill blocks", disable=options.quiet)
    for index in progress:
        block_started = time.time()
        layer = runner.layer(index)
        weight_infos = module.layer_weights(index)
        names = layer_weight_names(layer, [w.name for w in weight_infos])
        base_w = {names[n]: t for n, t in base.load_all(weight_infos).items()}

        student_in = z1 if p.inputs in ("dual", "merged") else z2
        teacher_in = z2 if p.inputs in ("dual", "expert") else z1
        # The teacher outputs never change during training: compute them once. They are
        # also the expert stream's next input.
        targets, deltas = [], []
        for i, expert in enumerate(experts):
            expert_w = {names[n]: t for n, t in expert.load_all(weight_infos).items()}
            for n, t in expert_w.items():
                check_shape(n, base_w[n], t, expert.model)
            targets += run_block(runner, index, layer, [expert_w], [teacher_in[i]],
                                 [contexts[i]], cache_device)
            deltas.append({n: expert_w[n] - base_w[n] for n in base_w})
            del expert_w

        losses = {}
        if p.epochs:
            init_w = merged_weights(base_w, deltas, [
                {n: init[0] for n in base_w} for _ in deltas], compute_dtype)
            outs = run_block(runner, index, layer, [init_w] * len(experts), student_in,
                             contexts, cache_device)
            losses["loss_before"] = stream_loss(outs, targets, contexts)
            del init_w, outs

        epoch_losses = []

        def on_epoch(epoch, loss):
            epoch_losses.append(loss)
            progress.set_postfix(block=index, epoch=epoch + 1, loss=f"{loss:.3g}")

        coeffs = distill_block(runner, index, layer, base_w, deltas, student_in, targets,
                               contexts, p, generator, on_epoch)
        final = merged_weights(base_w, deltas, coeffs, torch.float32)
        for full_name, own_name in names.items():
            writer.save_tensor(full_name, cast_out(final[own_name].to(base_w[own_name].dtype)).cpu())

        # Advance the merged stream through exactly the weights just written.
        block_w = {n: t.to(base_w[n].dtype).to(compute_dtype) for n, t in final.items()}
        outs = run_block(runner, index, layer, [block_w] * len(experts), student_in,
                         contexts, cache_device)
        losses["loss_after"] = stream_loss(outs, targets, contexts)
        losses.setdefault("loss_before", losses["loss_after"])
        z1 = outs if p.inputs != "expert" else z1
        z2 = targets if p.inputs != "merged" else outs
        progress.set_postfix(block=index, loss=f"{losses['loss_before']:.3g}->{losses['loss_after']:.3g}")
        LOG.info("block %d: loss %.4g -> %.4g", index, losses["loss_before"], losses["loss_after"])
        report_blocks.append({
            "block": index,
            **losses,
            "epoch_losses": epoch_losses,
            "coefficient_mean": [float(torch.stack([c.mean() for c in cf.values()]).mean())
                                 for cf in coeffs],
            "seconds": time.time() - block_started,
        })
        del base_w, deltas, coeffs, final, block_w, targets

    for weight in module.post_weights():
        if weight.optional and not (base.has(weight) or any(e.has(weight) for e in experts)):
            continue  # e.g. no lm_head with tied embeddings, as mergekit does
        task_arithmetic(weight)
    writer.finalize()

    output.finish(
        staging, out_path, merge_config, arch_info, options, config_source, recipe,
        calib, report_blocks, started, device,
    )
