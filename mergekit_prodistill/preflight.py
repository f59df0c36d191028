"""Checks run before any weight is read, so a long merge never dies late on bad input.

Each problem raises :class:`ProDistillError` with one line naming what is wrong and where,
and nothing has been written yet. In order: dtypes, calibration files, the output folder,
every model's folder (weights present, safetensors unless pickles are trusted, own code only
with ``--trust-remote-code``, shards complete), a supported model family, architecture and
layer count against the base, every tensor's name and shape against the base (from safetensors headers, without
reading data), and free disk for the output.

Pickled checkpoints (``pytorch_model.bin``) can run arbitrary code when unpickled, so they
are read only with ``--trust-remote-code``, the flag with which a mergekit user already
accepts running code that comes with a model. ``--lazy-unpickle`` is about memory, not
trust, and does not count.
"""

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from mergekit.architecture import ConfiguredModelArchitecture, WeightInfo, get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill import sources
from mergekit_prodistill.output_folder import check_free_disk, check_output_folder
from mergekit_prodistill.blocks import check_supported
from mergekit_prodistill.recipe import ProDistillRecipe
from mergekit_prodistill.errors import ProDistillError, one_line

# Bytes per element of the safetensors dtype names.
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    itemsize: int


@dataclass
class ModelFiles:
    """One model's local folder and the tensors its checkpoint holds (from headers)."""

    folder: str
    tensors: Dict[str, TensorInfo]
    pickled: bool


@dataclass
class Checked:
    """What the checks learnt and the merge reuses."""

    models: Dict[ModelReference, ModelFiles]
    vocabulary_rows: Dict[ModelReference, int]  # input embedding rows per model
    output_bytes: int
    module: object  # mergekit's configured architecture module of the base model
    arch_info: object  # mergekit's architecture info


def check_before_merge(recipe: ProDistillRecipe, merge_config: MergeConfiguration,
                       options: MergeOptions, out_path: str) -> Checked:
    check_dtypes(recipe)
    for expert in recipe.experts:
        sources.read_expert_prompts(expert.params, f"model {expert.model}")
    check_output_folder(out_path, merge_config)
    refs = [recipe.base, *(e.model for e in recipe.experts)]
    models = {ref: model_files(ref, options) for ref in refs}
    configs = {ref: read_config(ref, models[ref].folder, options) for ref in refs}
    for ref in refs:
        check_supported(configs[ref].get("architectures"), configs[ref], f"model {ref}")
    for ref in refs[1:]:
        if configs[ref].get("architectures") != configs[recipe.base].get("architectures"):
            raise ProDistillError(
                f"model {ref} is {_arch_name(configs[ref])} but the base model is "
                f"{_arch_name(configs[recipe.base])}; experts must be fine-tuned from the base"
            )
    arch_info, module = _module(recipe, merge_config, options, refs)
    weights = module.all_weights()
    check_tensors(recipe, models, weights)
    rows = {ref: _vocabulary_rows(weights, files) for ref, files in models.items()}
    needed = output_bytes(recipe, models, weights)
    check_free_disk(out_path, needed)
    return Checked(models, rows, needed, module, arch_info)


def check_dtypes(recipe: ProDistillRecipe) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        try:
            dtype_from_name(value)
        except RuntimeError:
            raise ProDistillError(
                f"recipe: {key} '{value}' is not one of bfloat16, float16, float32"
            ) from None


def model_folder(ref: ModelReference, options: MergeOptions) -> str:
    path = ref.model.path
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ProDistillError(f"model {ref}: {path} is a file; give the model's folder")
    hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not hub_id:
        raise ProDistillError(f"model {ref}: folder {path} does not exist")
    try:
        return ref.local_path(cache_dir=options.transformers_cache, ignore_lora=True)
    except Exception as exc:
        raise ProDistillError(
            f"model {ref}: no folder {path} here, and the Hugging Face Hub could not "
            f"provide it ({one_line(exc)})"
        ) from None


def model_files(ref: ModelReference, options: MergeOptions) -> ModelFiles:
    """Find a model's checkpoint the way mergekit's loader does, and read its headers."""
    if ref.lora and not options.lora_merge_cache:
        raise ProDistillError(f"model {ref}: a LoRA needs --lora-merge-cache to be merged into")
    folder = model_folder(ref, options)
    for stem, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        index = os.path.join(folder, stem + ".index.json")
        single = os.path.join(folder, stem)
        if os.path.isfile(index) or os.path.isfile(single):
            break
    else:
        raise ProDistillError(
            f"model {ref}: no model.safetensors or model.safetensors.index.json in {folder}"
        )
    if pickled and not options.trust_remote_code:
        raise ProDistillError(
            f"model {ref} has only pickled weights ({stem}), which can run code when "
            "loaded; convert them to safetensors, or pass --trust-remote-code to load "
            "them anyway"
        )
    read = _pickle_header if pickled else _safetensors_header
    if os.path.isfile(index):
        shards = _index_shards(ref, index)
        tensors = {}
        for shard, names in shards.items():
            held = read(ref, os.path.join(folder, shard))
            missing = sorted(set(names) - set(held))
            if missing:
                raise ProDistillError(
                    f"model {ref}: {os.path.basename(index)} lists tensor {missing[0]} in "
                    f"{shard}, which does not hold it"
                )
            tensors.update(held)
    else:
        tensors = read(ref, single)
    return ModelFiles(folder, tensors, pickled)


def _index_shards(ref, index: str) -> Dict[str, List[str]]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProDistillError(f"model {ref}: {index} is not a valid index ({one_line(exc)})") from None
    shards: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    folder = os.path.dirname(index)
    for shard in sorted(shards):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise ProDistillError(
                f"model {ref}: shard {shard} listed in {os.path.basename(index)} is missing "
                f"from {folder}"
            )
    return shards


