"""Calibration prompts: read, sample, tokenise, and batch them by length.

Prompts are unlabeled text. A ``.jsonl`` file holds one JSON object per line with the
prompt under ``text`` (or ``prompt`` / ``instruction``), or one JSON string per line; any
other file holds one prompt per line. Relative paths are resolved against the working
directory, as mergekit does for model paths.
"""

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import List, Tuple

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.templates import apply_template

LOG = logging.getLogger("mergekit_prodistill")

PROMPT_FIELDS = ("text", "prompt", "instruction")


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ProDistillError(f"calibration file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ProDistillError(f"calibration file {path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ProDistillError(f"calibration file {path} cannot be read: {exc}") from None

    prompts = []
    is_jsonl = path.endswith(".jsonl")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProDistillError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if isinstance(record, dict):
            record = next((record[k] for k in PROMPT_FIELDS if k in record), None)
        if not isinstance(record, str):
            raise ProDistillError(
                f"{path}:{number}: expected a string or an object with a "
                f"{' / '.join(repr(k) for k in PROMPT_FIELDS)} field"
            )
        if record.strip():
            prompts.append(record)
    if not prompts:
        raise ProDistillError(f"calibration file {path} holds no prompts")
    return prompts


def sample_prompts(prompts: List[str], shots: int, seed: int) -> List[str]:
    """Draw ``shots`` prompts without replacement, reproducibly for a given seed."""
    if len(prompts) <= shots:
        return list(prompts)
    return random.Random(seed).sample(prompts, shots)


@dataclass
class Batch:
    """Right-padded token ids of prompts of similar length."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length], 1 for real tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize(prompts: List[str], tokenizer, max_length: int) -> List[List[int]]:
    encoded = tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length)
    return [ids for ids in encoded["input_ids"] if ids]


def make_batches(sequences: List[List[int]], batch_size: int) -> List[Batch]:
    """Group sequences of similar length so padding wastes little compute."""
    ordered = sorted(sequences, key=len, reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append(Batch(ids, mask))
    return batches


@dataclass
class CalibrationSet:
    """Per expert: where its prompts came from, and their batches."""

    files: List[str]
    prompts: List[int]  # prompts used per expert
    batches: List[List[Batch]]

    def tokens(self, expert: int) -> int:
        return sum(b.num_tokens for b in self.batches[expert])


def load_tokenizer(model, fallback, trust_remote_code: bool):
    """The expert's own tokenizer when it ships one, else the base model's."""
    import transformers

    for ref in (model, fallback):
        try:
            return transformers.AutoTokenizer.from_pretrained(
                ref.model.path, revision=ref.model.revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError):
            continue
    raise ProDistillError(f"model {model}: no tokenizer found in it or in the base model")


def expert_prompts(recipe, index: int, seed: int) -> Tuple[List[str], int]:
    """Expert ``index``'s sampled, templated prompts, and how many its file holds."""
    expert = recipe.experts[index]
    prompts = read_prompts(expert.params.calibration)
    sampled = sample_prompts(prompts, recipe.params.shots, seed + index)
    return [apply_template(expert.params.template, x) for x in sampled], len(prompts)


def load_for_experts(recipe, options, seed: int) -> CalibrationSet:
    """Read, sample, tokenise and batch every expert's calibration prompts."""
    p = recipe.params
    files, used, batches = [], [], []
    for i, expert in enumerate(recipe.experts):
        path = expert.params.calibration
        prompts, available = expert_prompts(recipe, i, seed)
        if available < p.shots:
            LOG.warning(
                "calibration file %s holds %d prompts, fewer than shots=%d: using all of them",
                path, available, p.shots,
            )
        tokenizer = load_tokenizer(expert.model, recipe.base, options.trust_remote_code)
        sequences = tokenize(prompts, tokenizer, p.max_length)
        if not sequences:
            raise ProDistillError(f"calibration file {path}: no prompt produced any token")
        files.append(path)
        used.append(len(sequences))
        batches.append(make_batches(sequences, p.batch_size))
    return CalibrationSet(files, used, batches)
