"""How much of each expert the merge kept, measured on prompts it never trained on.

Each expert's held-out prompts (``holdout``) go through the same block loop, forward only,
in three streams: through the trained merged blocks, through the task-arithmetic blocks
(every coefficient at ``init``: the blocks the merge started from), and through the
expert's own blocks. At the end, through the final norm and LM head, every real token's
next-token distribution of the merged model and of task arithmetic is compared with the
expert's: how often the greedy choice is the expert's (agreement), and the mean
KL(expert || model). Memory stays one block: the held-out streams advance with the others,
and the distributions are computed one sequence at a time.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List

import torch

LOG = logging.getLogger("mergekit_prodistill")

MERGES = ("prodistill", "task_arithmetic")


@dataclass
class Heldout:
    """The held-out prompts' streams, per expert and batch, and their masks and positions."""

    merged: List[List[torch.Tensor]]
    task_arithmetic: List[List[torch.Tensor]]
    expert: List[List[torch.Tensor]]
    contexts: list


@torch.no_grad()
def measure(heldout: Heldout, log_probs, base_w, deltas, merged: Dict[str, Dict],
            device) -> List[List[float]]:
    """Per expert, the counts :func:`results` turns into figures: prompts, tokens, and for
    each merge (``MERGES``) the next-token choices that are the expert's and the KL to
    the expert, summed over tokens (counts of several processes add up).

    ``base_w`` and ``deltas`` hold the final norm (``"weight"``) and LM head (``"head"``)
    of the base and each expert's task vectors; ``merged`` holds them as each merge
    writes them; ``log_probs`` is :class:`head.HeadForward`.
    """
    dtype = heldout.merged[0][0].dtype if any(heldout.merged) else torch.float32
    heads = {merge: {n: t.to(dtype) for n, t in merged[merge].items()} for merge in MERGES}
    streams = {"prodistill": heldout.merged, "task_arithmetic": heldout.task_arithmetic}
    counts = []
    for i, batches in enumerate(heldout.contexts):
        own = {n: (base_w[n] + deltas[i][n]).to(dtype) for n in base_w}
        agree = dict.fromkeys(MERGES, 0)
        kl = dict.fromkeys(MERGES, 0.0)
        tokens = prompts = 0
        for b, ctx in enumerate(batches):
            for row, mask in enumerate(ctx.token_mask):
                # One sequence at a time: its logits span the whole vocabulary.
                teacher = log_probs(own["weight"], own["head"],
                                    heldout.expert[i][b][row].to(device)[mask])
                choice = teacher.argmax(-1)
                for merge in MERGES:
                    w = heads[merge]
                    student = log_probs(w["weight"], w["head"],
                                        streams[merge][i][b][row].to(device)[mask])
                    agree[merge] += int((student.argmax(-1) == choice).sum())
                    kl[merge] += float((teacher.exp() * (teacher - student)).sum())
                tokens += int(mask.sum())
                prompts += 1
        counts.append([prompts, tokens, *(x for m in MERGES for x in (agree[m], kl[m]))])
    return counts


def results(experts: List[str], counts: List[List[float]]) -> List[Dict]:
    """Per expert (named in ``experts``): prompts, tokens, and for ProDistill and task
    arithmetic the share of next-token choices that are the expert's and the mean KL to
    the expert, from :func:`measure`'s counts."""
    out = []
    for name, (prompts, tokens, *sums) in zip(experts, counts):
        out.append({"model": name, "prompts": int(prompts), "tokens": int(tokens), **{
            merge: {"agreement": sums[2 * k] / max(tokens, 1),
                    "kl": sums[2 * k + 1] / max(tokens, 1)} for k, merge in enumerate(MERGES)}})
    return out


def summary(results: List[Dict]) -> str:
    """One line: per expert, the share of its next-token choices each merge kept."""
    return "; ".join(
        f"{os.path.basename(r['model'].rstrip('/'))} ProDistill "
        f"{100 * r['prodistill']['agreement']:.0f}% / task arithmetic "
        f"{100 * r['task_arithmetic']['agreement']:.0f}%" for r in results if r["tokens"])


def behind(result: Dict) -> bool:
    """ProDistill is further from the expert than task arithmetic: a higher KL, or fewer
    next-token choices kept by more than twice the sampling noise of the difference."""
    pd, ta, n = result["prodistill"], result["task_arithmetic"], result["tokens"]
    p = (pd["agreement"] + ta["agreement"]) / 2
    noise = 2 * math.sqrt(2 * p * (1 - p) / max(n, 1))
    return n > 0 and (pd["kl"] > ta["kl"] or pd["agreement"] < ta["agreement"] - noise)


def warn_if_behind(results: List[Dict]) -> None:
    """Say so when ProDistill is further from an expert than task arithmetic."""
    for r in results:
        if behind(r):
            LOG.warning(
                "on %s's held-out prompts ProDistill is further from the expert than task "
                "arithmetic (next-token choices kept %.1f%% vs %.1f%%, KL %.3g vs %.3g): "
                "the coefficients may fit the calibration prompts too closely (raise "
                "'shots') or overshoot (lower 'lr')", r["model"],
                100 * r["prodistill"]["agreement"], 100 * r["task_arithmetic"]["agreement"],
                r["prodistill"]["kl"], r["task_arithmetic"]["kl"])
