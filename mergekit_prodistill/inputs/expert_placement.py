"""Where an expert goes while it generates its continuations, and what that costs.

Pure arithmetic on an expert's shape (counted on a model built on the meta device) and the
memory free now: the whole expert on the compute device when it fits beside one
sequence's KV cache and activations, with as many prompts per batch as fit beside it;
otherwise accelerate's budget on the device, then CPU memory, the rest read from disk at
every forward pass, with the prompts per batch that read the least. The continuation pass
(``continuation.py``) and the plan (``generation_plan.py``) both call these functions, so
the plan's figures are the pass's own.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.formatting import fmt_bytes
from mergekit_prodistill.models.blocks import decoder_of
from mergekit_prodistill.models.families import head_dims, meta_model

# Share of the free memory this pass may plan to use: the rest covers the allocator's
# slack and what the estimate below leaves out (the growing cache's copies, small buffers).
MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class ExpertShape:
    """What generation needs of an expert, from its config alone."""

    weight_bytes: int  # every parameter, in the dtype it is loaded in
    largest_bytes: int  # the largest module accelerate moves as one piece
    layers: int
    kv_bytes_per_token: int  # keys and values of every layer
    work_bytes_per_token: int  # a forward's activations (one block at a time)
    score_bytes_per_pair: int  # attention scores per (query, key) pair
    flops_per_token: int  # the blocks' matmuls
    head_flops: int  # the LM head, for one position (only the last one is computed)
    attention_width: int  # heads x head dimension

    def sequence_bytes(self, prompt: int, new_tokens: int) -> int:
        """KV cache and working set of one sequence during its generation."""
        return (self.kv_bytes_per_token * (prompt + new_tokens)
                + self.work_bytes_per_token * prompt
                + self.score_bytes_per_pair * prompt * (prompt + new_tokens))


_measured: Dict[tuple, ExpertShape] = {}


def expert_shape(config, dtype_bytes: int) -> ExpertShape:
    """The :class:`ExpertShape` of a model with this config, its weights ``dtype_bytes`` each."""
    key = (config.to_json_string(), dtype_bytes)
    if key not in _measured:  # experts of one family share a config: measure it once
        _measured[key] = _measure(config, dtype_bytes)
    return _measured[key]


def _measure(config, es: int) -> ExpertShape:
    """Count parameters on a model built on the meta device (no memory, no weights)."""
    model = meta_model(config)
    text = config.get_text_config()
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    dims = head_dims(text)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights count once
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in no_split]
    block = max((sum(p.numel() for p in m.parameters()) for m in blocks),
                default=total // max(layers, 1))
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return ExpertShape(
        weight_bytes=total * es,
        largest_bytes=max(block, embed.numel(), head.numel()) * es,
        layers=layers,
        kv_bytes_per_token=2 * sum(kv_heads * head_dim for kv_heads, head_dim in dims) * es,
        work_bytes_per_token=(4 * text.hidden_size + 3 * intermediate) * es,
        score_bytes_per_pair=heads * es,
        # The language model's blocks: a multimodal model's vision tower does not run on text.
        flops_per_token=2 * (sum(p.numel() for p in decoder_of(model).parameters())
                             - embed.numel()),
        head_flops=2 * head.numel(),
        attention_width=heads * max(head_dim for _, head_dim in dims),
    )


@dataclass(frozen=True)
class Placement:
    """Where an expert's weights are while it generates, and prompts per batch."""

    rows: int  # prompts per batch
    batches: int
    device_bytes: int  # weights on the compute device (the streamed module included)
    host_bytes: int  # weights offloaded to CPU memory (GPU runs only)
    disk_bytes: int  # weights read from the checkpoint files for every forward pass
    generation_bytes: int  # KV cache and activations of one batch
    room: Optional[int]  # bytes of the device this pass may use; None: unknown
    max_memory: Optional[Dict] = None  # accelerate's budget; None: the whole expert resident

    @property
    def offloaded(self) -> bool:
        return self.max_memory is not None

    @property
    def fits(self) -> bool:
        return self.room is None or self.device_bytes + self.generation_bytes <= self.room

    def check(self, device: torch.device, model) -> None:
        """Refuse a pass that cannot fit even with one prompt per batch, fully offloaded."""
        if not self.fits:
            raise ProDistillError(
                f"model {model}: generating its continuations needs "
                f"{fmt_bytes(self.device_bytes + self.generation_bytes)} on {device} even with "
                f"one prompt per batch and its weights offloaded, but {fmt_bytes(self.room)} "
                "is usable; lower 'continue_tokens' or 'max_length'"
            )

    def describe(self) -> str:
        where = ["whole on the device"] if not self.offloaded else [
            f"{fmt_bytes(self.device_bytes)} on the device"]
        if self.host_bytes:
            where.append(f"{fmt_bytes(self.host_bytes)} brought in from CPU memory")
        if self.disk_bytes:
            where.append(f"{fmt_bytes(self.disk_bytes)} read from disk")
        every = " at every token" if self.offloaded else ""
        return (", ".join(where) + f"{every}; {self.rows} prompts per batch, "
                f"{self.batches} batch{'es' if self.batches > 1 else ''}")


