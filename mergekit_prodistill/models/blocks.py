"""Run one decoder block with the architecture's own transformers code.

The block classes come from a skeleton model built on the ``meta`` device, so no weights
are allocated; a block is run with :func:`torch.func.functional_call` on whatever weights
the caller passes (base, expert, or merged with gradients flowing to the coefficients).
Rotary position embeddings and attention masks are computed the way the model's own
forward computes them, once per batch, and reused for every block and epoch. Token
embeddings go through the model's own embedding module, so any scale it applies is kept.

Only the families in :data:`~mergekit_prodistill.models.families.FAMILIES` are run.
"""

import copy
import inspect
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import transformers
from torch.func import functional_call

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.families import (MASK_FUNCTIONS, PER_LAYER_INPUT_MODULES, family_of,
                                                 meta_model, model_class)
from mergekit_prodistill.models.stream_layout import Shared, StreamLayout


def cache_argument(mask_function) -> str:
    """The name ``mask_function`` takes the key-value cache by: ``past_key_values`` in
    early transformers 5 releases, ``cache`` since (the old name then warns on every call)."""
    return "cache" if "cache" in inspect.signature(mask_function).parameters else "past_key_values"


EMBEDDING = "embed_tokens.weight"  # the input embedding, as every decoder here names it
CACHE_ARGUMENTS = {kind: cache_argument(function) for kind, function in MASK_FUNCTIONS.items()}


def decoder_of(model) -> torch.nn.Module:
    """The model's decoder (its blocks, final norm and rotary module). ``get_decoder``
    finds it by the class's base-model prefix, which Llama 4's text-only class names for
    its multimodal sibling (``language_model``; its decoder is ``model`` there), and which
    is the whole causal LM in Llama 4's multimodal class: the decoder is the first module
    down the ``model`` attributes that holds the blocks."""
    decoder = model.get_decoder()
    for candidate in (decoder, getattr(decoder, "model", None), getattr(model, "model", None)):
        if hasattr(candidate, "layers"):
            return candidate
    raise ProDistillError(f"{type(model).__name__}: no decoder with layers found")


def attention_implementation(config) -> str:
    """sdpa, a mask format every decoder layer accepts on every device; eager for families
    whose layers soft-cap attention scores (Gemma2, Gemma3 when set), which sdpa cannot."""
    if not model_class(config)._supports_sdpa:
        return "eager"
    return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"


def loading_attention(config):
    """The ``attn_implementation`` to load a model with so that its language model attends
    as the runner's blocks do; a multimodal model's towers keep their own default (Gemma
    4's audio tower has no sdpa)."""
    text = config.get_text_config()
    return attention_implementation(text) if text is config \
        else {"text_config": attention_implementation(text)}


@dataclass
class BatchContext:
    """What every block needs besides hidden states, for one batch."""

    token_mask: torch.Tensor  # [batch, length] bool, True at real tokens
    position_ids: torch.Tensor
    position_embeddings: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # per attention type
    masks: Dict[str, object]  # attention mask per attention type
    # This batch's share of its whole batch's real tokens: below 1 when processes that
    # share an expert split the batch's rows (parallel.py); losses are weighted by it.
    share: float = 1.0


