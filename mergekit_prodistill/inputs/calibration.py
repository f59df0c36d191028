"""Calibration prompts: read, sample, template, tokenise, and batch them by length.

Where prompts come from (files, folders, datasets) is :mod:`mergekit_prodistill.inputs.sources`;
the prompt formats are :mod:`mergekit_prodistill.inputs.templates`.
"""

import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs.sources import read_expert_prompts
from mergekit_prodistill.inputs.templates import PLACEHOLDER, format_prompts, resolve_template

LOG = logging.getLogger("mergekit_prodistill")


def sample_prompts(prompts: List[str], shots: int, seed: int,
                   holdout: int = 0) -> Tuple[List[str], List[str]]:
    """Draw ``shots`` prompts without replacement, reproducibly for a given seed, and up to
    ``holdout`` more among the rest (none when the source has no more)."""
    if len(prompts) <= shots:
        return list(prompts), []
    chosen = random.Random(seed).sample(range(len(prompts)), shots)
    taken = set(chosen)
    rest = [i for i in range(len(prompts)) if i not in taken]
    held = random.Random(seed + 1_000_003).sample(rest, min(holdout, len(rest)))
    return [prompts[i] for i in chosen], [prompts[i] for i in held]


@dataclass
class Batch:
    """Right-padded token ids of prompts of similar length."""

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length], 1 for real tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows(self, part: int, parts: int) -> "Batch":
        """Rows part, part + parts, ...: one process's share when several split it."""
        return Batch(self.input_ids[part::parts], self.attention_mask[part::parts])


def tokenize(prompts: List[str], tokenizer, max_length: int,
             where: str = "calibration") -> List[List[int]]:
    """Token ids of every prompt, at most ``max_length``; see :func:`tokenize_counting`."""
    return tokenize_counting(prompts, tokenizer, max_length, where)[0]


def tokenize_counting(prompts: List[str], tokenizer, max_length: int,
                      where: str = "calibration") -> Tuple[List[List[int]], List[int]]:
    """Token ids of every prompt, cut to ``max_length`` by the tokenizer's own truncation,
    and every prompt's full length; a prompt that gives no token is refused.

    Blank prompts never get here (sources drop them), so a prompt without tokens means a
    tokenizer that cannot represent the text: e.g. transformers rebuilds every qwen2/qwen3
    tokenizer as ``Qwen2Tokenizer``, which drops the text of a custom vocabulary.
    """
    bos = tokenizer.bos_token
    sequences, lengths = [], []
    for text in prompts:
        # Chat templates (and some hand-written ones) already start with the BOS text;
        # letting the tokenizer add its own would give the model a doubled BOS.
        special = not (bos and text.startswith(bos))
        ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
        lengths.append(len(ids))
        if len(ids) > max_length:  # only these are tokenised again, to be cut
            ids = tokenizer(text, add_special_tokens=special, truncation=True,
                            max_length=max_length)["input_ids"]
        if not ids:
            sample = text if len(text) <= 60 else text[:57] + "..."
            raise ProDistillError(
                f"{where}: its tokenizer ({type(tokenizer).__name__}) turns the calibration "
                f"prompt {sample!r} into no tokens; check that this tokenizer class reads "
                "the model's own vocabulary"
            )
        sequences.append(ids)
    return sequences, lengths


