"""The sizes a plan starts from: one decoder block of the base (built on the meta device
from ``config.json``, no weights) and every expert's calibration batches."""

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import torch
from mergekit.common import dtype_from_name

from mergekit_prodistill.models.blocks import BlockRunner
from mergekit_prodistill.models.families import experts_per_token, head_dims
from mergekit_prodistill.models.footprint import (Footprint, block_kinds, context_footprint,
                                                  saved_bytes)

# Layer kinds whose attention compares every query with every key (linear attention
# carries a state instead).
QUADRATIC = ("full_attention", "sliding_attention")

# A tensor under this many bytes comes from the C heap, which keeps freed blocks (see
# memory.SLACK_FRACTION); larger ones are mapped and returned at once.
HEAP_LIMIT = 32 * 2**20


def dtype_bytes(name: str) -> int:
    return torch.empty((), dtype=dtype_from_name(name)).element_size()


@dataclass(frozen=True)
class ModelShape:
    """One decoder block and the tensors around it, from config.json alone."""

    num_layers: int
    hidden: int
    heads: int
    head_dim: float  # averaged over the depth
    intermediate: int
    block_numel: int  # parameters of one block
    block_tensors: int
    largest: int  # elements of the block's largest tensor
    matmul_numel: int  # elements of the block's matrices: 2 FLOPs each per token
    vocab: Tuple[int, ...]  # embedding rows of the base, then of each expert
    tied: bool
    attention_types: int  # kinds of attention mask (full, sliding)
    heap_share: float  # share of the block's parameters in tensors under HEAP_LIMIT in fp32
    config: object = field(default=None, compare=False, repr=False)  # the base's
    quadratic_share: float = 1.0  # share of the blocks whose attention is softmax attention
    stream_width: int = 0  # values per token of a stream (StreamLayout): hidden and carried
    input_numel: int = 0  # elements of the tensors that start the streams (the embedding,
    #                       and what computes per-layer inputs)

    def saved(self, rows: int, width: int, element_bytes: int) -> int:
        """What a block's forward keeps for backward on a batch, by compute dtype (its
        bytes)."""
        return saved_bytes(self.config, MEASURED_DTYPES[element_bytes], rows, width)

    def context(self, element_bytes: int) -> Footprint:
        """What one batch's masks and positions hold, by compute dtype (its bytes)."""
        return context_footprint(self.config, MEASURED_DTYPES[element_bytes])


# A footprint measured in bf16 stands for fp16: both keep the same tensors.
MEASURED_DTYPES = {4: torch.float32, 2: torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    """Calibration batches of every expert as (prompts, padded width)."""

    batches: Tuple[Tuple[Tuple[int, int], ...], ...]
    tokens: Tuple[int, ...]  # real tokens per expert
    source: str
    prompt_lengths: Tuple[Tuple[int, ...], ...]  # per expert, held-out ones included,
    # before any continuation
    holdout_batches: Tuple[Tuple[Tuple[int, int], ...], ...] = ()  # held out, when training

    def slots(self, expert: int) -> int:
        """Token positions of one expert's stream, padding included."""
        return sum(rows * width for rows, width in self.batches[expert])

    def holdout_slots(self) -> int:
        """Token positions of one held-out stream, every expert's, padding included."""
        return sum(rows * width for batches in self.holdout_batches for rows, width in batches)

    def only(self, experts: Sequence[int]) -> "Workload":
        """The workload of these experts alone: the ones one process owns."""
        pick = lambda items: tuple(items[i] for i in experts) if items else ()  # noqa: E731
        return Workload(pick(self.batches), pick(self.tokens), self.source,
                        pick(self.prompt_lengths), pick(self.holdout_batches))

    def rows(self, part: int, parts: int) -> "Workload":
        """Rows part, part + parts, ... of every batch (``calibration.Batch.rows``): one
        process's share when several share an expert; its tokens in proportion. The
        prompts continued stay whole (the first of those processes continues them all)."""
        if parts == 1:
            return self
        cut = lambda bs: tuple((len(range(part, r, parts)), w) for r, w in bs)  # noqa: E731
        batches = tuple(cut(bs) for bs in self.batches)
        tokens = tuple(t * sum(r for r, _ in mine) // sum(r for r, _ in whole)
                       for t, mine, whole in zip(self.tokens, batches, self.batches))
        return Workload(batches, tokens, self.source, self.prompt_lengths,
                        tuple(cut(bs) for bs in self.holdout_batches))


def model_shape(base_config, expert_configs) -> ModelShape:
    """The shape of the largest kind of block (memory is counted for it); the matrices
    and attention of every block averaged over the depth (FLOPs are counted for them)."""
    # A multimodal checkpoint's: its language model's (the towers are merged by task
    # arithmetic, one tensor at a time).
    base_config = base_config.get_text_config()
    runner = BlockRunner(base_config, torch.device("meta"))
    kinds = block_kinds(runner)
    blocks = {kind: runner.layer(kind).state_dict(keep_vars=True) for kind in set(kinds)}
    numels = {kind: [p.numel() for p in params.values()] for kind, params in blocks.items()}
    largest = max(numels.values(), key=sum)
    attention = runner.attention_types
    hidden = base_config.hidden_size
    heads = base_config.num_attention_heads
    dims = head_dims(base_config)
    return ModelShape(
        num_layers=len(kinds),
        hidden=hidden,
        heads=heads,
        head_dim=sum(d for _, d in dims) / len(dims),
        intermediate=getattr(base_config, "intermediate_size", 4 * hidden),
        block_numel=sum(largest),
        block_tensors=max(map(len, numels.values())),
        largest=max(map(max, numels.values())),
        matmul_numel=sum(_routed_numel(p, base_config) for kind in kinds
                         for p in blocks[kind].values()) / len(kinds),
        vocab=tuple(c.get_text_config().vocab_size for c in (base_config, *expert_configs)),
        tied=bool(getattr(base_config, "tie_word_embeddings", False)),
        attention_types=len(set(attention)),
        heap_share=sum(n for n in largest if 4 * n < HEAP_LIMIT) / sum(largest),
        config=base_config,
        quadratic_share=sum(k in QUADRATIC for k in attention) / len(attention),
        stream_width=runner.layout.width,
        input_numel=hidden * base_config.vocab_size + (
            runner.per_layer_inputs.numel if runner.per_layer_inputs else 0),
    )


def _routed_numel(parameter, config) -> float:
    """Elements of a parameter that every token multiplies: all of a matrix, and of a
    mixture of experts' fused matrices (one per expert) those of the experts it is routed
    to."""
    if parameter.dim() == 2:
        return parameter.numel()
    if parameter.dim() == 3:
        return parameter.numel() * experts_per_token(config) / parameter.shape[0]
    return 0