class BlockRunner:
    def __init__(self, config: transformers.PretrainedConfig, device: torch.device):
        # A multimodal checkpoint's blocks and embedding are its language model's, run as
        # its causal LM runs them.
        config = config.get_text_config()
        self.family = family_of(config)
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = attention_implementation(config)
        self.device = device
        skeleton = meta_model(self.config)
        # The experts kernel transformers chose for this model (grouped_mm where it can
        # dispatch), so that blocks run as the loaded model runs them.
        self.config._experts_implementation = skeleton.config._experts_implementation
        decoder = decoder_of(skeleton)
        self.layer_class = type(decoder.layers[0])
        self.rotary = type(decoder.rotary_emb)(config=self.config).to(device)
        # Gemma3 keeps one rotary table per attention type, chosen by a forward argument.
        self.rotary_per_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.embedding = _with_buffers(skeleton, decoder.embed_tokens, device)
        self.attention_types = [self._attention_type(i) for i in range(len(decoder.layers))]
        self.layout = StreamLayout.of(self.config)
        # Stored tensors the model ignores when it loads (Gemma 4 E2B's keys and values of
        # the blocks that reuse others'): merged by task arithmetic, not run.
        self.unloaded = [re.compile(pattern) for module in (skeleton, decoder)
                         for pattern in getattr(module, "_keys_to_ignore_on_load_unexpected",
                                                None) or ()]
        # Gemma 4's blocks write the keys and values later blocks reuse into a dict the
        # decoder passes (the stream carries them from block to block).
        self.takes_shared_kv = "shared_kv_states" in inspect.signature(
            self.layer_class.forward).parameters
        self.per_layer_inputs = PerLayerInputs(skeleton, decoder, device) \
            if self.layout.per_layer else None

    def runs(self, name: str) -> bool:
        """Whether a block's stored tensor is one the model loads (one its block runs on)."""
        return not any(pattern.search(name) for pattern in self.unloaded)

    def _attention_type(self, index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        # Mistral-style configs: one sliding window for every layer.
        if getattr(self.config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"

    def embed(self, weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0: ``weight``'s rows for ``input_ids``, as the
        model's own forward computes them (scaled where the family scales them)."""
        rows = functional_call(self.embedding, {"weight": weight}, (input_ids.to(weight.device),))
        return self.family.scale_embeddings(self.config, rows)

    def input_tensor(self, weight) -> Optional[str]:
        """The decoder's own name of a tensor before the blocks that :meth:`start` reads
        (the embedding, and what computes per-layer inputs); None for others (a vision
        tower's)."""
        per_layer = self.per_layer_inputs.names if self.per_layer_inputs else []
        own = next((n for n in per_layer if weight.name.endswith("." + n)), None)
        return own or (EMBEDDING if weight.vocabulary_axis == 0 else None)

    def start(self, weights: Dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """The stream batch entering block 0 (``layout``), from ``weights`` (named as
        :meth:`input_tensor` names them) and ``input_ids``: the embeddings, and each
        block's per-layer input where the family has them."""
        hidden = self.embed(weights[EMBEDDING], input_ids)
        if not self.layout.carries:
            return hidden
        stream = hidden.new_zeros(*hidden.shape[:-1], self.layout.width)
        self.layout.hidden_of(stream).copy_(hidden)
        if self.per_layer_inputs:
            self.layout.per_layer_inputs(stream).copy_(
                self.per_layer_inputs.of(weights, input_ids.to(hidden.device), hidden).flatten(-2))
        return stream

    def layer(self, index: int) -> torch.nn.Module:
        """A weightless block ``index`` (its index selects e.g. its attention type)."""
        with torch.device("meta"):
            layer = self.layer_class(self.config, layer_idx=index)
        return layer.eval()

    def context(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> BatchContext:
        """Positions, rotary embeddings and masks for a batch with ``attention_mask``
        ([batch, length], 1 at real tokens), computed in ``dtype``."""
        mask = attention_mask.to(self.device)
        # Mask and rotary code read only the shape, dtype and device of the hidden states.
        hidden = torch.empty(*mask.shape, 0, dtype=dtype, device=self.device)
        position_ids = torch.arange(mask.shape[1], device=self.device).unsqueeze(0)
        kinds = set(self.attention_types)
        with torch.no_grad():
            if self.rotary_per_type:
                position_embeddings = {kind: self.rotary(hidden, position_ids, kind) for kind in kinds}
            else:
                shared = self.rotary(hidden, position_ids=position_ids)
                position_embeddings = {kind: shared for kind in kinds}
        masks = {
            kind: MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                position_ids=position_ids,
                **{CACHE_ARGUMENTS[kind]: None},
            )
            for kind in kinds
        }
        return BatchContext(mask.bool(), position_ids, position_embeddings, masks)

    def forward(self, index: int, layer: torch.nn.Module, weights: Dict[str, torch.Tensor],
                stream: torch.Tensor, ctx: BatchContext, stored: Optional[Shared] = None
                ) -> torch.Tensor:
        """Block ``index``'s output hidden states for a stream batch; the keys and values
        it keeps for later blocks go into ``stored`` where given."""
        kind, layout = self.attention_types[index], self.layout
        kwargs = {"attention_mask": ctx.masks[kind], "position_ids": ctx.position_ids,
                  "position_embeddings": ctx.position_embeddings[kind]}
        if layout.per_layer:
            kwargs["per_layer_input"] = layout.per_layer_input(stream, index)
        # What earlier blocks stored, unpacked for the blocks that reuse it.
        shared = layout.shared_kv(stream) if layout.reads[index] else {}
        if self.takes_shared_kv:
            kwargs["shared_kv_states"] = shared  # a storing block adds its own
        out = functional_call(layer, weights, (layout.hidden_of(stream),), kwargs, strict=True)
        if stored is not None:
            stored.update(shared)
        return out[0] if isinstance(out, tuple) else out


class PerLayerInputs(torch.nn.Module):
    """Every block's per-layer input ``[batch, length, layers, size]`` from the token ids
    and the embeddings, by the decoder's own methods (Gemma 4), on the weights passed."""

    def __init__(self, skeleton, decoder, device: torch.device):
        super().__init__()
        for name in PER_LAYER_INPUT_MODULES:
            _with_buffers(skeleton, getattr(decoder, name), device)
        self.decoder = decoder
        state = decoder.state_dict(keep_vars=True)
        self.names = [n for n in state if n.split(".")[0] in PER_LAYER_INPUT_MODULES]
        self.numel = sum(state[n].numel() for n in self.names)

    def forward(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decoder.project_per_layer_inputs(
            embeddings, self.decoder.get_per_layer_inputs(input_ids, embeddings))

    def of(self, weights: Dict[str, torch.Tensor], input_ids, embeddings) -> torch.Tensor:
        own = {f"decoder.{n}": weights[n] for n in self.names}
        return functional_call(self, own, (input_ids, embeddings))


def _with_buffers(skeleton, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` of the meta skeleton with its buffers (e.g. Gemma's embedding scale) made
    real on ``device`` and set by the model's own initialisation, as loading a checkpoint
    sets them; its parameters stay on meta, for functional_call to supply."""
    for name, buffer in list(module.named_buffers(recurse=False)):
        setattr(module, name, torch.empty_like(buffer, device=device))
    skeleton._init_weights(module)
    return module.eval()


def layer_weight_names(layer: torch.nn.Module, checkpoint_names: List[str]) -> Dict[str, str]:
    """Map checkpoint tensor names of one block to the block module's parameter names
    (and persistent buffers: DeepSeek-V3's router bias is one)."""
    own = list(layer.state_dict(keep_vars=True))
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