def warn_if_truncated(path: str, template: str, lengths: List[int], max_length: int) -> None:
    """Prompts longer than ``max_length`` tokens are cut at the end; say so.

    What is cut is the end of the prompt and the template text after it (for example
    "### Response:"), so a model sees an unfinished prompt. Every prompt cut usually means
    ``max_length`` is too small for the template.
    """
    cut = [n for n in lengths if n > max_length]
    if not cut:
        return
    ending = template.split(PLACEHOLDER)[-1].strip() if PLACEHOLDER in template else ""
    lost = f"the template's ending {ending!r}" if ending else "their ends"
    if len(cut) == len(lengths):
        LOG.warning(
            "calibration file %s: all %d prompts are longer than max_length=%d tokens after "
            "templating (the longest has %d); each is cut to its first %d tokens and loses "
            "%s; raise max_length", path, len(cut), max_length, max(cut), max_length, lost,
        )
    else:
        LOG.warning(
            "calibration file %s: %d of %d prompts are longer than max_length=%d tokens "
            "after templating and are cut, losing %s", path, len(cut), len(lengths),
            max_length, lost,
        )


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
    """Per expert: where its prompts came from, their token ids, and their batches."""

    sources: List[str]  # as the recipe names them
    hub_datasets: List[Optional[str]]  # the Hub id of each source, where there is one
    batches: List[List[Batch]]
    sequences: List[List[List[int]]]  # the token ids that ``batches`` hold
    tokenizers: list = field(default_factory=list)  # each expert's, that made the ids
    # Held-out prompts, never trained on: the merge's fidelity report reads them.
    holdout: List[List[List[int]]] = field(default_factory=list)
    holdout_batches: List[List[Batch]] = field(default_factory=list)
    # Prompts a model wrote per expert (``written_prompts``), among ``sequences``.
    written: List[int] = field(default_factory=list)

    @property
    def prompts(self) -> List[int]:
        """Prompts used per expert."""
        return [len(s) for s in self.sequences]

    def with_sequences(self, sequences: List[List[List[int]]], holdout: List[List[List[int]]],
                       batch_size: int):
        """The same prompts as ``sequences`` and ``holdout`` (for example continued),
        batched anew."""
        return replace(self, sequences=sequences, holdout=holdout,
                       batches=[make_batches(s, batch_size) for s in sequences],
                       holdout_batches=[make_batches(s, batch_size) for s in holdout])

    def rows(self, part: int, parts: int) -> "CalibrationSet":
        """The same batches, each cut to rows part, part + parts, ... (:meth:`Batch.rows`)."""
        if parts == 1:
            return self
        return replace(self, batches=[[b.rows(part, parts) for b in bs] for bs in self.batches],
                       holdout_batches=[[b.rows(part, parts) for b in bs]
                                        for bs in self.holdout_batches])

    def steps(self, batch_size: int) -> Tuple[int, int]:
        """Optimiser steps per epoch (the expert with the most batches sets them), and the
        steps its real prompts alone would take, without those a model wrote."""
        written = self.written or [0] * len(self.sequences)
        return (max(len(b) for b in self.batches),
                max(math.ceil((len(s) - w) / batch_size)
                    for s, w in zip(self.sequences, written)))

    def tokens(self, expert: int) -> int:
        return sum(b.num_tokens for b in self.batches[expert])

    def shapes(self, holdout: bool = False) -> List[List[tuple]]:
        """(batch size, length) of every batch (or held-out batch), per expert."""
        return [[tuple(b.input_ids.shape) for b in batches]
                for batches in (self.holdout_batches if holdout else self.batches)]


def load_tokenizer(model, fallback, trust_remote_code: bool):
    """The expert's own tokenizer when it ships one, else the base model's."""
    import transformers

    for ref in (model, fallback):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                ref.model.path, revision=ref.model.revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError):
            continue
        # Some tokenizer classes build an empty vocabulary from a folder without any
        # tokenizer file (a config-only copy) instead of failing.
        if len(tokenizer) > len(set(tokenizer.all_special_tokens)):
            return tokenizer
    raise ProDistillError(f"model {model}: no tokenizer found in it or in the base model")


def expert_prompts(recipe, index: int, seed: int, tokenizer):
    """Expert ``index``'s sampled prompts and held-out prompts, wrapped in its template,
    and their source."""
    expert = recipe.experts[index]
    where = f"model {expert.model}"
    source = read_expert_prompts(expert.params, where)
    sampled, held = sample_prompts(source.texts, recipe.params.shots, seed + index,
                                   recipe.params.holdout_count())
    template = expert.params.template
    return (format_prompts(template, sampled, tokenizer, where),
            format_prompts(template, held, tokenizer, where) if held else [], source)


def load_for_experts(recipe, trust_remote_code: bool, seed: int) -> CalibrationSet:
    """Read, sample, template, tokenise and batch every expert's calibration prompts.

    The prompts only: each expert's continuations (``continue_tokens``) are generated by
    the merge, once it knows whether they are needed and saved (``continuation.py``).
    """
    p = recipe.params
    calib = CalibrationSet([], [], [], [])
    for i, expert in enumerate(recipe.experts):
        tokenizer = load_tokenizer(expert.model, recipe.base, trust_remote_code)
        # One tokenizer and one list of token ids per expert: the merged stream and the
        # expert's stream both start from exactly these ids.
        prompts, held, source = expert_prompts(recipe, i, seed, tokenizer)
        if len(source.texts) < p.shots:
            LOG.warning(
                "calibration source %s holds %d prompts, fewer than shots=%d: using all of them",
                source.source, len(source.texts), p.shots,
            )
        sequences, lengths = tokenize_counting(prompts, tokenizer, p.max_length,
                                               f"model {expert.model}")
        warn_if_truncated(source.source, resolve_template(expert.params.template), lengths,
                          p.max_length)
        calib.sources.append(source.source)
        calib.hub_datasets.append(source.hub_dataset)
        calib.batches.append(make_batches(sequences, p.batch_size))
        calib.sequences.append(sequences)
        calib.tokenizers.append(tokenizer)
        holdout = tokenize(held, tokenizer, p.max_length, f"model {expert.model}")
        calib.holdout.append(holdout)
        calib.holdout_batches.append(make_batches(holdout, p.batch_size))
    if p.patience and not all(calib.holdout):
        short = next(e.model for e, h in zip(recipe.experts, calib.holdout) if not h)
        raise ProDistillError(
            f"model {short}: 'patience' stops each block on the held-out prompts, and this "
            f"expert's source holds none beyond its {p.shots} shots; add prompts to it, lower "
            "'shots', or set 'patience: 0'")
    return calib
