"""Whether the output dtype erases the experts' task vectors, found before the merge.

Writing a model in a narrower dtype than its experts store rounds every weight to that
dtype's step: about 2^-8 of a value in bfloat16, 2^-11 in float16. An element that a
fine-tune moved by less than half a step comes out equal to the base's, so the expert's
change to it is lost whatever the coefficients are. Small full fine-tunes move weights by
~1e-3 of their size: float16 checkpoints written as bfloat16 lose most of it.

The check reads a sample of the middle decoder block (up to :data:`SAMPLE` elements per
model, through the checkpoint's memory map) and counts, among the elements an expert moved,
those the output dtype puts back on the base's value.
"""

import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.model_files import ModelFiles, read_checkpoint

LOG = logging.getLogger("mergekit_prodistill")

SAMPLE = 1 << 20
# Warn when the output dtype erases more than this share of an expert's moved elements.
# bench/half_precision.py, float16 experts written as bfloat16: at r = 1e-2 they lose 20%
# of their task vector and the merge is as close to them as written in float16; at 3e-3
# 54%, and 1.7x further (trained); at 1e-3 80%, and 7-9x further (docs/benchmarks.md).
THRESHOLD = 0.4

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _files(ref) -> Optional[ModelFiles]:
    """A local safetensors checkpoint's files; None for a Hub id or pickled weights."""
    path = ref.model.path
    if not os.path.isdir(path):
        return None
    try:
        files = read_checkpoint(ref, path, trust_pickles=False)
    except ProDistillError:
        return None
    return None if files.pickled else files


def _middle_block(files: ModelFiles) -> List[str]:
    """The 2-D tensors of the checkpoint's middle decoder block."""
    layers = sorted({int(m.group(1)) for n in files.tensors if (m := _LAYER.search(n))})
    if not layers:
        return []
    middle = f".layers.{layers[len(layers) // 2]}."
    return sorted(n for n, t in files.tensors.items() if middle in n and len(t.shape) == 2)


def _sample(files: ModelFiles, names: List[str]) -> Dict[str, torch.Tensor]:
    """The first rows of ``names``, up to SAMPLE elements in all, read as stored."""
    sample, left = {}, SAMPLE
    for shard in files.shards:
        with safe_open(shard, framework="pt") as f:
            for name in (n for n in names if n in f.keys() and left > 0):
                rows = max(1, min(files.tensors[name].shape[0],
                                  left // max(1, files.tensors[name].shape[1])))
                sample[name] = f.get_slice(name)[:rows]
                left -= sample[name].numel()
    return sample


def erased_share(base: torch.Tensor, expert: torch.Tensor, dtype: torch.dtype) -> float:
    """The share of the elements ``expert`` moved from ``base`` that are equal once both
    are cast to ``dtype``."""
    moved = expert.float() != base.float()
    kept = expert.to(dtype) != base.to(dtype)
    return float((moved & ~kept).sum()) / max(int(moved.sum()), 1)


def erased_shares(recipe, out_dtype: str, models=None) -> Dict[str, Tuple[float, str]]:
    """Per expert (by name) that writing in ``out_dtype`` can round, the sampled share of
    its task vector that it erases, and the expert's stored dtype. Experts without a local
    safetensors checkpoint are left out; ``models`` are the files preflight read, if any."""
    def files(ref) -> Optional[ModelFiles]:
        found = models[ref] if models else _files(ref)
        return None if found is None or found.pickled else found

    base = files(recipe.base)
    if not base:
        return {}
    experts = [(str(e.model), f) for e in recipe.experts if (f := files(e.model))
               and {f.dtype, base.dtype} != {out_dtype}]
    names = _middle_block(base)
    base_sample, dtype = _sample(base, names), getattr(torch, out_dtype)
    shares = {}
    for name, files in experts:
        moved = erased = 0.0
        for tensor, t in _sample(files, names).items():
            b = base_sample.get(tensor)
            if b is None or b.shape != t.shape:
                continue
            m = int((t.float() != b.float()).sum())
            moved += m
            erased += erased_share(b, t, dtype) * m
        if moved:
            shares[name] = (erased / moved, files.dtype)
    return shares


def warn_if_erased(recipe, out_dtype: str, models=None) -> None:
    """One warning line per expert whose task vector writing in ``out_dtype`` mostly
    erases, naming the share lost and the dtype that keeps it."""
    key = "out_dtype" if recipe.out_dtype else "dtype"
    for model, (share, stored) in erased_shares(recipe, out_dtype, models).items():
        if share > THRESHOLD:
            LOG.warning(
                "writing %s in %s erases %.0f%% of its task vector (the elements it moved "
                "by less than half a %s step come out equal to the base's); set '%s: %s', "
                "the dtype it is stored in, to keep it", model, out_dtype, 100 * share,
                out_dtype, key, stored)
