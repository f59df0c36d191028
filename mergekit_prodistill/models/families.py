"""The families the merge runs block by block, and what each one's forward does outside
its blocks.

For each family in :data:`FAMILIES`, everything its decoder's forward does outside the
blocks is known (an embedding multiplier, logit scaling or soft-capping), and tests check
its blocks, one by one, against the full model. Every other architecture is refused
before any weight is read, in one line that names what is missing for it.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_MAPPING)

from mergekit_prodistill.errors import ProDistillError

# The kinds of layer run block by block, each with the mask transformers builds for it
# (linear attention takes the padding mask alone).
MASK_FUNCTIONS = {kind: LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind]
                  for kind in ("full_attention", "sliding_attention", "chunked_attention",
                               "linear_attention")}


@dataclass(frozen=True)
class Family:
    """What a family's forward does outside its blocks, beyond embedding lookup and the
    final norm (both run through the family's own modules). Values are config keys."""

    embedding_multiplier: Optional[str] = None  # embeddings are multiplied by it
    logits_divisor: Optional[str] = None  # the LM head's logits are divided by it
    logits_multiplier: Optional[str] = None  # the LM head's logits are multiplied by it
    logits_softcap: Optional[str] = None  # logits become cap * tanh(logits / cap)

    def scale_embeddings(self, config, embeddings: torch.Tensor) -> torch.Tensor:
        if self.embedding_multiplier:
            return embeddings * getattr(config, self.embedding_multiplier)
        return embeddings

    def finish_logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the LM head's output, in the model's order of operations."""
        if self.logits_divisor:
            logits = logits / getattr(config, self.logits_divisor)
        if self.logits_multiplier:
            logits = logits * getattr(config, self.logits_multiplier)
        cap = getattr(config, self.logits_softcap, None) if self.logits_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


PLAIN = Family()
# Read from each family's modeling code in transformers: Gemma's embedding module scales
# by sqrt(hidden) itself, and its (1 + weight) norms are its own norm modules. Attention
# soft-capping and Granite's attention and residual multipliers live inside the blocks.
FAMILIES = {
    "LlamaForCausalLM": PLAIN,
    "MistralForCausalLM": PLAIN,
    "Qwen2ForCausalLM": PLAIN,
    "Qwen3ForCausalLM": PLAIN,
    "GemmaForCausalLM": PLAIN,
    "Gemma2ForCausalLM": Family(logits_softcap="final_logit_softcapping"),
    "Gemma3ForCausalLM": Family(logits_softcap="final_logit_softcapping"),
    "GraniteForCausalLM": Family(embedding_multiplier="embedding_multiplier",
                                 logits_divisor="logits_scaling"),
    "Phi3ForCausalLM": PLAIN,
    "Olmo2ForCausalLM": PLAIN,
    "Olmo3ForCausalLM": PLAIN,
    "Cohere2ForCausalLM": Family(logits_multiplier="logit_scale"),
    "SmolLM3ForCausalLM": PLAIN,
    "Glm4ForCausalLM": PLAIN,
    "Exaone4ForCausalLM": PLAIN,
    "SeedOssForCausalLM": PLAIN,
    "Ernie4_5ForCausalLM": PLAIN,
    "Qwen3_5ForCausalLM": PLAIN,
    "Qwen3_5MoeForCausalLM": PLAIN,
    "Qwen3MoeForCausalLM": PLAIN,
    "MixtralForCausalLM": PLAIN,
    "Qwen2MoeForCausalLM": PLAIN,
    "Qwen3NextForCausalLM": PLAIN,
    "DeepseekV3ForCausalLM": PLAIN,
    "GptOssForCausalLM": PLAIN,
    "Llama4ForCausalLM": PLAIN,
    "Gemma4ForCausalLM": Family(logits_softcap="final_logit_softcapping"),
    # Multimodal: the language model merged block by block, the vision tower and
    # projector by task arithmetic. Gemma 3's forward does not soft-cap its logits.
    "Gemma3ForConditionalGeneration": PLAIN,
    "Gemma4ForConditionalGeneration": Family(logits_softcap="final_logit_softcapping"),
    "Qwen3_5ForConditionalGeneration": PLAIN,
    "Qwen3_5MoeForConditionalGeneration": PLAIN,
    "Qwen2_5_VLForConditionalGeneration": PLAIN,
    "Qwen3VLForConditionalGeneration": PLAIN,
    "Qwen3VLMoeForConditionalGeneration": PLAIN,
    "Mistral3ForConditionalGeneration": PLAIN,
    "Llama4ForConditionalGeneration": PLAIN,
}


# Config keys that give a family's blocks a mixture of experts (the plan measures them apart).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# The decoder modules that compute Gemma 4's per-layer inputs from the token ids and the
# embeddings, before the blocks (its E2B/E4B checkpoints have them).
PER_LAYER_INPUT_MODULES = {"embed_tokens_per_layer", "per_layer_model_projection",
                           "per_layer_projection_norm"}


def vocabulary_indexed(config) -> Dict[str, str]:
    """Decoder modules other than the embedding whose rows are the vocabulary's (Gemma 4's
    per-layer embeddings), each with the config key that counts them: those whose count
    is the vocabulary's in ``config``."""
    text = config.get_text_config()
    keys = {"embed_tokens_per_layer": "vocab_size_per_layer_input"}
    return {m: k for m, k in keys.items()
            if getattr(text, k, None) == text.vocab_size
            and getattr(text, "hidden_size_per_layer_input", 0)}


