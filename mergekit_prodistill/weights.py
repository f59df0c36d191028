"""Lazy tensor access through mergekit's loader, and the merge formula itself."""

import os
from typing import Dict, List, Optional, Sequence

import torch
from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference
from mergekit.io.tasks import LoadTensor, LoaderCache

from mergekit_prodistill.errors import ProDistillError


class ModelTensors:
    """Reads one model's tensors on demand from its (sharded) checkpoint."""

    def __init__(self, model: ModelReference, dtype: Optional[str], device: str):
        self.model = model
        self.dtype = dtype
        self.device = device

    def has(self, weight: WeightInfo) -> bool:
        names = LoaderCache().get(self.model).index.tensor_paths
        return any(n in names for n in [weight.name, *(weight.aliases or ())])

    def shard_files(self) -> List[str]:
        index = LoaderCache().get(self.model).index
        return sorted({os.path.join(index.base_path, f) for f in index.tensor_paths.values()})

    def load(self, weight: WeightInfo) -> Optional[torch.Tensor]:
        return LoadTensor(
            model=self.model,
            tensor=weight.name,
            dtype=weight.force_dtype or self.dtype,
            device=self.device,
            optional=weight.optional,
            aliases=weight.aliases,
            tied_names=weight.tied_names,
        ).execute()

    def load_all(self, weights: Sequence[WeightInfo]) -> Dict[str, torch.Tensor]:
        tensors = {w.name: self.load(w) for w in weights}
        # Close the shard's memory map: otherwise every page read from it stays mapped,
        # and counted in RSS, until the loader moves on to the next shard (10 GB each in
        # common checkpoints). Tensors still in use keep their pages.
        LoaderCache().get(self.model).flush()
        return tensors


def check_shape(name: str, base: torch.Tensor, other: torch.Tensor, model) -> None:
    if base.shape != other.shape:
        raise ProDistillError(
            f"tensor {name}: {model} has shape {tuple(other.shape)} but the base model has "
            f"{tuple(base.shape)}; experts must be fine-tuned from the base"
        )


def merge(base: torch.Tensor, deltas: List[torch.Tensor], coeffs: List[torch.Tensor]):
    """theta_0 + sum_i lambda_i * tau_i.

    The products are summed first and the base added last, in the order mergekit's task
    arithmetic uses, so that untrained coefficients reproduce it bit for bit.
    """
    mixed = coeffs[0] * deltas[0]
    for coeff, delta in zip(coeffs[1:], deltas[1:]):
        mixed = mixed + coeff * delta
    return base + mixed
