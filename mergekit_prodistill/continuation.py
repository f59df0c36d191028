"""Let each expert continue its own calibration prompts, greedily, before distillation.

A prompt alone constrains the merged model only at the prompt's positions, while an
expert's skill shows where it writes its answer. Appending the expert's own greedy
continuation (no labels needed) puts those positions into the calibration set, so the
distillation matches each expert's activations where its answer is produced.

Memory: the expert is loaded with accelerate's big-model inference, one expert at a time.
The device (and, on GPU, CPU RAM) may hold about two decoder blocks of it; everything
else stays in the checkpoint's safetensors files on disk and is read module by module as
the forward pass reaches it. So this pass needs no more memory than the block loop.
"""

import json
import logging
import os
import tempfile
from typing import List, Optional, Sequence

import torch

LOG = logging.getLogger("mergekit_prodistill")

# Room the device may hold, in decoder blocks' worth of weights.
RESIDENT_BLOCKS = 2


def checkpoint_bytes(path: str) -> int:
    """Bytes of weights in a local checkpoint folder (from its index or its files)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            total = json.load(f).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    return sum(
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.endswith((".safetensors", ".bin"))
    )


def memory_budget(path: str, num_layers: int) -> int:
    """Bytes of the expert allowed in memory: a few blocks, never less than 1 MiB."""
    return max(checkpoint_bytes(path) * RESIDENT_BLOCKS // max(num_layers, 1), 1 << 20)


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


def load_offloaded(path: str, dtype, device: torch.device, budget: int, offload_dir: str,
                   trust_remote_code: bool):
    import transformers

    target = (device.index or 0) if device.type == "cuda" else "cpu"
    max_memory = {target: budget}
    if target != "cpu":
        max_memory["cpu"] = budget
    return transformers.AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map="auto",
        max_memory=max_memory,
        offload_folder=offload_dir,
        trust_remote_code=trust_remote_code,
    ).eval()


@torch.no_grad()
def continue_prompts(
    model_path: str,
    sequences: List[List[int]],
    max_new_tokens: int,
    tokenizer,
    *,
    dtype: Optional[str],
    device: torch.device,
    batch_size: int,
    trust_remote_code: bool = False,
) -> List[List[int]]:
    """Each token sequence followed by the expert's greedy continuation of it."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    budget = memory_budget(model_path, getattr(config, "num_hidden_layers", 1))
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    with tempfile.TemporaryDirectory(prefix="prodistill-offload-") as offload_dir:
        model = load_offloaded(model_path, torch_dtype, device, budget, offload_dir,
                               trust_remote_code)
        stop = model.generation_config.eos_token_id
        stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
        if tokenizer.eos_token_id is not None:
            stop_ids.add(tokenizer.eos_token_id)
        input_device = next(
            (p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu")
        )
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids, mask = left_pad(chunk, pad_id)
            generated = model.generate(
                input_ids=ids.to(input_device),
                attention_mask=mask.to(input_device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop_ids) or None,
            )[:, ids.shape[1]:].tolist()
            out += [seq + cut_at_stop(new, stop_ids, pad_id) for seq, new in zip(chunk, generated)]
        del model
    return out
