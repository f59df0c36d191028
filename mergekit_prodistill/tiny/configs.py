"""The tiny families' model configs: one per architecture, each with the features that
family's real checkpoints have (GQA, sliding windows, soft-capping, multipliers, ...).

`make_config` is the one place that knows how each family is configured; everything else
in the tiny package is architecture-agnostic.
"""

from __future__ import annotations

from .text import BOS_ID, EOS_ID, MAX_POSITIONS, PAD_ID

__all__ = ["ARCHITECTURES", "ARCH_CLASS", "SLIDING_WINDOW", "make_config"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "granite",
                 "phi3", "olmo2", "olmo3", "cohere2", "smollm3", "glm4", "exaone4", "seed_oss",
                 "ernie4_5", "qwen3_5")

# Small window so prompts of ordinary length really cross it.
SLIDING_WINDOW = 6

ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
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
}
# One sliding and one full attention layer first, so two layers already hold both kinds.
_ALTERNATING = ("sliding_attention", "full_attention")


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
        tie_embeddings = arch in ("qwen3", "gemma", "gemma2", "gemma3", "cohere2", "smollm3",
                                  "ernie4_5", "qwen3_5")
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


# One function per architecture: (head_dim, num_layers, the settings every family shares)
# -> that family's config, with the features its real checkpoints have.

def _llama(head_dim, num_layers, common):
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _mistral(head_dim, num_layers, common):
    from transformers import MistralConfig

    return MistralConfig(sliding_window=SLIDING_WINDOW, **common)


def _qwen2(head_dim, num_layers, common):
    from transformers import Qwen2Config

    # Qwen2 derives layer_types from these: layers with index >= max_window_layers
    # slide, so with max_window_layers=1 every layer after the first is sliding.
    return Qwen2Config(use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                       max_window_layers=1, **common)


def _qwen3(head_dim, num_layers, common):
    from transformers import Qwen3Config

    # Qwen3Config defaults head_dim to 128 instead of hidden/heads.
    return Qwen3Config(head_dim=head_dim, **common)


def _gemma(head_dim, num_layers, common):
    from transformers import GemmaConfig

    # Gemma configs default head_dim to 256 instead of hidden/heads.
    return GemmaConfig(head_dim=head_dim, **common)


def _gemma2(head_dim, num_layers, common):
    from transformers import Gemma2Config

    # Soft-capping thresholds low enough that the tiny model's logits reach them.
    return Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                        sliding_window=SLIDING_WINDOW, layer_types=_layer_types(num_layers),
                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common)


def _gemma3(head_dim, num_layers, common):
    from transformers import Gemma3TextConfig

    # Sliding layers take their own rotary base, as in real Gemma3 checkpoints.
    return Gemma3TextConfig(
        head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW,
        layer_types=_layer_types(num_layers), final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **common)


def _granite(head_dim, num_layers, common):
    from transformers import GraniteConfig

    # Multipliers away from 1, as in Granite 3 checkpoints, so that ignoring any shows.
    return GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22,
                         attention_multiplier=1 / head_dim, logits_scaling=8.0, **common)


def _phi3(head_dim, num_layers, common):
    from transformers import Phi3Config

    # Phi-3 slides every layer; Phi-4-mini rotates part of each head (fused qkv, gate_up).
    return Phi3Config(sliding_window=SLIDING_WINDOW, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, **common)


def _olmo2(head_dim, num_layers, common):
    from transformers import Olmo2Config

    return Olmo2Config(**common)  # norms after attention and MLP, q/k norms over all heads


def _olmo3(head_dim, num_layers, common):
    from transformers import Olmo3Config

    return Olmo3Config(sliding_window=SLIDING_WINDOW, layer_types=_layer_types(num_layers),
                       **common)


def _cohere2(head_dim, num_layers, common):
    from transformers import Cohere2Config

    # Attention and MLP in parallel off one LayerNorm; logits scaled by logit_scale.
    return Cohere2Config(logit_scale=0.5, sliding_window=SLIDING_WINDOW,
                         layer_types=_layer_types(num_layers), **common)


def _smollm3(head_dim, num_layers, common):
    from transformers import SmolLM3Config

    # Every second layer without rotary embeddings (NoPE), as every fourth in SmolLM3.
    return SmolLM3Config(no_rope_layer_interval=2, **common)


def _glm4(head_dim, num_layers, common):
    from transformers import Glm4Config

    return Glm4Config(head_dim=head_dim, attention_bias=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, **common)


def _exaone4(head_dim, num_layers, common):
    from transformers import Exaone4Config

    return Exaone4Config(sliding_window=SLIDING_WINDOW, layer_types=_layer_types(num_layers),
                         **common)


def _seed_oss(head_dim, num_layers, common):
    from transformers import SeedOssConfig

    # Its defaults drop out 10% of attention and residuals while training: not the experts'.
    return SeedOssConfig(head_dim=head_dim, attention_bias=True, attention_dropout=0.0,
                         residual_dropout=0.0, **common)


def _ernie4_5(head_dim, num_layers, common):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(head_dim=head_dim, **common)


def _qwen3_5(head_dim, num_layers, common):
    from transformers import Qwen3_5TextConfig

    # Gated delta-net (linear attention) layers before each full attention layer, as in
    # Qwen3.5 (three to one there); multimodal rotary sections over half of each head.
    return Qwen3_5TextConfig(
        head_dim=head_dim, layer_types=[("linear_attention", "full_attention")[i % 2]
                                        for i in range(num_layers)],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim, linear_conv_kernel_dim=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True}, **common)


def _layer_types(num_layers: int) -> list[str]:
    return [_ALTERNATING[i % 2] for i in range(num_layers)]


_FAMILY_CONFIG = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
                  "gemma": _gemma, "gemma2": _gemma2, "gemma3": _gemma3, "granite": _granite,
                  "phi3": _phi3, "olmo2": _olmo2, "olmo3": _olmo3, "cohere2": _cohere2,
                  "smollm3": _smollm3, "glm4": _glm4, "exaone4": _exaone4,
                  "seed_oss": _seed_oss, "ernie4_5": _ernie4_5, "qwen3_5": _qwen3_5}
assert tuple(_FAMILY_CONFIG) == ARCHITECTURES
