"""The plan enforced: a merge that would not fit this machine is refused before any
weight is read, naming the part that is largest and the setting that shrinks it."""

import torch

from mergekit_prodistill import parallel
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.formatting import fmt_bytes
from mergekit_prodistill.models import erasure
from mergekit_prodistill.plan import devices
from mergekit_prodistill.plan.memory import (CACHE, CONTEXTS, EXPERT, GENERATION, LAMBDA, OUTPUT,
                                             SLACK, TRANSIENT, WEIGHTS)
from mergekit_prodistill.plan.planner import Plan, make_plan

PHASES = {"load": "reading a block", "train": "training a block",
          "write": "writing a block", "embed": "merging the embeddings",
          "head": "training the final norm and LM head",
          "continuation": "continuing the prompts",
          "assemble": "assembling the output shards"}
KNOBS = {
    WEIGHTS: "run on a device with more memory (--device / --cuda) or set 'dtype: bfloat16'",
    LAMBDA: "run on a device with more memory (--device / --cuda), merge fewer experts at "
    "once, or set 'granularity: tensor'",
    CACHE: "lower 'shots' or 'max_length', or store the cache in a smaller dtype "
    "('activation_dtype') or elsewhere ('activation_placement: auto', 'cpu' or 'disk')",
    CONTEXTS: "lower 'shots' or 'max_length'",
    TRANSIENT: "lower 'batch_size' or 'max_length'",
    EXPERT: "run on a device with more memory (--device / --cuda) or set 'dtype: bfloat16'",
    GENERATION: "lower 'continue_tokens' or 'max_length'",
    OUTPUT: "lower --out-shard-size",
}


def check_fits(recipe, options, out_path: str, calib=None,
               world: parallel.World = parallel.SINGLE, models=None) -> Plan:
    """Refuse to start a merge whose plan (for this process of ``world``) exceeds the
    memory this machine shows, or whose disk-backed streams exceed their folder's free
    space; return the plan the merge runs.
    """
    plan = make_plan(recipe, options, calib, out_path=out_path, world=world, models=models)
    if world.leader:
        erasure.warn_if_erased(recipe, plan.dtypes["output"], models)
    who = f"process {world.rank} of {world.size}" if world.distributed else "the merge"
    for device, free in plan.available.items():
        if device not in plan.phases or free is None or plan.total(device) <= free:
            continue
        phase, terms = plan.peak(device)
        largest = max((t for t in terms if t != SLACK), key=terms.get)
        parts = ", ".join(f"{t} {fmt_bytes(v)}" for t, v in terms.items() if v)
        raise ProDistillError(
            f"plan: {who} needs {fmt_bytes(plan.total(device))} on {device} while "
            f"{PHASES[phase]} ({parts}) but {fmt_bytes(free)} is free; the largest part "
            f"is the {largest}: {KNOBS[largest]} (see mergekit-prodistill plan)"
        )
    for expert, placed in zip([recipe.experts[i] for i in plan.owned], plan.generation):
        placed.check(torch.device(plan.device), expert.model)
    if plan.placement == "disk":
        _, free = devices.free_disk(plan.activation_dir)
        if free < plan.cache_bytes:
            raise ProDistillError(
                f"plan: the activation cache needs {fmt_bytes(plan.cache_bytes)} on disk but "
                f"{plan.activation_dir} has {fmt_bytes(free)} free; lower 'shots' or "
                "'max_length', or set 'activation_dir' to a folder on a larger disk"
            )
    return plan
