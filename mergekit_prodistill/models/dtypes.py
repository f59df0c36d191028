"""Which dtype each part of a merge uses: the one place that decides.

* reading: every model's block weights in the dtype its checkpoint stores (its safetensors
  header, then its config). Casting first would round each expert and the base apart: a
  fine-tune that moves a weight by 1e-3 of its size, cast to bfloat16 (a step of 4e-3 to
  8e-3 of a value), keeps 0 in 75-87% of its task vector and +-1 step in the rest;
* task vectors and sums: theta_i - theta_0 and theta_0 + sum lambda_i tau_i in the stored
  dtype when every model stores the recipe's ``dtype`` (or it names none), as mergekit's
  task arithmetic computes them, so that ``epochs: 0`` equals it bit for bit; otherwise
  in float32, rounded once, to the output dtype;
* output: the recipe's ``out_dtype``, else its ``dtype``, else what the base stores;
* activations: the streams, every block forward and all training, in the recipe's
  ``activation_dtype``; ``auto`` is float32, with TF32 matmuls on CUDA. A task vector
  moves a block's output by about as much as bfloat16's rounding of the activations does,
  so training in bfloat16 fits that noise: bench/half_precision.py, bfloat16 checkpoints
  whose experts moved each weight by 1e-3 (3e-3) of its size, trained / task-arithmetic
  KL 0.84 (0.47-0.61) in bfloat16 against 0.20-0.23 (0.18-0.28) in float32. float16 never:
  the coefficients' gradients (~1e-9 at 13B widths) flush to zero in it.

:class:`Precision` carries the decisions of one merge to the code that applies them.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from mergekit.common import dtype_from_name

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.model_files import ModelFiles, read_checkpoint


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


def stored_dtype(model, config, files: Optional[ModelFiles] = None) -> str:
    """What a model's checkpoint holds: its header's dtype (from ``files`` where they
    were read already), else its config's."""
    return (files.dtype if files else checkpoint_dtype(model)) or config_dtype(config)


def generation_dtype(recipe, stored: str) -> str:
    """The dtype an expert that stores ``stored`` is loaded in to continue its prompts (a
    whole model, which the recipe's ``dtype`` may halve): the recipe's ``dtype``, else the
    stored one."""
    return recipe.dtype or stored


def task_vector_dtype(recipe_dtype: Optional[str], stored: Sequence[str]) -> str:
    """The dtype task vectors and merged sums are formed in (see the module doc)."""
    if len(set(stored)) == 1 and recipe_dtype in (None, stored[0]):
        return stored[0]
    return "float32"


def requested_output_dtype(config) -> Optional[str]:
    """The output dtype a recipe (or mergekit's configuration) names, if any."""
    return config.out_dtype or config.dtype


def output_dtype(recipe, base_stored: str) -> str:
    """The dtype the merged weights are written in."""
    return requested_output_dtype(recipe) or base_stored


def bfloat16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: some GPUs report support they
    emulate. A CUDA device planned from a machine without one is taken as native."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def activation_dtype(requested: str, device: torch.device) -> str:
    """The streams' and the block computations' dtype (see the module doc): bfloat16 only
    where asked for and computed natively."""
    if requested == "bfloat16" and bfloat16_supported(device):
        return "bfloat16"
    return "float32"


def decide(recipe, stored: Sequence[str], device: torch.device) -> Dict[str, str]:
    """Every dtype of a merge by role (weights, task_vectors, compute, cache, output,
    generation), from each model's stored dtype (the base first)."""
    compute = activation_dtype(recipe.params.activation_dtype, device)
    return {"weights": stored[0], "task_vectors": task_vector_dtype(recipe.dtype, stored),
            "compute": compute, "cache": compute, "output": output_dtype(recipe, stored[0]),
            "generation": generation_dtype(recipe, stored[1])}


@contextlib.contextmanager
def fast_float32_matmuls(device: torch.device, compute: str):
    """float32 block computations on CUDA use TF32 matmuls (10-bit mantissas, as
    float16 weights hold) for the length of a merge."""
    if device.type != "cuda" or compute != "float32":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@dataclass(frozen=True)
class Precision:
    """The dtypes one merge forms task vectors in, computes in, and writes."""

    task_vectors: torch.dtype
    compute: torch.dtype
    output: torch.dtype

    @classmethod
    def of(cls, decided: dict) -> "Precision":
        """From the plan's ``dtypes`` (names)."""
        return cls(*(dtype_from_name(decided[k]) for k in ("task_vectors", "compute", "output")))

    def task_vector(self, expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return expert.to(self.task_vectors) - base.to(self.task_vectors)

    def written(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.output)
