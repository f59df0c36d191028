"""Which dtype each part of a merge uses: the one place that decides.

* weights: the recipe's ``dtype``, else what the base checkpoint stores (its safetensors
  header, then its config);
* activations: the streams, every block forward and all training, in the recipe's
  ``activation_dtype``, else the weights' dtype, but never float16. The coefficients'
  gradients are a mean over tokens and hidden units times task vectors of ~1e-3: about
  1e-9 at 13B widths, which float16 flushes to zero, so the coefficients would never move.
  float16 therefore becomes bfloat16 on devices that compute in it, else float32.
"""

import os
from typing import Optional

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.model_files import read_checkpoint


def checkpoint_dtype(model) -> Optional[str]:
    """The dtype a local safetensors checkpoint stores, from its headers; else None."""
    path = model.model.path
    if not os.path.isdir(path):
        return None  # a Hub id: its config says, without a download
    try:
        return read_checkpoint(model, path, trust_pickles=False).dtype
    except ProDistillError:
        return None


def config_dtype(config) -> str:
    # transformers 5 reads a config.json's older torch_dtype key into dtype; the
    # torch_dtype attribute itself only warns that it is deprecated.
    value = getattr(config, "dtype", None)
    return str(value).replace("torch.", "") if value else "float32"


def stored_dtype(model, config) -> str:
    """What a model's checkpoint holds: its header's dtype, else its config's."""
    return checkpoint_dtype(model) or config_dtype(config)


def read_dtype(recipe, model, config) -> str:
    """The dtype a model's weights are read in: the recipe's ``dtype``, else the stored one."""
    return recipe.dtype or stored_dtype(model, config)


def weights_dtype(recipe, base_config) -> str:
    """The dtype block weights are read in: the base model's."""
    return read_dtype(recipe, recipe.base, base_config)


def bfloat16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def activation_dtype(requested: str, weights: str, device: torch.device) -> str:
    """The streams' and the block computations' dtype (see the module doc)."""
    dtype = weights if requested == "auto" else requested
    if dtype != "float16":
        return dtype
    return "bfloat16" if bfloat16_supported(device) else "float32"
