"""Let each expert continue its own calibration prompts, greedily, before distillation.

A prompt alone constrains the merged model only at the prompt's positions, while an
expert's skill shows where it writes its answer. Appending the expert's own greedy
continuation (no labels needed) puts those positions into the calibration set, so the
distillation matches each expert's activations where its answer is produced.

Memory: one expert at a time, placed by :func:`expert_placement.place_expert` from the
memory free at that moment (whole on the device when it fits, else partly offloaded by
accelerate), in the recipe's ``dtype`` (else the stored one); it is freed before the next one.
"""

import contextlib
import gc
import logging
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from mergekit_prodistill.inputs import expert_placement
from mergekit_prodistill.inputs.expert_placement import Placement
from mergekit_prodistill.models.families import load_model
from mergekit_prodistill.models.model_files import model_config

LOG = logging.getLogger("mergekit_prodistill")


def left_pad(sequences: Sequence[List[int]], pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def cut_at_stop(tokens: List[int], stop_ids: Sequence[int], pad_id: int) -> List[int]:
    """The generated tokens before the first end-of-sequence (excluded) or padding."""
    for i, token in enumerate(tokens):
        if token in stop_ids or token == pad_id:
            return tokens[:i]
    return tokens


def load_expert(path: str, dtype, device: torch.device, placement: Placement,
                offload_dir: str, config):
    """The expert (whose config is ``config``), whole on ``device`` (no hooks), or
    dispatched by accelerate as placed."""
    if placement.offloaded:
        where = dict(device_map="auto", max_memory=placement.max_memory,
                     offload_folder=offload_dir)
    else:
        where = dict(device_map={"": device})
    # Its own class: a multimodal checkpoint generates text as it was trained to.
    return load_model(path, config, dtype=dtype, **where).eval()


@dataclass
class Loaded:
    """A whole model loaded for generation: the model, where its inputs go, how it was
    placed, and the tokens that end a sequence (the model's and the tokenizer's)."""

    model: torch.nn.Module
    input_device: torch.device
    placement: Placement
    stop_ids: Set[int]
    pad_id: int


def ends_of(model, tokenizer) -> Tuple[Set[int], int]:
    """The tokens that end a sequence (the model's and the tokenizer's), and the padding."""
    stop = model.generation_config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return stop_ids, pad_id


@contextlib.contextmanager
def loaded(model_path: str, lengths: Sequence[int], max_new_tokens: int, tokenizer, *,
           dtype: str, device: torch.device, free: Dict[str, Optional[int]],
           trust_remote_code: bool = False):
    """The model at ``model_path``, placed for generating ``max_new_tokens`` after prompts
    of these ``lengths`` from the memory ``free`` now, and freed on leaving.

    ``dtype`` is :func:`dtypes.generation_dtype`, which the plan sizes it by; ``free``
    maps ``str(device)`` and "cpu" to the bytes free there now.
    """
    config = model_config(model_path, trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    shape = expert_placement.expert_shape(config, torch_dtype.itemsize)
    placement = expert_placement.place_expert(shape, lengths, max_new_tokens, device, free)
    placement.check(device, model_path)
    LOG.info("generating with %s: %s", model_path, placement.describe())
    with tempfile.TemporaryDirectory(prefix="prodistill-offload-") as offload_dir:
        model = load_expert(model_path, torch_dtype, device, placement, offload_dir, config)
        stop_ids, pad_id = ends_of(model, tokenizer)
        input_device = next(
            (p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu")
        )
        held = Loaded(model, input_device, placement, stop_ids, pad_id)
        try:
            yield held
        finally:
            del model
            held.model = None  # the caller's reference too
    # Free the model before the next one is loaded.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def continued_greedily(m: Loaded, sequences: List[List[int]], max_new_tokens: int):
    """Each sequence followed by ``m``'s greedy continuation, in batches of prompts of
    similar length (little padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    continued: Dict[int, List[int]] = {}
    for start in range(0, len(order), m.placement.rows):
        chunk = order[start : start + m.placement.rows]
        ids, mask = left_pad([sequences[i] for i in chunk], m.pad_id)
        generated = m.model.generate(
            input_ids=ids.to(m.input_device),
            attention_mask=mask.to(m.input_device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=m.pad_id,
            eos_token_id=sorted(m.stop_ids) or None,
        )[:, ids.shape[1]:].tolist()
        for i, new in zip(chunk, generated):
            continued[i] = sequences[i] + cut_at_stop(new, m.stop_ids, m.pad_id)
    return [continued[i] for i in range(len(sequences))]
