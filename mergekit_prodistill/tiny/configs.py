"""The tiny families' model configs: one per architecture, each with the features that
family's real checkpoints have (GQA, sliding windows, soft-capping, multipliers, ...).

`make_config` is the one place that builds them (from `dense_configs` and
`sparse_configs`); everything else in the tiny package is architecture-agnostic.
"""

from __future__ import annotations

from . import dense_configs, sparse_configs
from .dense_configs import SLIDING_WINDOW
from .text import BOS_ID, EOS_ID, MAX_POSITIONS, PAD_ID

__all__ = ["ARCHITECTURES", "ARCH_CLASS", "HUB_FORMAT", "HUB_NAMES", "SLIDING_WINDOW", "make_config"]

ARCHITECTURES = ("llama", "mistral", "mistral3_vl", "qwen2", "qwen3", "gemma", "gemma2",
                 "gemma3", "gemma3_vl", "granite", "phi3", "olmo2", "olmo3", "cohere2",
                 "smollm3", "glm4", "exaone4", "seed_oss", "ernie4_5", "qwen3_5", "qwen3_5_vl",
                 "qwen3_5_moe", "qwen3_5_moe_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_moe_vl",
                 "qwen3_moe", "mixtral", "qwen2_moe", "qwen3_next", "deepseek_v3", "gpt_oss",
                 "llama4", "llama4_vl", "gemma4", "gemma4_e2b", "gemma4_e2b_vl",
                 "gemma4_vl")

ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mistral3_vl": "Mistral3ForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_vl": "Gemma3ForConditionalGeneration",
    "granite": "GraniteForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "cohere2": "Cohere2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_5_vl": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForCausalLM",
    "qwen3_5_moe_vl": "Qwen3_5MoeForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_moe_vl": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "llama4": "Llama4ForCausalLM",
    "llama4_vl": "Llama4ForConditionalGeneration",
    "gemma4": "Gemma4ForCausalLM",
    "gemma4_e2b": "Gemma4ForCausalLM",
    "gemma4_e2b_vl": "Gemma4ForConditionalGeneration",
    "gemma4_vl": "Gemma4ForConditionalGeneration",
}

# Name prefixes transformers saves under, and those the Hub's checkpoints of the class
# use instead (and mergekit's layout names): Gemma 3's SigLIP tower sits one level deeper.
HUB_NAMES = {
    "Gemma3ForConditionalGeneration": {"vision_tower.": "vision_tower.vision_model."},
}


# Classes whose Hub checkpoints store transformers' own tensors (a mixture of experts'
# fused matrices), which save_pretrained would otherwise split back into one per expert.
HUB_FORMAT = {"Qwen3_5MoeForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"}


def make_config(
    arch: str,
    vocab_size: int,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    tie_embeddings: bool | None,
):
    """The transformers config of a tiny `arch` model; `tie_embeddings=None` ties as that family's
    checkpoints do."""
    if arch not in _FAMILY_CONFIG:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if tie_embeddings is None:
        # Gemma checkpoints have no LM head of their own (mergekit's gemma layout has none).
        tie_embeddings = arch not in ("llama", "mistral", "mistral3_vl", "qwen2", "granite",
                                      "phi3", "olmo2", "olmo3", "glm4", "exaone4", "seed_oss",
                                      "qwen2_5_vl")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=[ARCH_CLASS[arch]],
    )
    return _FAMILY_CONFIG[arch](hidden_size // num_heads, num_layers, common)


_FAMILY_CONFIG = {**dense_configs.CONFIGS, **sparse_configs.CONFIGS}
assert tuple(_FAMILY_CONFIG) == ARCHITECTURES
