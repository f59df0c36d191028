"""More calibration prompts, written by a model (``written_prompts``).

With few prompts per expert the merge fits them rather than the skill: on the hard suite
with a base that has read its prompts, 16 real prompts keep 0.80 of the experts' skill and
64 keep 0.91 (bench/quality/written_prompts.py). A language model can write more of the
same kind. All of an expert's
prompts start with the same tokens (its template's opening, often the task's wording) and
end with the same tokens (the template's assistant header), so a model started on that
shared start and sampled until the shared end writes a new prompt in the same frame, as
Magpie (Xu et al., 2024) does with chat templates. There, 16 real prompts and 48 written
ones keep as much as 64 real ones.

Who writes matters: an expert whose fine-tuning wiped out what it knew of prompts writes
junk, and junk prompts lower what the merge keeps. So the expert and the base each score
the expert's real prompts (the mean log-probability of their tokens after the shared
start), and the one that predicts them better writes. And a writer's prompts are kept only
if it finds the real prompts about as likely as its own (:data:`MAX_GAP`): a writer that
knows the prompts' kind samples prompts as likely as the real ones, while one that does not
finds its own prompts far likelier than the real ones.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_prodistill.inputs import continuation

LOG = logging.getLogger("mergekit_prodistill")

# A written prompt may run this many tokens past the longest real prompt.
SLACK = 2
# Kept only if the writer's mean log-probability per token of the real prompts is at most
# this many nats below that of the prompts it wrote. On the bench's skill models writers
# that know the prompts' kind were within 0.13 and the others 1.4 to 3.7 below.
MAX_GAP = 0.5
# Prompts sampled per draw, and the most draws.
DRAW_ROWS = 64
MAX_DRAWS = 20


def shared_ends(sequences: Sequence[List[int]]) -> Tuple[List[int], List[int]]:
    """The tokens every sequence starts with, and those every one ends with (never
    overlapping the start in the shortest sequence)."""
    def common(seqs):
        k = 0
        while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
            k += 1
        return list(seqs[0][:k])

    start = common(sequences)
    end = common([s[::-1] for s in sequences])[::-1]
    room = min(len(s) for s in sequences) - len(start)
    return start, end[len(end) - max(0, min(len(end), room)):]


def ends_at(body: List[int], end: List[int]) -> Optional[int]:
    """The length of ``body`` up to the first complete ``end`` in it (None: none)."""
    for k in range(len(end), len(body) + 1):
        if body[k - len(end):k] == end:
            return k
    return None


@torch.no_grad()
def mean_log_prob(model, sequences: Sequence[List[int]], skip: int, device) -> float:
    """The mean log-probability ``model`` gives the tokens of ``sequences`` after their
    first ``skip`` (the shared start, which every writer is given)."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([seq], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        scored = logp[max(skip, 1) - 1:]
        total += float(scored.sum())
        count += scored.numel()
    return total / max(count, 1)


def longest(real: Sequence[List[int]]) -> int:
    """The most tokens a prompt written like ``real`` may have."""
    return max(len(s) for s in real) + SLACK


@torch.no_grad()
def sample_prompts(model, real: Sequence[List[int]], count: int, seed: int, device,
                   pad_id: int, stop_ids: Sequence[int], rows: int = DRAW_ROWS
                   ) -> List[List[int]]:
    """Up to ``count`` new prompts sampled by ``model`` (temperature 1) from the real
    prompts' shared start until their shared end (or, without one, an end-of-sequence).

    A prompt that never ends, runs past the longest real one by more than :data:`SLACK`
    tokens, or repeats another is dropped; drawing stops at the first draw that adds
    none."""
    start, end = shared_ends(real)
    if not start:
        return []
    limit = longest(real)
    seen = {tuple(s) for s in real}
    written: List[List[int]] = []
    stops = set(stop_ids) | {pad_id}
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for _ in range(MAX_DRAWS):
            drawn = model.generate(
                input_ids=torch.tensor([start] * rows, device=device),
                attention_mask=torch.ones(rows, len(start), dtype=torch.long, device=device),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=limit - len(start), pad_token_id=pad_id,
                eos_token_id=list(stop_ids) or None)[:, len(start):].tolist()
            before = len(written)
            for body in drawn:
                seq = _prompt_of(start, body, end, stops)
                if seq is None or len(seq) > limit or tuple(seq) in seen:
                    continue
                seen.add(tuple(seq))
                written.append(seq)
                if len(written) == count:
                    return written
            if len(written) == before:  # a whole draw wrote nothing new: it will not
                break
    return written


