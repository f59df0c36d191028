"""Every expert's calibration batches as the plan counts them.

A merge hands the plan the prompts it has already read and tokenised (its
:class:`~mergekit_prodistill.inputs.calibration.CalibrationSet`): nothing is read twice. The
``plan`` command reads the prompts itself and tokenises them with each expert's tokenizer
when one is at hand, else estimates their length. Either way, a training run counts every
prompt with room for ``continue_tokens`` more, and the ``written_prompts`` at their longest,
and batches them as the merge will.
"""

import math
from typing import List, Sequence

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import calibration
from mergekit_prodistill.inputs.prompt_writing import SLACK
from mergekit_prodistill.models.shapes import Workload

# Without a tokenizer, count one token per this many characters: a deliberately high
# count for English prose and code under Llama-style tokenizers (they average 3.5-4.5).
CHARS_PER_TOKEN = 3.0


def from_calibration(recipe, calib: calibration.CalibrationSet) -> Workload:
    """The workload of the prompts a merge has read (before any continuation)."""
    lengths = lambda sequences: [[len(s) for s in seqs] for seqs in sequences]  # noqa: E731
    return batched(recipe.params, lengths(calib.sequences), lengths(calib.holdout),
                   "tokenizer")


def from_prompts(recipe, options, seed: int) -> Workload:
    """Every expert's prompts, read and tokenised here, or estimated from their length."""
    p = recipe.params
    prompt_lengths, holdout_lengths, estimated = [], [], False
    for i, expert in enumerate(recipe.experts):
        try:
            tokenizer = calibration.load_tokenizer(expert.model, recipe.base,
                                                   options.trust_remote_code)
        except ProDistillError:
            tokenizer = None
        prompts, held, _ = calibration.expert_prompts(recipe, i, seed, tokenizer)
        for texts, found in ((prompts, prompt_lengths), (held, holdout_lengths)):
            if tokenizer is not None:
                found.append([len(s) for s in calibration.tokenize(
                    texts, tokenizer, p.max_length, f"model {expert.model}")])
            else:
                estimated = True
                found.append([min(p.max_length, 1 + math.ceil(len(x) / CHARS_PER_TOKEN))
                              for x in texts])
    source = f"estimated at {CHARS_PER_TOKEN:g} characters per token" if estimated \
        else "tokenizer"
    return batched(p, prompt_lengths, holdout_lengths, source)


def batched(p, prompt_lengths: Sequence[List[int]], holdout_lengths: Sequence[List[int]],
            source: str) -> Workload:
    """Batches of every expert's prompts (and held-out prompts) of these lengths, as the
    merge makes them."""
    def shapes(lengths):
        # Each expert's continuation may add up to continue_tokens (the worst case).
        lengths = [n + (p.continue_tokens if p.epochs else 0) for n in lengths]
        made = calibration.make_batches([[0] * n for n in lengths], p.batch_size)
        return tuple(tuple(b.input_ids.shape) for b in made), sum(lengths)

    if p.epochs and p.written_prompts:  # each at most SLACK tokens past the longest real one
        prompt_lengths = [list(lengths) + [max(lengths) + SLACK] * p.written_prompts
                          for lengths in prompt_lengths]
    batches, tokens = zip(*(shapes(lengths) for lengths in prompt_lengths))
    held = tuple(shapes(lengths)[0] for lengths in holdout_lengths) if p.epochs else ()
    # Held-out prompts are continued too: the generation pass counts them.
    return Workload(tuple(batches), tuple(tokens), source,
                    tuple(tuple(a) + tuple(b) for a, b in zip(prompt_lengths, holdout_lengths)),
                    held)
