"""Checks run before any weight is read, so a long merge never dies late on bad input.

Each problem raises :class:`ProDistillError` with one line naming what is wrong and where,
and nothing has been written yet. In order: mergekit's flags (a compute device torch can
use here, none that the merge cannot honour), dtypes, the output folder and the activation
folder (folders this process can write), LoRA adapters and their cache, every model's
folder (read by ``model_files``: weights present and complete, pickles and shipped code
only when trusted), a supported model family, architecture and layer count against the
base, every tensor's name and shape against the base (from headers, without reading data),
that a ``chat_template`` has a tokenizer to go to, and free disk for the output.
Calibration prompts are checked where the merge reads them, once, before any weight.
:func:`check_flags` holds what the command line checks before mergekit applies its flags.

What the checks learnt is returned, so that the merge reads and decides nothing twice.
"""

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from mergekit.architecture import ConfiguredModelArchitecture, WeightInfo, get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_prodistill.errors import ProDistillError, one_line
from mergekit_prodistill.models.blocks import BlockRunner, layer_weight_names
from mergekit_prodistill.models.dtypes import requested_output_dtype
from mergekit_prodistill.models.families import check_supported
from mergekit_prodistill.models.model_files import (ModelFiles, TensorInfo, arch_name, hub_id,
                                                    read_model)
from mergekit_prodistill.models.weight_units import (WeightUnits, check_stored_alike, converted,
                                                     stored_for_conversion)
from mergekit_prodistill.output.output_folder import (check_free_disk, check_output_folder,
                                                      folder_problem)
from mergekit_prodistill.plan.context import RunContext
from mergekit_prodistill.quiet import layout_notices_hidden
from mergekit_prodistill.recipe import ProDistillRecipe


@dataclass
class Checked:
    """What the checks learnt and the merge reuses."""

    models: Dict[ModelReference, ModelFiles]  # each with its transformers config
    arch_info: object  # mergekit's architecture info
    module: WeightUnits  # the base model's tensors, unit by unit
    num_layers: int
    vocabulary_rows: Dict[ModelReference, int]  # input embedding rows per model
    output_bytes: int


def check_before_merge(recipe: ProDistillRecipe, merge_config: MergeConfiguration,
                       options: MergeOptions, out_path: str) -> Checked:
    check_options(options)
    check_dtypes(recipe)
    check_output_folder(out_path, merge_config)
    check_activation_dir(recipe)
    refs = [recipe.base, *(e.model for e in recipe.experts)]
    check_loras(refs, options)
    models = {ref: read_model(ref, options) for ref in refs}
    for ref in refs:
        config = models[ref].config
        check_supported(config.architectures, config.to_dict(), f"model {ref}")
    base = models[recipe.base].config
    for ref in refs[1:]:
        if models[ref].config.architectures != base.architectures:
            raise ProDistillError(
                f"model {ref} is {_arch_name(models[ref].config)} but the base model is "
                f"{_arch_name(base)}; experts must be fine-tuned from the base"
            )
    arch_info, module = _module(recipe, merge_config, options, models)
    weights = module.all_weights()
    dropped = module.dropped(models[recipe.base].tensors)
    if dropped:
        more = " ..." if len(dropped) > 3 else ""
        raise ProDistillError(
            f"the base model's tensors {', '.join(dropped[:3])}{more} ({len(dropped)}) are not "
            f"in mergekit's layout of {_arch_name(base)}, so the merge would drop them")
    check_tensors(recipe, models, weights)
    check_blocks(module, recipe.base, models[recipe.base])
    check_stored_alike(recipe, models, weights)
    rows = {ref: _vocabulary_rows(weights, files) for ref, files in models.items()}
    check_chat_template_kept(merge_config, rows)
    needed = output_bytes(recipe, models, weights)
    check_free_disk(out_path, needed)
    return Checked(models, arch_info, module, module.num_layers(), rows, needed)