def _safetensors_header(ref, path: str) -> Dict[str, TensorInfo]:
    """Tensor shapes from a safetensors header; also catches truncated downloads."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors = {
            name: TensorInfo(tuple(info["shape"]), SAFETENSORS_ITEMSIZE.get(info["dtype"], 4))
            for name, info in header.items()
        }
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ProDistillError(
            f"model {ref}: {path} is not a valid safetensors file ({one_line(exc)})"
        ) from None
    if 8 + length + end > size:
        raise ProDistillError(
            f"model {ref}: {path} is truncated ({size} bytes, its header needs "
            f"{8 + length + end}); download it again"
        )
    return tensors


def _pickle_header(ref, path: str) -> Dict[str, TensorInfo]:
    """Shapes from a trusted pickled checkpoint, loaded on the meta device (no data)."""
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:
        raise ProDistillError(f"model {ref}: cannot read {path} ({one_line(exc)})") from None
    state = state.get("state_dict", state)
    return {n: TensorInfo(tuple(t.shape), t.element_size()) for n, t in state.items()
            if isinstance(t, torch.Tensor)}


def read_config(ref: ModelReference, folder: str, options: MergeOptions) -> dict:
    """The model's config.json, refusing code that ships with a model unless trusted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ProDistillError(f"model {ref}: no config.json in {folder}") from None
    except (OSError, ValueError) as exc:
        raise ProDistillError(f"model {ref}: cannot read {path} ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise ProDistillError(f"model {ref}: {path} is not a JSON object")
    if not options.trust_remote_code and config.get("model_type") not in CONFIG_MAPPING:
        if "auto_map" in config:
            raise ProDistillError(
                f"model {ref}: {_arch_name(config)} is not part of transformers and its "
                "config.json points to code shipped with the model (auto_map); pass "
                "--trust-remote-code if you trust that code"
            )
        raise ProDistillError(
            f"model {ref}: model_type '{config.get('model_type')}' is not supported by the "
            "installed transformers"
        )
    return config


def _arch_name(config: dict) -> str:
    return "/".join(config.get("architectures") or []) or f"model_type {config.get('model_type')}"


def _module(recipe, merge_config, options, refs):
    """mergekit's description of the base model's tensors; also checks layer counts."""
    try:
        arch_info = get_architecture_info(merge_config, options)
        configs = {ref: ref.config(trust_remote_code=options.trust_remote_code) for ref in refs}
    except (RuntimeError, ValueError, OSError) as exc:
        raise ProDistillError(f"recipe: cannot work out the models' architecture ({one_line(exc)})") from None
    module = ConfiguredModelArchitecture(info=arch_info, config=configs[recipe.base]).get_module("default")
    layers = module.num_layers()
    for ref in refs[1:]:
        n = module.info.num_layers(configs[ref])
        if n != layers:
            raise ProDistillError(
                f"model {ref} has {n} layers but the base model has {layers}; experts must "
                "be fine-tuned from the base"
            )
    return arch_info, module


def _find(weight: WeightInfo, tensors: Dict[str, TensorInfo]) -> Optional[str]:
    """The checkpoint name a weight is stored under, as mergekit's loader resolves it."""
    for name in (weight.name, *(weight.aliases or ()), *(weight.tied_names or ())):
        if name in tensors:
            return name
    return None


def _without_vocabulary(weight: WeightInfo, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    axis = weight.vocabulary_axis
    return shape if axis is None or axis >= len(shape) else shape[:axis] + (None,) + shape[axis + 1:]


def check_tensors(recipe, models: Dict[ModelReference, ModelFiles], weights) -> None:
    """Every tensor the merge reads exists in every model with the base's shape.

    Vocabulary-indexed tensors may differ in rows; vocab.py aligns them.
    """
    base = models[recipe.base]
    for weight in weights:
        base_name = _find(weight, base.tensors)
        for expert in recipe.experts:
            files = models[expert.model]
            name = _find(weight, files.tensors)
            if base_name is None or name is None:
                if weight.optional:
                    continue
                who = "the base model" if base_name is None else f"model {expert.model}"
                raise ProDistillError(f"{who} has no tensor {weight.name}")
            a, b = base.tensors[base_name].shape, files.tensors[name].shape
            if _without_vocabulary(weight, a) != _without_vocabulary(weight, b):
                raise ProDistillError(
                    f"tensor {weight.name}: model {expert.model} has shape {b} but the base "
                    f"model has {a}; experts must be fine-tuned from the base"
                )


def _vocabulary_rows(weights, files: ModelFiles) -> Optional[int]:
    for weight in weights:
        name = _find(weight, files.tensors)
        if weight.vocabulary_axis is not None and name is not None:
            return files.tensors[name].shape[weight.vocabulary_axis]
    return None


def output_bytes(recipe, models: Dict[ModelReference, ModelFiles], weights) -> int:
    """Size of the merged weights: the base's tensors (widest vocabulary) in the out dtype."""
    out_dtype = dtype_from_name(recipe.out_dtype or recipe.dtype)
    total = 0
    for weight in weights:
        found = [f.tensors[n] for f in models.values() if (n := _find(weight, f.tensors))]
        if not found:
            continue
        info = found[0]
        shape = list(info.shape)
        if weight.vocabulary_axis is not None:
            shape[weight.vocabulary_axis] = max(t.shape[weight.vocabulary_axis] for t in found)
        itemsize = out_dtype.itemsize if out_dtype else info.itemsize
        total += int(torch.Size(shape).numel()) * itemsize
    return total