def _prompt_of(start, body, end, stops) -> Optional[List[int]]:
    """The prompt a sampled ``body`` writes: up to the shared end, with no stop token
    before it; without a shared end, up to the first stop token."""
    if not end:
        cut = next((k for k, t in enumerate(body) if t in stops), None)
        return start + body[:cut] if cut else None
    cut = ends_at(body, end)
    if cut is None or stops & set(body[:cut]):
        return None
    return start + body[:cut]


@dataclass(frozen=True)
class Candidate:
    """What one writer offers an expert: its name, its score of the real prompts, the
    prompts it wrote, and its score of those."""

    writer: str
    score: float
    prompts: List[List[int]]
    own_score: float = float("nan")

    @property
    def gap(self) -> float:
        """How much less likely the writer finds the real prompts than its own (nats per
        token; +inf when it wrote none)."""
        return self.own_score - self.score if self.prompts else float("inf")


def best(candidates: Sequence[Optional[Candidate]], where: str) -> Candidate:
    """The candidate whose writer predicts the real prompts best, if its prompts are like
    them (:data:`MAX_GAP`); else no prompts. Logged either way. None stands for a writer
    that cannot read the prompts' tokens."""
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        LOG.warning("%s: no model can read its prompts' tokens; no prompts written", where)
        return Candidate("none", float("-inf"), [])
    chosen = max(candidates, key=lambda c: c.score)
    scores = ", ".join(f"{c.writer} {c.score:.3f}" for c in candidates)
    if chosen.gap > MAX_GAP:
        LOG.warning("%s: no prompts written: the %s, which predicts its prompts best (mean "
                    "log-probability per token %s), wrote %d, and finds them %.2f nats per "
                    "token likelier than the real ones (at most %g): they would not be like "
                    "them", where, chosen.writer, scores, len(chosen.prompts), chosen.gap,
                    MAX_GAP)
        return Candidate(chosen.writer, chosen.score, [])
    LOG.info("%s: %d prompts written by the %s (mean log-probability per token of the real "
             "prompts: %s; of its own: %.3f)", where, len(chosen.prompts), chosen.writer,
             scores, chosen.own_score)
    return chosen


def offer(m: continuation.Loaded, writer: str, real: List[List[int]], count: int, seed: int,
          tokenizer) -> Optional[Candidate]:
    """What the loaded model ``m`` offers as the ``writer`` of ``count`` prompts like
    ``real`` (an expert's, in its ``tokenizer``): the prompts it writes and the scores;
    None where it cannot read their tokens."""
    if max(max(s) for s in real) >= m.model.get_input_embeddings().num_embeddings:
        return None
    start, _ = shared_ends(real)
    stop_ids, pad_id = continuation.ends_of(m.model, tokenizer)
    written = [s for s in sample_prompts(m.model, real, count, seed, m.input_device, pad_id,
                                         sorted(stop_ids), min(DRAW_ROWS, m.placement.rows))
               if max(s) < len(tokenizer)]  # the expert's ids
    return Candidate(writer, mean_log_prob(m.model, real, len(start), m.input_device), written,
                     mean_log_prob(m.model, written, len(start), m.input_device))


def base_offers(load, reals: Dict[int, List[List[int]]], count: int, tokenizers,
                seed: int) -> Dict[int, Optional[Candidate]]:
    """The base's :func:`offer` for every expert ``i`` of ``reals`` (seed ``seed + i``),
    from one load: ``load(lengths, max_new_tokens, tokenizer)`` loads it whole, placed for
    prompts of these lengths (:func:`continuation.loaded`)."""
    most = max(longest(real) for real in reals.values())
    with load([most] * DRAW_ROWS, 0, tokenizers[next(iter(reals))]) as m:
        return {i: offer(m, "base", real, count, seed + i, tokenizers[i])
                for i, real in reals.items()}