def language_model(architecture: str, config: dict) -> Tuple[str, dict]:
    """The causal LM class name and config of a checkpoint's language model: the model's
    own, or a multimodal checkpoint's text model (its ``text_config``)."""
    text = config.get("text_config")
    if architecture.endswith("ForConditionalGeneration") and isinstance(text, dict):
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.get("model_type"), ""), text
    return architecture, config


def missing_for(architecture: str, config: dict) -> str:
    """What the block-by-block merge lacks for a family it does not accept, in words."""
    name, text = language_model(architecture, config)
    if name != architecture:
        if name in FAMILIES:
            return (f"its language model ({name}) is, but the multimodal checkpoint is not "
                    "yet checked against its own forward")
        return (f"its language model ({name or text.get('model_type')}) is not one of the "
                "families below")
    if not architecture.endswith("ForCausalLM"):
        return "it is not a causal language model"
    kinds = sorted(set(config.get("layer_types") or ()) - set(MASK_FUNCTIONS))
    if kinds:
        return f"its {' and '.join(kinds)} layers are not run block by block yet"
    return "its blocks are not yet checked against its own forward"


def check_supported(architectures: Optional[Sequence[str]], config: dict, where: str = "") -> None:
    """Refuse a model whose family the block-by-block merge is not known to run exactly
    (a multimodal checkpoint's, as its own forward runs its language model), naming what
    is missing."""
    names = list(architectures or [])
    where = f"{where}: " if where else ""
    text = language_model(names[0], config)[1] if len(names) == 1 else config
    if len(names) != 1 or names[0] not in FAMILIES:
        why = f": {missing_for(names[0], config)}" if len(names) == 1 else ""
        raise ProDistillError(
            f"{where}architecture {'/'.join(names) or 'unknown'} is not supported{why}; "
            f"prodistill supports {', '.join(FAMILIES)}"
        )
    # Gemma 4's larger checkpoints attend bidirectionally within images ("vision"), and
    # causally over text, the only input the merge feeds them.
    if text.get("use_bidirectional_attention") in (True, "all"):
        raise ProDistillError(
            f"{where}{names[0]} with use_bidirectional_attention is not supported; "
            "prodistill merges causal language models"
        )


def head_dims(config) -> List[Tuple[int, int]]:
    """(key/value heads, head dimension) of every layer: Gemma 4's full attention layers
    have their own (``per_layer_config``)."""
    dims = []
    for layer in config.per_layer_config:
        heads = layer.num_attention_heads
        dims.append((getattr(layer, "num_key_value_heads", None) or heads,
                     getattr(layer, "head_dim", None) or layer.hidden_size // heads))
    return dims


def kv_sharing_modes(config) -> List[Optional[str]]:
    """Per block: "store" where it keeps its keys and values for later blocks, "reuse"
    where it takes an earlier block's instead of computing its own (Gemma 4's last
    blocks), None elsewhere."""
    return list(getattr(config, "kv_sharing_modes", None) or [None] * config.num_hidden_layers)


def experts_per_token(config) -> int:
    """How many of a mixture's experts each token is routed to (1 without one)."""
    return next((getattr(config, k) for k in ("num_experts_per_tok", "top_k_experts")
                 if getattr(config, k, None)), 1)


def model_class(config) -> type:
    """The class transformers builds ``config``'s model with: the one its checkpoint names
    (``architectures``) where transformers has it for this config (Qwen3.5's multimodal
    checkpoints, which the causal LM mapping would load as their text model alone), else
    the causal LM class transformers maps the config to."""
    named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    if isinstance(named, type) and isinstance(config, getattr(named, "config_class", ())):
        return named
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # The text model of a multimodal checkpoint that transformers gives no causal LM of
    # its own (Qwen2.5-VL's, Qwen3-VL's): its decoder, which the runner's blocks come from.
    if type(config) not in MODEL_MAPPING:
        raise ProDistillError(
            f"model_type '{config.model_type}' has no causal language model in transformers")
    return MODEL_MAPPING[type(config)]


def meta_model(config) -> torch.nn.Module:
    """``config``'s model, built by its own class (:func:`model_class`) on the meta
    device: its modules and tensor names, no memory."""
    with torch.device("meta"):
        return model_class(config)._from_config(config)


def load_model(path: str, config, **kwargs) -> torch.nn.Module:
    """The checkpoint at ``path`` (whose config is ``config``), loaded by its own class."""
    return model_class(config).from_pretrained(path, **kwargs)


# The text models of multimodal families that transformers gives no causal LM of their
# own: their blocks run as their checkpoint's do (the head is the checkpoint's family's).
TEXT_DECODERS = {"Qwen2_5_VLTextModel": PLAIN, "Qwen3VLTextModel": PLAIN,
                 "Qwen3VLMoeTextModel": PLAIN}


def family_of(config) -> Family:
    """The family of ``config``'s model; preflight has refused every other."""
    name = model_class(config).__name__
    if name not in FAMILIES and name not in TEXT_DECODERS:
        check_supported([name], {})
    return FAMILIES.get(name) or TEXT_DECODERS[name]
