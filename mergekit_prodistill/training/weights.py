"""Lazy tensor access through mergekit's loader, and one tensor merged by task arithmetic."""

import functools
from typing import Dict, List, Optional, Sequence

import torch
from mergekit.architecture import WeightInfo
from mergekit.architecture.conversion import can_convert_checkpoint_keys
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache, LoadTensor

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.dtypes import Precision
from mergekit_prodistill.training.coefficients import combine


class ModelTensors:
    """Reads one model's tensors on demand from its (sharded) checkpoint."""

    def __init__(self, model: ModelReference, dtype: Optional[str], device: str):
        self.model = model
        self.dtype = dtype
        self.device = device

    def has(self, weight: WeightInfo) -> bool:
        """Whether the checkpoint stores the tensor, or the ones transformers builds it
        from (a mixture of experts' fused matrices, from one per expert)."""
        names = LoaderCache().get(self.model).index.tensor_paths
        wanted = [weight.name, *(weight.aliases or ())]
        return any(n in names for n in wanted) or any(
            can_convert_checkpoint_keys(self._model_type(), set(names), n) for n in wanted)

    @functools.lru_cache(maxsize=None)
    def _model_type(self) -> str:
        return self.model.config(trust_remote_code=LoaderCache().trust_remote_code).model_type

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



def task_arithmetic(weight: WeightInfo, base: ModelTensors, experts: List[ModelTensors],
                    align, init: torch.Tensor, precision: Precision):
    """One tensor merged with every coefficient at ``init``, in the output dtype (formed
    as :class:`dtypes.Precision` says), and the experts' tensors as read. ``align`` puts
    vocabulary-indexed tensors in the output's row order (:meth:`vocab.Vocabulary.align`)."""
    base_t = base.load(weight)
    expert_ts = [e.load(weight) for e in experts]
    base_a, aligned = align(weight, base_t, expert_ts)
    for e, t in zip(experts, aligned):
        check_shape(weight.name, base_a, t, e.model)
    merged = combine(base_a.to(precision.task_vectors),
                     [precision.task_vector(t, base_a) for t in aligned], [init] * len(experts))
    return precision.written(merged), expert_ts
