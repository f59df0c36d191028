"""The one reader of a model folder: where it is, what its checkpoint holds, its config.

A model is found the way mergekit's loader finds it (a local folder, else a Hub id through
``ModelReference.local_path``), and its checkpoint the same way: ``model.safetensors``
(single or indexed), else ``pytorch_model.bin``. Tensor names, shapes and dtypes come from
the safetensors headers alone, so nothing here reads weight data; a truncated download is
caught by comparing the header's offsets with the file's size.

Pickled checkpoints (``pytorch_model.bin``) can run arbitrary code when unpickled, so they
are read only with ``--trust-remote-code``, the flag with which a mergekit user already
accepts running code that comes with a model. ``--lazy-unpickle`` is about memory, not
trust, and does not count. The same flag guards ``config.json`` files that point to code
shipped with the model.

Whether a path names something on the Hugging Face Hub is decided here too
(:func:`hub_id`), for models and datasets alike.
"""

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from mergekit_prodistill.errors import ProDistillError, one_line

# safetensors dtype names: the torch dtype's name and the bytes per element.
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
    "F32": ("float32", 4), "I32": ("int32", 4), "U32": ("uint32", 4),
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
# The dtypes a checkpoint's weights are stored in, as the merge names them.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINTS = (("model.safetensors", False), ("pytorch_model.bin", True))  # (stem, pickled)


def hub_id(path: str, kind: str = "model") -> Optional[str]:
    """The Hub id that ``path`` names, when it is known without asking the Hub.

    A folder inside the Hugging Face cache (``.../models--ORG--NAME/snapshots/...``, or
    ``datasets--`` for a dataset) is that repo; any other existing or explicitly local path
    (``/``, ``~``, ``.``) is not; anything else is an id when it is a valid one.
    """
    cached = re.search(rf"{kind}s--(.+?)/snapshots/", path.replace(os.sep, "/"))
    if cached:
        return cached[1].replace("--", "/")  # Hub ids never contain "--"
    if os.path.exists(path) or path.startswith(("/", "~", ".")) or path.count("/") > 1:
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: str  # torch's name, e.g. "bfloat16"
    itemsize: int


@dataclass
class ModelFiles:
    """One model's local folder, what its checkpoint holds (from headers), and its config."""

    folder: str
    tensors: Dict[str, TensorInfo]
    shards: List[str]  # every weight file, sorted
    pickled: bool
    config: object = None  # transformers' PretrainedConfig

    @property
    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.shards)

    @property
    def dtype(self) -> Optional[str]:
        """What the weights are stored in: the first floating tensor's in the headers.

        None for a pickled checkpoint: its config says, as it does for the plan, which
        never unpickles.
        """
        if self.pickled:
            return None
        return next((t.dtype for t in self.tensors.values() if t.dtype in WEIGHT_DTYPES), None)


def read_model(ref: ModelReference, options: MergeOptions) -> ModelFiles:
    """Everything the merge needs to know about a model before reading any weight."""
    if ref.lora and not options.lora_merge_cache:
        raise ProDistillError(f"model {ref}: a LoRA needs --lora-merge-cache to be merged into")
    folder = model_folder(ref, options)
    files = read_checkpoint(ref, folder, options.trust_remote_code)
    read_config(ref, folder, options.trust_remote_code)  # the trust rule, before transformers
    files.config = model_config(ref, options.trust_remote_code, folder)
    return files


def model_folder(ref: ModelReference, options: MergeOptions) -> str:
    """The model's local folder; a Hub id is fetched as mergekit's loader fetches it."""
    path = ref.model.path
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ProDistillError(f"model {ref}: {path} is a file; give the model's folder")
    if hub_id(path) != path:
        raise ProDistillError(f"model {ref}: folder {path} does not exist")
    try:
        return ref.local_path(cache_dir=options.transformers_cache, ignore_lora=True)
    except Exception as exc:
        raise ProDistillError(
            f"model {ref}: no folder {path} here, and the Hugging Face Hub could not "
            f"provide it ({one_line(exc)})"
        ) from None


