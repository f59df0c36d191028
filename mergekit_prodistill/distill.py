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
from typing import Dict

import torch

from mergekit_prodistill.coefficients import (Optimizer, chain_rule, init_coefficients,
                                              merged_weights, training_weights,
                                              unique_parameters)
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.recipe import ProDistillParameters

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
