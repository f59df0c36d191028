"""What one block's forward keeps for backward, and what one batch's context holds,
measured on the family's own code rather than written down as a formula per family.

The block is run under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (the shape
propagation torch.compile uses): tensors have shapes, dtypes and CPU's kernel choices,
but no data, so the real config's block is measured (a 13B or a 70B one) in a fraction
of a second and no memory. Saved-tensor hooks count every distinct storage autograd
keeps, except the block's weights, its input (the activation cache holds it) and the
batch's context (counted by :func:`context_footprint`). The context is built for real.
Each kind of block along the depth (sliding, full or linear attention) is measured.

Bytes are a linear function of the batch's shape, so six shapes give the coefficients:
``constant + tokens * per_token + pairs * per_pair + positions * per_position +
chunked tokens * per_chunked_token``, with ``rows x width`` tokens, ``rows x width^2``
(query, key) pairs, ``width`` positions and ``rows x width`` rounded up to a chunk. A
seventh shape checks them; a kind of block they do not fit (chunked linear attention
keeps more than that) is measured at each batch shape the plan asks about instead.
"""

import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mergekit_prodistill.models.blocks import BatchContext, BlockRunner
from mergekit_prodistill.models.families import EXPERT_COUNT_KEYS, experts_per_token

# Chunked kernels (transformers' gated delta rule, in torch and in fla) pad the width to
# a multiple of this length; the widths measured are multiples of it, and one is not.
CHUNK = 64
WIDTHS = (64, 128)
OFF_CHUNK = 96


