"""The continuation pass as the plan counts it.

With ``continue_tokens``, when training, each expert is placed for generation by
``expert_placement.place_expert`` from the memory free now (whole on the device when it fits,
else partly offloaded), beside the KV cache and activations of one batch of its prompts.
Its time is the generation's FLOPs, the expert's weights read at every generated token,
and the offloaded part brought in from CPU memory or disk.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from mergekit_prodistill.inputs import expert_placement, prompt_writing
from mergekit_prodistill.models.shapes import Workload
from mergekit_prodistill.plan.memory import EXPERT, GENERATION, SLACK, slack


@dataclass(frozen=True)
class Generation:
    """One expert's continuation pass, as ``expert_placement.place_expert`` places it."""

    placement: expert_placement.Placement
    flops: float
    reads: Dict[str, float]  # bytes of weights read for all forward passes, by where from
    steps: int = 0  # forward passes: a prefill and one per generated token, per batch

    def device_total(self) -> int:
        return self.placement.device_bytes + self.placement.generation_bytes


def generations(recipe, expert_configs, weight_bytes: List[int], work: Workload,
                device: torch.device, available: Dict[str, Optional[int]]) -> List[Generation]:
    """Every expert's generation pass; none without ``continue_tokens`` or training."""
    p = recipe.params
    if not (p.epochs and p.continue_tokens):
        return []
    passes = []
    for config, es, lengths in zip(expert_configs, weight_bytes, work.prompt_lengths):
        shape = expert_placement.expert_shape(config, es)
        placed = expert_placement.place_expert(shape, lengths, p.continue_tokens, device, available)
        forwards = placed.batches * p.continue_tokens  # the prefill and one per new token
        passes.append(Generation(
            placed, expert_placement.generation_flops(shape, placed, lengths, p.continue_tokens),
            _reads(shape, placed, forwards), forwards))
    return passes


def writings(recipe, configs, weight_bytes: List[int], work: Workload, device: torch.device,
             available: Dict[str, Optional[int]]) -> List[Generation]:
    """The prompt writing of ``written_prompts``: the base (``configs[0]``) writing for every
    owned expert (``configs[1:]``, with its prompt lengths in ``work``), placed as loaded for
    that, and each expert writing for itself, placed as for its continuations; none without.

    Counted at the least it can be: every sampled prompt kept, so one draw per
    ``DRAW_ROWS`` prompts, each as long as the longest allowed (the last length of
    ``work``'s, where the prompts still to be written are counted), and every real and
    written prompt scored once by each writer."""
    p = recipe.params
    if not (p.epochs and p.written_prompts and configs[1:]):
        return []
    most = max(max(lengths) for lengths in work.prompt_lengths)
    base = expert_placement.expert_shape(configs[0], weight_bytes[0])
    at_base = expert_placement.place_expert(base, [most] * prompt_writing.DRAW_ROWS, 0, device,
                                            available)
    passes = [_writing(base, at_base, work.prompt_lengths, p.written_prompts)]
    for config, es, lengths in zip(configs[1:], weight_bytes[1:], work.prompt_lengths):
        shape = expert_placement.expert_shape(config, es)
        placed = expert_placement.place_expert(shape, lengths, p.continue_tokens, device, available)
        passes.append(_writing(shape, placed, [lengths], p.written_prompts))
    return passes


def _writing(shape, placed, prompt_lengths: List[List[int]], count: int) -> Generation:
    """One writer loaded as ``placed``, writing ``count`` prompts for each of these
    experts' prompts and scoring them and the real ones."""
    rows = min(prompt_writing.DRAW_ROWS, placed.rows)
    flops, forwards = 0.0, 0
    for lengths in prompt_lengths:
        draws, longest = math.ceil(count / rows), max(lengths)
        flops += draws * expert_placement.generation_flops(
            shape, dataclasses.replace(placed, rows=rows), [1] * rows, longest)
        flops += sum(lengths) * (shape.flops_per_token + shape.head_flops)  # scoring
        forwards += draws * longest + len(lengths)
    return Generation(placed, flops, _reads(shape, placed, forwards), forwards)


def _reads(shape, placed, forwards: int) -> Dict[str, float]:
    """Bytes of weights read by ``forwards`` passes, by where they are."""
    return {"device": forwards * (shape.weight_bytes - placed.host_bytes - placed.disk_bytes),
            "host": forwards * placed.host_bytes, "disk": forwards * placed.disk_bytes}


def add_phase(phases, dev: str, generation: Generation, heap_share: float):
    """The continuation phase on the device (and on the CPU for what is offloaded there).

    It runs before the block loop: no streams, masks or output buffer exist yet.
    """
    placed = generation.placement
    phases[dev]["continuation"] = {EXPERT: placed.device_bytes,
                                   GENERATION: placed.generation_bytes}
    if dev != "cpu":
        phases["cpu"]["continuation"] = {EXPERT: placed.host_bytes}
    for device in {dev, "cpu"}:
        terms = phases[device]["continuation"]
        terms[SLACK] = slack(device, terms, heap_share)