def full_weights_folder(ref: ModelReference, options: MergeOptions) -> str:
    """The folder of the model's whole weights, for loading it whole (its continuations):
    a LoRA merged into its base by mergekit, once, in ``--lora-merge-cache`` (the merge
    reads the same folder through mergekit's loader), else the model's own folder."""
    if not ref.lora:
        return model_folder(ref, options)
    return ref.merged(cache_dir=options.lora_merge_cache,
                      trust_remote_code=options.trust_remote_code,
                      lora_merge_dtype=options.lora_merge_dtype).model.path


def read_checkpoint(ref, folder: str, trust_pickles: bool) -> ModelFiles:
    """The checkpoint's tensors and files, from its headers; refuses untrusted pickles."""
    for stem, pickled in CHECKPOINTS:
        index = os.path.join(folder, stem + ".index.json")
        single = os.path.join(folder, stem)
        if os.path.isfile(index) or os.path.isfile(single):
            break
    else:
        raise ProDistillError(
            f"model {ref}: no model.safetensors or model.safetensors.index.json in {folder}"
        )
    if pickled and not trust_pickles:
        raise ProDistillError(
            f"model {ref} has only pickled weights ({stem}), which can run code when "
            "loaded; convert them to safetensors, or pass --trust-remote-code to load "
            "them anyway"
        )
    read = _pickle_header if pickled else _safetensors_header
    if not os.path.isfile(index):
        return ModelFiles(folder, read(ref, single), [single], pickled)
    tensors = {}
    shards = _index_shards(ref, index)
    for shard, names in shards.items():
        held = read(ref, os.path.join(folder, shard))
        missing = sorted(set(names) - set(held))
        if missing:
            raise ProDistillError(
                f"model {ref}: {os.path.basename(index)} lists tensor {missing[0]} in "
                f"{shard}, which does not hold it"
            )
        tensors.update(held)
    return ModelFiles(folder, tensors, sorted(os.path.join(folder, s) for s in shards), pickled)


def _index_shards(ref, index: str) -> Dict[str, List[str]]:
    """Each shard's tensor names, in the index's order; every shard must be present."""
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
    """Tensor shapes and dtypes from a safetensors header; also catches truncated downloads."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors = {
            name: TensorInfo(tuple(info["shape"]),
                             *SAFETENSORS_DTYPES.get(info["dtype"], (info["dtype"], 4)))
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
    return {n: TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), t.element_size())
            for n, t in state.items() if isinstance(t, torch.Tensor)}


def read_config(ref, folder: str, trust_remote_code: bool) -> dict:
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
    if not trust_remote_code and config.get("model_type") not in CONFIG_MAPPING:
        if "auto_map" in config:
            raise ProDistillError(
                f"model {ref}: {arch_name(config.get('architectures'), config.get('model_type'))}"
                " is not part of transformers and its config.json points to code shipped "
                "with the model (auto_map); pass --trust-remote-code if you trust that code"
            )
        raise ProDistillError(
            f"model {ref}: model_type '{config.get('model_type')}' is not supported by the "
            "installed transformers"
        )
    return config


def arch_name(architectures, model_type) -> str:
    return "/".join(architectures or []) or f"model_type {model_type}"


def model_config(model: Union[ModelReference, str], trust_remote_code: bool = False,
                 folder: Optional[str] = None):
    """The model's config as transformers reads it, the one way every module reads it.

    ``model`` is a recipe's model (its revision and architecture override apply) or a
    folder; ``folder``, the model's folder already found, saves asking the Hub again.
    """
    import transformers

    ref = model if isinstance(model, ModelReference) else None
    path = folder or (ref.model.path if ref else model)
    revision = ref.model.revision if ref and not folder else None
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ProDistillError(f"model {model}: cannot read its config.json ({one_line(exc)})") from None
    if ref is not None and ref.override_architecture:
        config.architectures = [ref.override_architecture]
    return config
