"""Run one decoder block with the architecture's own transformers code.

The block classes come from a skeleton model built on the ``meta`` device, so no weights
are allocated; a block is run with :func:`torch.func.functional_call` on whatever weights
the caller passes (base, expert, or merged with gradients flowing to the coefficients).
Rotary position embeddings and attention masks are computed the way the model's own
forward computes them, once per batch, and reused for every block and epoch.
"""

import copy
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import transformers
from torch.func import functional_call
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from mergekit_prodistill.calibration import Batch
from mergekit_prodistill.errors import ProDistillError

MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass
class BatchContext:
    """What every block needs besides hidden states, for one batch."""

    token_mask: torch.Tensor  # [batch, length] bool, True at real tokens
    position_ids: torch.Tensor
    position_embeddings: Tuple[torch.Tensor, torch.Tensor]
    masks: Dict[str, object]  # attention mask per attention type


class BlockRunner:
    def __init__(self, config: transformers.PretrainedConfig, device: torch.device,
                 trust_remote_code: bool = False):
        self.config = copy.deepcopy(config)
        # A mask format every decoder layer in transformers accepts, on every device.
        self.config._attn_implementation = "sdpa"
        self.device = device
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=trust_remote_code)
        decoder = skeleton.get_decoder()
        if not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            raise ProDistillError(
                f"architecture {type(skeleton).__name__}: expected decoder layers and a "
                "rotary embedding module; this model family is not supported"
            )
        self.layer_class = type(decoder.layers[0])
        self.rotary = type(decoder.rotary_emb)(config=self.config).to(device)
        self.attention_types = [self._attention_type(i) for i in range(len(decoder.layers))]

    def _attention_type(self, index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        # Mistral-style configs: one sliding window for every layer.
        if getattr(self.config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"

    def layer(self, index: int) -> torch.nn.Module:
        """A weightless block ``index`` (its index selects e.g. its attention type)."""
        with torch.device("meta"):
            layer = self.layer_class(self.config, layer_idx=index)
        return layer.eval()

    def context(self, batch: Batch, dtype: torch.dtype) -> BatchContext:
        """Positions, rotary embeddings and masks for ``batch``, computed in ``dtype``."""
        mask = batch.attention_mask.to(self.device)
        # Mask and rotary code read only the shape, dtype and device of the hidden states.
        hidden = torch.empty(*mask.shape, 0, dtype=dtype, device=self.device)
        position_ids = torch.arange(mask.shape[1], device=self.device).unsqueeze(0)
        with torch.no_grad():
            position_embeddings = self.rotary(hidden, position_ids=position_ids)
        masks = {
            kind: MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                past_key_values=None,
                position_ids=position_ids,
            )
            for kind in set(self.attention_types)
        }
        return BatchContext(mask.bool(), position_ids, position_embeddings, masks)

    def forward(
        self,
        index: int,
        layer: torch.nn.Module,
        weights: Dict[str, torch.Tensor],
        hidden: torch.Tensor,
        ctx: BatchContext,
    ) -> torch.Tensor:
        out = functional_call(
            layer,
            weights,
            (hidden,),
            {
                "attention_mask": ctx.masks[self.attention_types[index]],
                "position_ids": ctx.position_ids,
                "position_embeddings": ctx.position_embeddings,
            },
            strict=True,
        )
        return out[0] if isinstance(out, tuple) else out


def layer_weight_names(layer: torch.nn.Module, checkpoint_names: List[str]) -> Dict[str, str]:
    """Map checkpoint tensor names of one block to the block module's parameter names."""
    own = [name for name, _ in layer.named_parameters()]
    mapping = {}
    for full in checkpoint_names:
        match = [name for name in own if full == name or full.endswith("." + name)]
        if len(match) != 1:
            raise ProDistillError(f"tensor {full} does not match one parameter of the block")
        mapping[full] = match[0]
    missing = set(own) - set(mapping.values())
    if missing:
        raise ProDistillError(
            f"block parameters {sorted(missing)} have no tensor in the checkpoint layout"
        )
    return mapping