def check_dtypes(recipe: ProDistillRecipe) -> None:
    for key in ("dtype", "out_dtype"):
        _check_dtype(getattr(recipe, key), f"recipe: {key} '{getattr(recipe, key)}'")


def _check_dtype(value: Optional[str], named: str) -> None:
    try:
        dtype_from_name(value)
    except RuntimeError:
        raise ProDistillError(f"{named} is not one of bfloat16, float16, float32") from None


def check_flags(options: MergeOptions) -> None:
    """Flag values that stop mergekit's own set-up (``apply_global_options``) or the
    merge's first line with a traceback; the command line checks them before either."""
    if options.random_seed is not None and not 0 <= options.random_seed < 2**32:
        raise ProDistillError(
            f"--random-seed {options.random_seed}: a seed is a whole number from 0 to "
            f"{2**32 - 1}")
    if options.num_threads is not None and options.num_threads < 1:
        raise ProDistillError(f"--num-threads {options.num_threads}: give 1 or more threads")
    RunContext.of(options)  # a device torch knows by name


def check_options(options: MergeOptions) -> None:
    """mergekit's flags that this merge cannot use: a device that torch cannot compute on
    here, and flags that ask for what the merge does not do."""
    check_device(RunContext.of(options).device)
    if options.multi_gpu:
        raise ProDistillError(
            "--multi-gpu (also set by --gpu-rich): a prodistill process computes on one "
            "device; use --cuda for one GPU, or launch one process per GPU with torchrun "
            "--nproc-per-node N (see docs/distributed.md)")
    if options.unsafe_truncate_embeddings:
        raise ProDistillError(
            "--unsafe-truncate-embeddings: prodistill never truncates embeddings; it aligns "
            "the vocabularies by token (tokenizer_source, see docs/vocabularies.md), so "
            "remove the flag")
    _check_dtype(options.lora_merge_dtype, f"--lora-merge-dtype {options.lora_merge_dtype}")


