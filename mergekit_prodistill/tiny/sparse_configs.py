"""The tiny configs of the families whose blocks are not plain dense transformer blocks:
linear attention beside attention (Qwen3.5), and mixtures of experts."""

from __future__ import annotations

from .dense_configs import SLIDING_WINDOW, layer_types, multimodal, text_of
from .text import MAX_POSITIONS


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


def _qwen3_5_vl(head_dim, num_layers, common):
    from transformers import Qwen3_5Config

    # Qwen3.5's checkpoints as they ship: the tiny qwen3_5 language model beside a
    # one-block vision encoder and its patch merger; mergekit infers their layout.
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=common["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    return multimodal(Qwen3_5Config, text_of(_qwen3_5, head_dim, num_layers, common), vision,
                      common)


def _qwen3_5_moe(head_dim, num_layers, common):
    from transformers import Qwen3_5MoeTextConfig

    # Qwen3.5's (and 3.6's) mixtures of experts: the qwen3_5 blocks with routed experts
    # beside a gated shared expert in every block.
    experts = dict(num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=common["intermediate_size"] // 2,
                   shared_expert_intermediate_size=common["intermediate_size"] // 2)
    dense = vars(_qwen3_5(head_dim, num_layers, common))
    keys = ("head_dim", "layer_types", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
            "rope_parameters")
    common = {k: v for k, v in common.items() if k != "intermediate_size"}
    return Qwen3_5MoeTextConfig(**{k: dense[k] for k in keys}, **experts, **common)


def _qwen3_5_moe_vl(head_dim, num_layers, common):
    from transformers import Qwen3_5MoeConfig

    # Qwen3.5-MoE's checkpoints as they ship (experts stored fused: configs.HUB_FORMAT),
    # beside the vision encoder of qwen3_5_vl.
    text = text_of(_qwen3_5_moe, head_dim, num_layers, common)
    vision = _qwen3_5_vl(head_dim, num_layers, common).vision_config.to_dict()
    return multimodal(Qwen3_5MoeConfig, text, vision, common)


def _qwen2_5_vl(head_dim, num_layers, common):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    # Qwen2.5-VL: a Qwen2 language model with multimodal rotary sections (which text
    # positions fill alike) beside a one-block vision encoder; transformers gives its
    # text model no causal LM class of its own.
    sections = [head_dim // 4, head_dim // 8, head_dim // 8]  # half a head, as there
    text = Qwen2_5_VLTextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "mrope_section": sections},
                                **dict(common, architectures=None))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=common["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    return multimodal(Qwen2_5_VLConfig, text, vision, common)


def _qwen3_vl(head_dim, num_layers, common):
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig

    # Qwen3-VL (dense): a Qwen3 language model with interleaved multimodal rotary sections
    # beside a vision encoder that adds its features to early blocks (images only).
    text = Qwen3VLTextConfig(head_dim=head_dim,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                              "mrope_section": [head_dim // 4, head_dim // 8,
                                                                head_dim // 8],
                                              "mrope_interleaved": True},
                             **dict(common, architectures=None))
    # Three blocks, each feeding a deepstack merger, as mergekit's layout has three.
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=common["hidden_size"], patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1, 2])
    return multimodal(Qwen3VLConfig, text, vision, common)


def _qwen3_moe_vl(head_dim, num_layers, common):
    from transformers import Qwen3VLMoeConfig
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

    # Qwen3-VL's mixtures of experts (30B-A3B, 235B-A22B): qwen3_vl with 4 experts, 2 per
    # token, in every block, stored fused as the Hub's are (configs.HUB_FORMAT).
    dense = _qwen3_vl(head_dim, num_layers, common)
    text = Qwen3VLMoeTextConfig(head_dim=head_dim,
                                rope_parameters=dense.text_config.rope_parameters,
                                num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=common["intermediate_size"] // 2,
                                **dict(common, architectures=None))
    return multimodal(Qwen3VLMoeConfig, text, dense.vision_config.to_dict(), common)


def _qwen3_moe(head_dim, num_layers, common):
    from transformers import Qwen3MoeConfig

    # 4 experts, 2 per token, every block sparse.
    return Qwen3MoeConfig(head_dim=head_dim, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=common["intermediate_size"] // 2,
                          norm_topk_prob=True, **common)


def _mixtral(head_dim, num_layers, common):
    from transformers import MixtralConfig

    return MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=SLIDING_WINDOW, **common)


def _qwen2_moe(head_dim, num_layers, common):
    from transformers import Qwen2MoeConfig

    # Routed experts beside a gated shared expert, as in Qwen1.5/Qwen2-MoE.
    return Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=common["intermediate_size"] // 2,
                          shared_expert_intermediate_size=common["intermediate_size"], **common)


