"""The continuation pass as the plan counts it.

With ``continue_tokens``, when training, each expert is placed for generation by
``expert_placement.place_expert`` from the memory free now (whole on the device when it fits,
else partly offloaded), beside the KV cache and activations of one batch of its prompts.
Its time is the generation's FLOPs, the expert's weights read at every generated token,
and the offloaded part brought in from CPU memory or disk.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from mergekit_prodistill.inputs import expert_placement
from mergekit_prodistill.models.shapes import Workload
from mergekit_prodistill.plan.memory import EXPERT, GENERATION, SLACK, slack


@dataclass(frozen=True)
class Generation:
    """One expert's continuation pass, as ``expert_placement.place_expert`` places it."""

    placement: expert_placement.Placement
    flops: float
    reads: Dict[str, float]  # bytes of weights read for all forward passes, by where from

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
            {"device": forwards * (shape.weight_bytes - placed.host_bytes - placed.disk_bytes),
             "host": forwards * placed.host_bytes, "disk": forwards * placed.disk_bytes}))
    return passes


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