def check_device(device: torch.device) -> None:
    """The compute device exists on this machine and torch can use it."""
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise ProDistillError("--device meta: meta tensors hold no values to merge; use cpu "
                              "or cuda")
    backend = getattr(torch, device.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        why = (f"this torch ({torch.__version__}) is built without CUDA"
               if device.type == "cuda" and torch.version.cuda is None
               and getattr(torch.version, "hip", None) is None
               else f"torch finds no {device.type} device")
        raise ProDistillError(f"--device {device}: {why}; leave out --cuda / --device to "
                              f"merge on the CPU, or run where torch has a {device.type} device")
    count = getattr(backend, "device_count", lambda: None)()
    if device.index is not None and count is not None and device.index >= count:
        have = f"{device.type}:0" + (f" to {device.type}:{count - 1}" if count > 1 else "")
        raise ProDistillError(f"--device {device}: this machine has {count} {device.type} "
                              f"device{'s' if count > 1 else ''} ({have})")


def check_activation_dir(recipe: ProDistillRecipe) -> None:
    """A named folder for disk-backed streams must be one this process can write."""
    p = recipe.params
    if p.activation_dir and p.epochs and p.activation_placement in ("auto", "disk"):
        problem = folder_problem(p.activation_dir, writable=True)
        if problem:
            raise ProDistillError(f"recipe parameters: activation_dir {p.activation_dir} "
                                  f"{problem}; name a folder this merge can write")


def check_loras(refs, options: MergeOptions) -> None:
    """Every LoRA is an adapter folder (or a Hub id), merged into a cache folder that
    this process can write."""
    loras = [r for r in refs if r.lora]
    for ref in loras:
        path = ref.lora.path
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ProDistillError(f"model {ref}: LoRA folder {path} holds no "
                                  "adapter_config.json; give a PEFT adapter's folder")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ProDistillError(f"model {ref}: LoRA {path} is a file; give the adapter's folder")
        if not os.path.exists(path) and hub_id(path) != path:
            raise ProDistillError(f"model {ref}: LoRA folder {path} does not exist")
    cache = options.lora_merge_cache  # without one, read_model names the flag
    problem = loras and cache and folder_problem(cache, writable=True)
    if problem:
        raise ProDistillError(f"--lora-merge-cache {cache} {problem}")


def check_chat_template_kept(merge_config: MergeConfiguration,
                             rows: Dict[ModelReference, Optional[int]]) -> None:
    """A ``chat_template`` is set on the tokenizer the merge builds; without
    ``tokenizer_source`` or ``tokenizer:`` one is built only when the vocabularies differ
    in size (as ``vocab.build_vocabulary`` decides); else the base's is copied as is."""
    source = merge_config.tokenizer.source if merge_config.tokenizer \
        else merge_config.tokenizer_source
    if merge_config.chat_template and source is None and len(set(rows.values())) <= 1:
        raise ProDistillError(
            "recipe: chat_template is set on a tokenizer the merge builds, and this recipe "
            "builds none (no tokenizer_source or tokenizer:, one vocabulary size), so the "
            "base's tokenizer would be copied without it; add 'tokenizer_source: base', or "
            "remove chat_template")


def _arch_name(config) -> str:
    return arch_name(config.architectures, config.model_type)


def _module(recipe, merge_config, options, models):
    """mergekit's description of the base model's tensors; also checks layer counts."""
    try:
        with layout_notices_hidden():
            arch_info = get_architecture_info(merge_config, options)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ProDistillError(f"recipe: cannot work out the models' architecture ({one_line(exc)})") from None
    base = models[recipe.base]
    module = WeightUnits(ConfiguredModelArchitecture(info=arch_info, config=base.config),
                         base.tensors)
    layers = module.num_layers()
    for expert in recipe.experts:
        n = module.info.num_layers(models[expert.model].config)
        if n != layers:
            raise ProDistillError(
                f"model {expert.model} has {n} layers but the base model has {layers}; "
                "experts must be fine-tuned from the base"
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
                if weight.optional or converted(weight, base, files):
                    continue
                who = "the base model" if base_name is None else f"model {expert.model}"
                raise ProDistillError(f"{who} has no tensor {weight.name}")
            a, b = base.tensors[base_name].shape, files.tensors[name].shape
            if _without_vocabulary(weight, a) != _without_vocabulary(weight, b):
                raise ProDistillError(
                    f"tensor {weight.name}: model {expert.model} has shape {b} but the base "
                    f"model has {a}; experts must be fine-tuned from the base"
                )


def check_blocks(module: WeightUnits, ref, files: ModelFiles) -> None:
    """Every block's tensors, as the layout names them, are its transformers block's
    parameters (not where a mixture's experts are stored one by one unconverted)."""
    runner = BlockRunner(files.config, torch.device("meta"))
    for index in range(module.num_layers()):
        names = [w.name for w in module.layer_weights(index) if runner.runs(w.name)
                 and (not w.optional or _find(w, files.tensors) or converted(w, files))]
        try:
            layer_weight_names(runner.layer(index), names)
        except ProDistillError as exc:
            raise ProDistillError(
                f"model {ref}, block {index}: {exc}; the checkpoint does not store the tensors "
                "transformers builds this model's blocks from") from None


def _vocabulary_rows(weights, files: ModelFiles) -> Optional[int]:
    for weight in weights:
        name = _find(weight, files.tensors)
        if weight.vocabulary_axis is not None and name is not None:
            return files.tensors[name].shape[weight.vocabulary_axis]
    return None


def output_bytes(recipe, models: Dict[ModelReference, ModelFiles], weights) -> int:
    """Size of the merged weights: the base's tensors (widest vocabulary) in the out dtype."""
    out_dtype = dtype_from_name(requested_output_dtype(recipe))
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
    for info in stored_for_conversion(weights, models[recipe.base]).values():
        total += int(torch.Size(info.shape).numel()) * (
            out_dtype.itemsize if out_dtype else info.itemsize)
    return total
