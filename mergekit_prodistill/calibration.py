"""Calibration prompts: read, sample, template, tokenise, and batch them by length.

Where prompts come from (files, folders, datasets) is :mod:`mergekit_prodistill.sources`;
the prompt formats are :mod:`mergekit_prodistill.templates`.
"""

import logging
import random
from dataclasses import dataclass
from typing import List, Optional

import torch

from mergekit_prodistill import continuation
from mergekit_prodistill.errors import ProDistillError
# read_prompts and PROMPT_FIELDS stay importable from here for existing callers.
from mergekit_prodistill.sources import PROMPT_FIELDS, read_expert_prompts, read_prompts  # noqa: F401
from mergekit_prodistill.templates import format_prompts

LOG = logging.getLogger("mergekit_prodistill")


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
    bos = tokenizer.bos_token
    sequences = []
    for text in prompts:
        # Chat templates (and some hand-written ones) already start with the BOS text;
        # letting the tokenizer add its own would give the model a doubled BOS.
        special = not (bos and text.startswith(bos))
        ids = tokenizer(text, add_special_tokens=special, truncation=True,
                        max_length=max_length)["input_ids"]
        if ids:
            sequences.append(ids)
    return sequences


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

    sources: List[str]  # as the recipe names them
    hub_datasets: List[Optional[str]]  # the Hub id of each source, where there is one
    prompts: List[int]  # prompts used per expert
    batches: List[List[Batch]]

    def tokens(self, expert: int) -> int:
        return sum(b.num_tokens for b in self.batches[expert])

    def shapes(self) -> List[List[tuple]]:
        """(batch size, length) of every batch, per expert."""
        return [[tuple(b.input_ids.shape) for b in batches] for batches in self.batches]


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


def load_for_experts(recipe, options, seed: int) -> CalibrationSet:
    """Read, sample, template, tokenise and batch every expert's calibration prompts."""
    p = recipe.params
    calib = CalibrationSet([], [], [], [])
    for i, expert in enumerate(recipe.experts):
        where = f"model {expert.model}"
        source = read_expert_prompts(expert.params, where)
        if len(source.texts) < p.shots:
            LOG.warning(
                "calibration source %s holds %d prompts, fewer than shots=%d: using all of them",
                source.source, len(source.texts), p.shots,
            )
        prompts = sample_prompts(source.texts, p.shots, seed + i)
        # One tokenizer and one list of token ids per expert: the merged stream and the
        # expert's stream both start from exactly these ids.
        tokenizer = load_tokenizer(expert.model, recipe.base, options.trust_remote_code)
        prompts = format_prompts(expert.params.template, prompts, tokenizer, where)
        sequences = tokenize(prompts, tokenizer, p.max_length)
        if not sequences:
            raise ProDistillError(f"calibration source {source.source}: no prompt produced any token")
        if p.continue_tokens:
            sequences = continuation.continue_prompts(
                expert.model.local_path(cache_dir=options.transformers_cache), sequences,
                p.continue_tokens, tokenizer, dtype=recipe.dtype,
                device=torch.device(options.device or "cpu"), batch_size=p.batch_size,
                trust_remote_code=options.trust_remote_code,
            )
        calib.sources.append(source.source)
        calib.hub_datasets.append(source.hub_dataset)
        calib.prompts.append(len(sequences))
        calib.batches.append(make_batches(sequences, p.batch_size))
    return calib
