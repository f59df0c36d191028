"""The tiny configs of the dense families: one function per architecture, (head_dim,
num_layers, the settings every family shares) -> that family's config, with the features
its real checkpoints have (GQA, sliding windows, soft-capping, multipliers, ...)."""

from __future__ import annotations

# Small window so prompts of ordinary length really cross it.
SLIDING_WINDOW = 6
# One sliding and one full attention layer first, so two layers already hold both kinds.
_ALTERNATING = ("sliding_attention", "full_attention")


def multimodal(config_class, text, vision, common, **settings):
    """A multimodal checkpoint's config around a tiny text config: the checkpoint's class,
    its tying and token ids on the outer config, as the Hub's checkpoints have them."""
    ids = {k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return config_class(text_config=text.to_dict(),
                        vision_config=vision if isinstance(vision, dict) else vision.to_dict(),
                        architectures=common["architectures"],
                        tie_word_embeddings=common["tie_word_embeddings"], **ids, **settings)


def text_of(family, head_dim, num_layers, common):
    """``family``'s tiny text config, for a multimodal config to hold."""
    return family(head_dim, num_layers, dict(common, architectures=None))


def _llama(head_dim, num_layers, common):
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _mistral(head_dim, num_layers, common):
    from transformers import MistralConfig

    return MistralConfig(sliding_window=SLIDING_WINDOW, **common)


def _mistral3_vl(head_dim, num_layers, common):
    from transformers import Mistral3Config, PixtralVisionConfig

    # Mistral Small 3's multimodal checkpoints: the tiny mistral language model beside a
    # one-layer Pixtral vision tower and Mistral 3's patch-merging projector.
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=56, patch_size=14)
    return multimodal(Mistral3Config, text_of(_mistral, head_dim, num_layers, common), vision,
                      common, image_token_index=common["vocab_size"] - 1, spatial_merge_size=2)


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
                        sliding_window=SLIDING_WINDOW, layer_types=layer_types(num_layers),
                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common)


def _gemma3(head_dim, num_layers, common):
    from transformers import Gemma3TextConfig

    # Sliding layers take their own rotary base, as in real Gemma3 checkpoints.
    return Gemma3TextConfig(
        head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW,
        layer_types=layer_types(num_layers), final_logit_softcapping=3.0,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **common)


def _gemma3_vl(head_dim, num_layers, common):
    from transformers import Gemma3Config, SiglipVisionConfig

    # Gemma 3's multimodal checkpoints: the tiny gemma3 language model beside a one-layer
    # SigLIP vision tower and Gemma 3's projector; the image token is the last row.
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14,
                                vision_use_head=False)
    return multimodal(Gemma3Config, text_of(_gemma3, head_dim, num_layers, common), vision,
                      common, mm_tokens_per_image=4, image_token_index=common["vocab_size"] - 1)


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

    return Olmo3Config(sliding_window=SLIDING_WINDOW, layer_types=layer_types(num_layers),
                       **common)


def _cohere2(head_dim, num_layers, common):
    from transformers import Cohere2Config

    # Attention and MLP in parallel off one LayerNorm; logits scaled by logit_scale.
    return Cohere2Config(logit_scale=0.5, sliding_window=SLIDING_WINDOW,
                         layer_types=layer_types(num_layers), **common)


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

    return Exaone4Config(sliding_window=SLIDING_WINDOW, layer_types=layer_types(num_layers),
                         **common)


def _seed_oss(head_dim, num_layers, common):
    from transformers import SeedOssConfig

    # Its defaults drop out 10% of attention and residuals while training: not the experts'.
    return SeedOssConfig(head_dim=head_dim, attention_bias=True, attention_dropout=0.0,
                         residual_dropout=0.0, **common)


def _ernie4_5(head_dim, num_layers, common):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(head_dim=head_dim, **common)


def layer_types(num_layers: int) -> list[str]:
    return [_ALTERNATING[i % 2] for i in range(num_layers)]


CONFIGS = {
    "llama": _llama,
    "mistral": _mistral,
    "mistral3_vl": _mistral3_vl,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3_vl": _gemma3_vl,
    "granite": _granite,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "olmo3": _olmo3,
    "cohere2": _cohere2,
    "smollm3": _smollm3,
    "glm4": _glm4,
    "exaone4": _exaone4,
    "seed_oss": _seed_oss,
    "ernie4_5": _ernie4_5,
}