def _qwen3_next(head_dim, num_layers, common):
    from transformers import Qwen3NextConfig

    # Qwen3.5's gated delta-net beside attention, every block a mixture of experts.
    return Qwen3NextConfig(
        head_dim=head_dim, layer_types=[("linear_attention", "full_attention")[i % 2]
                                        for i in range(num_layers)],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=common["intermediate_size"] // 2,
        shared_expert_intermediate_size=common["intermediate_size"] // 2, **common)


def _deepseek_v3(head_dim, num_layers, common):
    from transformers import DeepseekV3Config

    # Multi-head latent attention; a dense first block, then routed experts (two groups,
    # one chosen) beside a shared one.
    common = dict(common, num_key_value_heads=common["num_attention_heads"])
    return DeepseekV3Config(
        kv_lora_rank=head_dim, q_lora_rank=2 * head_dim, qk_rope_head_dim=head_dim // 2,
        qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, moe_intermediate_size=common["intermediate_size"] // 2,
        **common)


def _gpt_oss(head_dim, num_layers, common):
    from transformers import GptOssConfig

    # Attention sinks, biases, alternating sliding layers, experts with biases; YaRN
    # rotary stretching a 32 times shorter original context to MAX_POSITIONS.
    return GptOssConfig(head_dim=head_dim, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=SLIDING_WINDOW, layer_types=layer_types(num_layers),
                        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "rope_theta": 150000.0,
                                         "original_max_position_embeddings": MAX_POSITIONS // 32},
                        **common)


def _llama4(head_dim, num_layers, common):
    from transformers import Llama4TextConfig

    # Chunked attention with rotary, every second block full attention without (NoPE);
    # every second block a mixture of experts (top-1 beside a shared expert).
    return Llama4TextConfig(head_dim=head_dim, num_local_experts=4, num_experts_per_tok=1,
                            interleave_moe_layer_step=2, no_rope_layer_interval=2,
                            attention_chunk_size=SLIDING_WINDOW,
                            intermediate_size_mlp=common["intermediate_size"],
                            **dict(common, intermediate_size=common["intermediate_size"] // 2))




def _llama4_vl(head_dim, num_layers, common):
    from transformers import Llama4Config, Llama4VisionConfig

    # Llama 4's checkpoints as they ship: the tiny llama4 language model beside a
    # one-layer vision model and its projector.
    hidden = common["hidden_size"]
    vision = Llama4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=56, patch_size=14,
                                vision_output_dim=hidden, projector_input_dim=hidden,
                                projector_output_dim=hidden)
    return multimodal(Llama4Config, text_of(_llama4, head_dim, num_layers, common), vision,
                      common, image_token_index=common["vocab_size"] - 1)


def _gemma4(head_dim, num_layers, common):
    from transformers import Gemma4TextConfig

    # A dense MLP beside a mixture of experts in every block; sliding layers, and full
    # attention layers with wider heads, one key/value head whose keys are its values and
    # rotary over a quarter of each head; soft-capped logits. Without per-layer inputs
    # and key/value sharing between layers (the gemma4_e2b family has them).
    return Gemma4TextConfig(
        head_dim=head_dim, global_head_dim=2 * head_dim, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=SLIDING_WINDOW, layer_types=layer_types(num_layers),
        enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=common["intermediate_size"] // 2, final_logit_softcapping=3.0,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25}},
        **common)


def _gemma4_e2b(head_dim, num_layers, common):
    from transformers import Gemma4TextConfig

    # Gemma 4's smallest checkpoints (E2B, E4B): every block takes a per-layer input, and
    # the last two blocks (one of each attention kind, beyond the num_layers asked for)
    # reuse the keys and values of the last earlier block of their kind, with MLPs twice
    # as wide. No mixture of experts, as there.
    layers = num_layers + 2
    return Gemma4TextConfig(
        head_dim=head_dim, global_head_dim=2 * head_dim, num_global_key_value_heads=1,
        sliding_window=SLIDING_WINDOW, layer_types=layer_types(layers),
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=common["vocab_size"],
        num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=3.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                            "partial_rotary_factor": 0.25}},
        **dict(common, num_hidden_layers=layers))


def _gemma4_vl(head_dim, num_layers, common):
    from transformers import Gemma4Config
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    # Gemma 4's multimodal checkpoints (its larger sizes): the tiny gemma4 language model
    # beside a one-layer vision tower; mergekit has no layout of them and infers one.
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    # Bidirectional attention within images, as the larger sizes have it; text is causal.
    text = text_of(_gemma4, head_dim, num_layers, common)
    text.use_bidirectional_attention = "vision"
    return multimodal(Gemma4Config, text, vision, common, audio_config=None)


def _gemma4_e2b_vl(head_dim, num_layers, common):
    from transformers import Gemma4Config
    from transformers.models.gemma4.configuration_gemma4 import (Gemma4AudioConfig,
                                                                 Gemma4VisionConfig)

    # Gemma 4 E2B/E4B as they ship: the tiny gemma4_e2b language model beside one-layer
    # vision and audio towers.
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              subsampling_conv_channels=[8, 4], output_proj_dims=32)
    return multimodal(Gemma4Config, text_of(_gemma4_e2b, head_dim, num_layers, common), vision,
                      common, audio_config=audio.to_dict())


CONFIGS = {
    "qwen3_5": _qwen3_5,
    "qwen3_5_vl": _qwen3_5_vl,
    "qwen3_5_moe": _qwen3_5_moe,
    "qwen3_5_moe_vl": _qwen3_5_moe_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_moe_vl": _qwen3_moe_vl,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_next": _qwen3_next,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
    "llama4_vl": _llama4_vl,
    "gemma4": _gemma4,
    "gemma4_e2b": _gemma4_e2b,
    "gemma4_e2b_vl": _gemma4_e2b_vl,
    "gemma4_vl": _gemma4_vl,
}
