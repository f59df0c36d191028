"""What one batch of an activation stream holds: the hidden states, and what later blocks
read from outside themselves.

Gemma 4's smaller checkpoints (E2B, E4B) feed every block a per-layer input computed
from the token ids and the embeddings, and let their last blocks reuse the keys and
values an earlier block of the same attention kind computed. A stream batch is
``[batch, length, width]``: the hidden states, then every block's per-layer input, then
the keys and values a later block reuses, one pair per attention kind. Carried in the
stream's own tensor, they are placed, saved for resume and split over processes with it,
and every plan that counts a stream counts them. For every other family the width is the
hidden size.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from mergekit_prodistill.models.families import head_dims, kv_sharing_modes

Shared = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # attention kind -> keys, values


@dataclass(frozen=True)
class StreamLayout:
    hidden: int
    num_layers: int
    per_layer: int = 0  # one block's per-layer input (0: none)
    shared: Tuple[Tuple[str, int, int], ...] = ()  # (attention kind, heads, head dim) reused
    stores: Tuple[Optional[str], ...] = ()  # per block: the kind whose keys it stores
    reads: Tuple[bool, ...] = ()  # per block: whether it reuses stored keys and values

    @classmethod
    def of(cls, config) -> "StreamLayout":
        config = config.get_text_config()
        layers = config.num_hidden_layers
        modes, kinds = kv_sharing_modes(config), getattr(config, "layer_types", None)
        reused = {kinds[i] for i, mode in enumerate(modes) if mode == "reuse"}
        dims = head_dims(config) if reused else []
        stores = tuple(kinds[i] if mode == "store" and kinds[i] in reused else None
                       for i, mode in enumerate(modes))
        shared = tuple((kind, *dims[i]) for i, kind in enumerate(stores) if kind)
        return cls(config.hidden_size, layers,
                   getattr(config, "hidden_size_per_layer_input", 0) or 0, shared, stores,
                   tuple(mode == "reuse" for mode in modes))

    @property
    def width(self) -> int:
        return (self.hidden + self.per_layer * self.num_layers
                + sum(2 * heads * dim for _, heads, dim in self.shared))

    @property
    def carries(self) -> bool:
        return self.width > self.hidden

    def hidden_of(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[..., :self.hidden]

    def per_layer_inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Every block's per-layer input: ``[batch, length, layers * per_layer]``."""
        return batch[..., self.hidden:self.hidden + self.per_layer * self.num_layers]

    def per_layer_input(self, batch: torch.Tensor, index: int) -> torch.Tensor:
        start = self.hidden + self.per_layer * index
        return batch[..., start:start + self.per_layer]

    def _kv_columns(self):
        start = self.hidden + self.per_layer * self.num_layers
        for kind, heads, dim in self.shared:
            yield kind, heads, dim, start
            start += 2 * heads * dim

    def shared_kv(self, batch: torch.Tensor) -> Shared:
        """The keys and values carried, ``[batch, heads, length, dim]`` each, as the
        attention that stored them computed them (same strides)."""
        shared = {}
        for kind, heads, dim, start in self._kv_columns():
            pair = batch[..., start:start + 2 * heads * dim]
            k, v = pair.view(*pair.shape[:2], 2, heads, dim).unbind(2)
            shared[kind] = (k.contiguous().transpose(1, 2), v.contiguous().transpose(1, 2))
        return shared

    def write(self, target: torch.Tensor, source: torch.Tensor, hidden: torch.Tensor,
              stored: Optional[Shared], index: int) -> None:
        """Block ``index``'s output into ``target``: its hidden states, what ``source``
        (the batch it read) carries, and the keys and values it stored for later blocks."""
        self.hidden_of(target).copy_(hidden)
        if not self.carries:
            return
        if target.data_ptr() != source.data_ptr():
            target[..., self.hidden:].copy_(source[..., self.hidden:])
        kind = self.stores[index] if stored else None
        for name, heads, dim, start in self._kv_columns():
            if name == kind:
                k, v = (t.transpose(1, 2) for t in stored[kind])
                target[..., start:start + 2 * heads * dim].copy_(
                    torch.stack([k, v], 2).flatten(2))