@dataclass(frozen=True)
class Footprint:
    """Bytes as a linear function of a batch's rows and padded width."""

    constant: float = 0.0
    per_token: float = 0.0
    per_pair: float = 0.0
    per_position: float = 0.0
    per_chunked_token: float = 0.0  # per token of the width padded to a multiple of CHUNK
    exact: bool = True  # the coefficients also give a shape they were not fitted on

    def at(self, rows: int, width: int) -> int:
        chunked = -(-width // CHUNK) * CHUNK
        return round(self.constant + rows * width * (self.per_token + width * self.per_pair)
                     + width * self.per_position + rows * chunked * self.per_chunked_token)

    @classmethod
    def fitted(cls, measure) -> "Footprint":
        """The coefficients from ``measure(rows, width)`` at rows 1 and 2 of three widths."""
        (w1, w2), w3 = WIDTHS, OFF_CHUNK
        one, two = ([measure(rows, w) for w in (w1, w2, w3)] for rows in (1, 2))
        by_row = [b - a for a, b in zip(one, two)]  # width * per_token + width^2 * per_pair
        per_pair = (by_row[1] / w2 - by_row[0] / w1) / (w2 - w1)
        # Per token, chunked or not: at w1 and w2 the chunked width is the width.
        per_token = by_row[0] / w1 - w1 * per_pair
        chunked = -(-w3 // CHUNK) * CHUNK
        per_chunked = (by_row[2] - w3 * per_token - w3 * w3 * per_pair) / (chunked - w3)
        fixed = [m - w * per_token - w * w * per_pair for m, w in zip(one, WIDTHS)]
        per_position = (fixed[1] - fixed[0]) / (w2 - w1)
        fit = cls(fixed[0] - w1 * per_position, per_token - per_chunked, per_pair,
                  per_position, per_chunked)
        check = (3, w3)
        return dataclasses.replace(fit, exact=fit.at(*check) == measure(*check))


def padded(rows: int, width: int) -> torch.Tensor:
    """An attention mask with padding in every row, so that every mask is materialised
    (a batch without padding may use none: the worst case is counted)."""
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[:, -1] = 0
    return mask


def saved_bytes(config, dtype: torch.dtype, rows: int, width: int) -> int:
    """What one block's forward keeps for backward on a batch of ``rows`` x ``width``,
    in the compute ``dtype``: the most of any kind of layer along the depth."""
    key = next((k for k in EXPERT_COUNT_KEYS if (getattr(config, k, None) or 0) > 1), None)
    if key is None:
        return _most_of_any_kind(config, dtype, rows, width, fake=True)
    # A mixture of experts routes by value, which a fake run cannot follow: real tensors,
    # with the experts cut to the two fewest counts that route as the config does (more
    # than top-k; whole groups, with enough in the chosen groups, for DeepSeek's routing).
    # A token's activations are the same for any number of experts, the router's scores
    # grow with it: extrapolated to them all.
    top_k, groups = experts_per_token(config), getattr(config, "n_group", None) or 1
    chosen = getattr(config, "topk_group", None) or groups
    counts = [c for c in range(groups, 4 * (top_k + 1) * groups, groups)
              if c > top_k and c // groups * chosen >= top_k][:2]
    fewer = []
    for count in counts:
        fewer.append(copy.deepcopy(config))
        setattr(fewer[-1], key, count)
    one, two = (_most_of_any_kind(c, dtype, rows, width, fake=False) for c in fewer)
    return round(one + (getattr(config, key) - counts[0]) * (two - one) / (counts[1] - counts[0]))


def _most_of_any_kind(config, dtype: torch.dtype, rows: int, width: int, fake: bool) -> int:
    """From each kind's coefficients where they are exact (every kind but chunked linear
    attention, whose kernels keep more than a linear function of the shape), else
    measured at this shape."""
    runner = _runner(config)
    kept = []
    for index in sorted(set(_remembered(config, None, "kinds", lambda: block_kinds(runner)))):
        measure = functools.partial(_saved_bytes, runner, index, dtype=dtype, fake=fake)
        fit = _remembered(config, dtype, f"saved {index}", lambda: Footprint.fitted(measure))
        kept.append(fit.at(rows, width) if fit.exact else _remembered(
            config, dtype, f"saved {index} at {rows} x {width}", lambda: measure(rows, width)))
    return max(kept)


def block_kinds(runner: BlockRunner) -> List[int]:
    """For every block, the index of the first block of its kind: blocks differ in their
    attention (full, sliding, linear) or in their parameters (dense blocks before the
    mixture-of-experts ones)."""
    first, kinds = {}, []
    for index, attention in enumerate(runner.attention_types):
        stored = runner.layer(index).state_dict(keep_vars=True)
        params = tuple((n, tuple(p.shape)) for n, p in stored.items())
        kinds.append(first.setdefault((attention, params), index))
    return kinds


def context_footprint(config, dtype: torch.dtype) -> Footprint:
    """What ``BlockRunner.context`` keeps for one batch, with the batch's attention mask."""
    return _remembered(config, dtype, "context", lambda: Footprint.fitted(
        functools.partial(_context_bytes, _runner(config), dtype=dtype)))


def _runner(config) -> BlockRunner:
    """One CPU block runner per config, for every measurement of it."""
    return _remembered(config, None, "runner", lambda: BlockRunner(config, torch.device("cpu")))


_MEASURED = {}


def _remembered(config, dtype: Optional[torch.dtype], kind: str, measure):
    """Measured (or built) once per config: plans are made again for the same models."""
    key = (config.to_json_string(use_diff=False), dtype, kind)
    if key not in _MEASURED:
        _MEASURED[key] = measure()
    return _MEASURED[key]


def _storages(tensors) -> dict:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def _context_tensors(ctx: BatchContext) -> list:
    # Rotary tables are (cos, sin), or one complex tensor (Llama 4).
    tables = [t for table in ctx.position_embeddings.values()
              for t in ([table] if isinstance(table, torch.Tensor) else table)]
    return [ctx.token_mask, ctx.position_ids, *ctx.masks.values(), *tables]


def _context_bytes(runner: BlockRunner, rows: int, width: int, dtype: torch.dtype) -> int:
    mask = padded(rows, width)
    ctx = runner.context(mask, dtype)
    tensors = [t for t in [mask, *_context_tensors(ctx)] if isinstance(t, torch.Tensor)]
    return sum(_storages(tensors).values())


def _saved_bytes(runner: BlockRunner, index: int, rows: int, width: int,
                 dtype: torch.dtype, fake: bool = True) -> int:
    ctx = runner.context(padded(rows, width), dtype)
    layer = runner.layer(index)
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.update(_storages([t]))
        return t

    generator = torch.Generator().manual_seed(0)  # real weights route tokens
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext() as mode:
        to = (lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t) if fake \
            else (lambda t: t)
        ctx = dataclasses.replace(
            ctx, token_mask=to(ctx.token_mask), position_ids=to(ctx.position_ids),
            masks={k: to(m) for k, m in ctx.masks.items()},
            position_embeddings={k: to(t) if isinstance(t, torch.Tensor) else tuple(map(to, t))
                                 for k, t in ctx.position_embeddings.items()})
        weights = {n: (0.02 * torch.randn(p.shape, generator=generator)).to(dtype)
                   .requires_grad_() for n, p in layer.state_dict(keep_vars=True).items()}
        hidden = torch.randn(rows, width, runner.layout.width, generator=generator
                             ).to(dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runner.forward(index, layer, weights, hidden, ctx)
        kept = _storages([*weights.values(), hidden,
                          *(t for t in _context_tensors(ctx) if isinstance(t, torch.Tensor))])
    return sum(size for key, size in saved.items() if key not in kept)
