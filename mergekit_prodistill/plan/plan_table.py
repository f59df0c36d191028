"""The plan as a table: what ``mergekit-prodistill plan`` prints.

It reads a :class:`~mergekit_prodistill.plan.planner.Plan` and decides nothing.
"""

import torch

from mergekit_prodistill.formatting import GB, fmt_bytes, fmt_seconds
from mergekit_prodistill.plan.devices import DEVICE_CLASSES
from mergekit_prodistill.plan.memory import CACHE, TERMS


def cell(n: float) -> str:
    return fmt_bytes(n) if n else "-"


def render(plan) -> str:
    return "\n".join(_header(plan) + _memory(plan) + _compute(plan) + _times(plan))


def _header(plan) -> list:
    """The models, prompts, dtypes, processes and continuations."""
    s, p = plan.shape, plan.recipe.params
    lines = [
        f"ProDistill plan: {len(plan.recipe.experts)} experts onto {plan.recipe.base}",
        f"  {s.num_layers} blocks of {s.block_numel / 1e6:.1f}M parameters (hidden "
        f"{s.hidden}, intermediate {s.intermediate}, {s.heads} heads); vocabulary "
        + "/".join(str(v) for v in sorted(set(s.vocab))),
        f"  calibration ({plan.work.source}): "
        + ", ".join(f"{n} prompts/{t} tokens" for n, t in zip(
            (sum(r for r, _ in b) for b in plan.work.batches), plan.work.tokens))
        + f"; batch_size {p.batch_size}, max_length {p.max_length}",
        f"  dtypes: weights {plan.dtypes['weights']}, task vectors "
        f"{plan.dtypes['task_vectors']}, compute {plan.dtypes['compute']}, "
        f"lambda float32 ({p.granularity}), cache {plan.dtypes['cache']} on "
        f"{plan.cache_at}, output {plan.dtypes['output']}",
    ]
    if s.stream_width > s.hidden:
        lines.append(f"  streams carry {s.stream_width} values per token: the hidden states "
                     "and what later blocks read (per-layer inputs, shared keys and values)")
    w = plan.world
    if w.distributed:
        owned = [str(i + 1) for i in plan.owned]
        part, parts = w.part(len(plan.recipe.experts))
        shared = f" with {parts - 1} other process{'es' * (parts > 2)} (rows {part + 1}, " \
            f"{part + 1 + parts}, ... of each batch)" if parts > 1 else ""
        lines.append(
            f"  processes: {w.size} ({w.local_size} per machine); planned: process {w.rank}, "
            f"which owns expert{'s' * (len(owned) > 1)} {', '.join(owned)} of "
            f"{len(plan.recipe.experts)} (recipe order){shared}; memory, FLOPs and time are "
            "its own")
    if plan.generation:
        known = plan.available.get(plan.device) is not None
        lines.append(
            f"  continuation: up to {p.continue_tokens} tokens per prompt; each expert "
            + "; ".join(sorted({c.describe() for c in plan.generation}))
            + ("" if known else f" (free memory on {plan.device} unknown: as if enough)"))
    if p.epochs and p.written_prompts:
        lines.append(
            f"  written prompts: up to {p.written_prompts} per expert, counted at the longest "
            "real prompt's length + 2; the base is loaded once to write for every expert, "
            "and each expert writes before it continues (timed as if every sampled prompt "
            "were kept)")
    if len(set(s.vocab)) > 1:
        lines.append(
            "  note: vocabulary sizes differ between the models; embeddings and LM head "
            "must have the same shape in every model to be merged"
        )
    return lines


def _memory(plan) -> list:
    """Each device's bytes at its peak phase, by term."""
    devices = list(plan.phases)
    peaks = {d: plan.peak(d) for d in devices}
    width = max(len(t) for t in TERMS) + 2
    lines = ["", "memory at each device's peak".ljust(width)
              + "".join(f"{d:>14}" for d in devices)]
    lines.append("  (phase)".ljust(width) + "".join(f"{peaks[d][0]:>14}" for d in devices))
    for term in TERMS:
        lines.append(f"  {term}".ljust(width)
                     + "".join(f"{cell(peaks[d][1].get(term, 0)):>14}" for d in devices))
    lines.append("  total".ljust(width)
                 + "".join(f"{fmt_bytes(plan.total(d)):>14}" for d in devices))
    if plan.cache_at == "disk":
        lines.append(f"  {CACHE} on disk: {fmt_bytes(plan.cache_bytes)}")
    lines.append("  available now".ljust(width) + "".join(
        f"{cell(plan.available[d]) if plan.available.get(d) else 'unknown':>14}"
        for d in devices))
    return lines


def _compute(plan) -> list:
    """FLOPs, bytes moved, and what the processes send one another."""
    s, f, w = plan.shape, plan.flops, plan.world
    lines = [
        "",
        f"compute: training {f['training']:.3g} FLOPs (forward + backward, "
        f"{f['steps']} steps x {f['epochs']} epochs x {s.num_layers} blocks), forwards "
        f"{f['forwards']:.3g} FLOPs (teacher outputs, losses, stream updates), "
        f"continuation {f['continuation']:.3g} FLOPs, "
        f"element-wise traffic {fmt_bytes(plan.moved_bytes)}, checkpoint I/O "
        f"{fmt_bytes(plan.io_bytes)}, progress saves {fmt_bytes(plan.save_bytes)}"
        + "".join(f", continuation reads {fmt_bytes(plan.continuation_reads[k])} from {k}"
                  for k in ("host", "disk") if plan.continuation_reads.get(k)),
    ]
    if w.distributed and plan.comm_bytes_per_step:
        blocks = s.num_layers * plan.comm_bytes_per_block
        lines.append(
            f"communication: 2 all-reduces of one block per training step (dL/dW in "
            f"{plan.dtypes['compute']}, the next weights' float32 partial sum): "
            f"{fmt_bytes(plan.comm_bytes_per_step)} sent per step by each process, "
            f"{fmt_bytes(plan.comm_bytes_per_block)} per block, {fmt_bytes(blocks)} in all "
            "(in the time estimate, as if not overlapped)")
    return lines


def _times(plan) -> list:
    """The time estimate on each device class."""
    lines = ["", "time estimate (achievable rates, see docs/planning.md)"]
    for cls in DEVICE_CLASSES:
        fits = ""
        if cls.kind == torch.device(plan.device).type:
            fits = "fits" if plan.total(plan.device) <= cls.memory_gb * GB else "too big"
            fits = f"{fits} in {cls.memory_gb:.0f} GB; "
        if plan.continuation_reads:
            fits += f"continuation {fmt_seconds(plan.continuation_seconds(cls))}; "
        lines.append(f"  {cls.name:<12} {fmt_seconds(plan.seconds(cls)):>10}   "
                     f"{fits}{cls.basis}")
    return lines
