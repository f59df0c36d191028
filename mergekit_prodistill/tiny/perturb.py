"""How the tiny families' weights are made: the base moved off its initial values, each
expert a small seeded perturbation of it, and the new rows of an expert that adds tokens.

Every draw comes from an explicit `torch.Generator`, so the same seeds give the same
bytes and the caller's global torch RNG is left alone.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

__all__ = ["expert_state", "perturb_base", "with_added_tokens"]


@torch.no_grad()
def perturb_base(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move `model`'s norm weights and biases off their initial values, in place."""
    # Norm weights init to exactly 1 and biases to 0; move them off those values so a
    # merge that ignores or mishandles norms/biases gives a visibly different result.
    for module in model.modules():
        # RMSNorm, Cohere's LayerNorm, Qwen3.5's RMSNormGated
        is_norm = "RMSNorm" in type(module).__name__ or type(module).__name__.endswith("LayerNorm")
        stored = [(n, b) for n, b in module.named_buffers(recurse=False)
                  if n not in module._non_persistent_buffers_set and b.is_floating_point()]
        for pname, p in [*module.named_parameters(recurse=False), *stored]:
            if pname.endswith("bias"):  # Qwen3.5: dt_bias
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif is_norm:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.numel() and bool(torch.isinf(p).all()):
                # Gemma 4's audio clipping bounds: infinite until a checkpoint sets them.
                p.copy_(torch.sign(p) * (3.0 + 0.1 * torch.randn(p.shape, generator=gen)))
            elif p.numel() and bool((p == p.flatten()[0]).all()):
                # Others that start constant: Gemma 4's layer scalar and router scales,
                # Gemma 3's image projection (zeros).
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1.0 + 0.1 * noise) if p.flatten()[0] != 0 else 0.02 * noise)


@torch.no_grad()
def expert_state(
    base: dict[str, torch.Tensor], seed: int, scale: float
) -> dict[str, torch.Tensor]:
    """`base` plus Gaussian noise of `scale` times each tensor's spread (an expert's weights)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        std = float(t.std()) if t.numel() > 1 else 0.0
        std = std if std > 0 else max(abs(float(t.abs().mean())), 1e-3)
        out[name] = t + scale * std * torch.randn(t.shape, generator=gen)
    return out


@torch.no_grad()
def with_added_tokens(model, tokenizer, tokens: Sequence[str], seed: int):
    """Copies of `model` and `tokenizer` with `tokens` appended; the new rows are random."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    model = copy.deepcopy(model)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None}
    for weight in matrices.values():
        new = weight[old_rows:]
        new.copy_(float(weight[:old_rows].std()) * torch.randn(new.shape, generator=gen))
    return model, tokenizer