def _room(free: Optional[int]) -> Optional[int]:
    return None if free is None else int(MEMORY_SHARE * free)


def place_expert(shape: ExpertShape, prompt_lengths: Sequence[int], new_tokens: int,
                 device: torch.device, free: Dict[str, Optional[int]]) -> Placement:
    """Where the expert goes and how many prompts a batch holds, from the free memory.

    ``free`` maps ``str(device)`` and "cpu" to the bytes free there (None: unknown, taken
    as enough). Batches are costed at the longest prompt. The whole expert stays on the
    device whenever it fits beside one sequence; the batch then takes the rest of the room.
    Otherwise, accelerate keeps a budget of weights on the device (minus room to bring in
    its largest module) and the remainder is read at every forward pass; the batch size
    that reads the fewest bytes overall wins (larger on ties).
    """
    n = len(prompt_lengths)
    per_row = shape.sequence_bytes(max(prompt_lengths), new_tokens)
    room = _room(free.get(str(device)))
    if room is None or shape.weight_bytes + per_row <= room:
        rows = n if room is None else min(n, (room - shape.weight_bytes) // per_row)
        return Placement(rows, math.ceil(n / rows), shape.weight_bytes, 0, 0,
                         rows * per_row, room)

    best = None  # (bytes read, -rows)
    for rows in range(1, n + 1):
        budget = room - rows * per_row
        if budget < shape.largest_bytes:
            break
        read = math.ceil(n / rows) * (shape.weight_bytes - (budget - shape.largest_bytes))
        if best is None or (read, -rows) < best:
            best = (read, -rows)
    rows = -best[1] if best else 1
    budget = max(room - rows * per_row, shape.largest_bytes)
    offloaded = max(shape.weight_bytes - (budget - shape.largest_bytes), 0)
    host = 0
    if device.type != "cpu":
        # accelerate keeps room on the CPU too, for a module brought in from disk.
        host_room = _room(free.get("cpu"))
        host = offloaded if host_room is None else \
            min(offloaded, max(host_room - shape.largest_bytes, 0))
    target = (device.index or 0) if device.type == "cuda" else str(device)
    max_memory = {target: budget}
    if device.type != "cpu":
        max_memory["cpu"] = host + shape.largest_bytes
    return Placement(rows, math.ceil(n / rows), budget, host, offloaded - host,
                     rows * per_row, room, max_memory)


def generation_flops(shape: ExpertShape, placement: Placement, prompt_lengths: Sequence[int],
                     new_tokens: int) -> float:
    """FLOPs of prefilling every batch and generating ``new_tokens`` for each prompt."""
    flops = 0.0
    ordered = sorted(prompt_lengths, reverse=True)
    for start in range(0, len(ordered), placement.rows):
        rows, width = len(ordered[start:start + placement.rows]), ordered[start]
        causal = 2 * width * width * shape.attention_width * shape.layers  # half of 4 w^2 d
        flops += rows * (width * shape.flops_per_token + causal + shape.head_flops)
        for t in range(1, new_tokens):
            attend = 4 * (width + t) * shape.attention_width * shape.layers
            flops += rows * (shape.flops_per_token + attend + shape.head_flops)
    return flops
