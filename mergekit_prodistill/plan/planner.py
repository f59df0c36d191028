"""What a merge will need, and where it puts the activation streams: decided once, here.

The plan reads only each model's ``config.json`` (plus the dtype in the safetensors header
of a local checkpoint) and the calibration prompts (:mod:`workload`); of the weights, only
a sample of one block where the output dtype is not the stored one (:mod:`erasure`).
From their shapes (:mod:`shapes`) it counts every phase's bytes (:mod:`memory`), places
them on the compute device and the CPU, and adds:

* ``continuation`` (with ``continue_tokens``, when training): generating every expert's
  continuations (:mod:`generation_plan`).
* ``assemble`` (when training): the output shards built from the saved unit files.

Every phase also holds the masks and positions of all batches. A merge without training
streams its output: the writer holds up to one shard (it flushes a shard once full) in
every phase. Each device's peak is its largest phase. The Python runtime itself (torch
and libraries, about 0.5 GB on CPU) is not included: it is in use when the check runs.
Over several processes a plan is one process's: its experts, and what it sends.

Where the activation streams live (:func:`stream_placement`), their dtype and their
folder on disk are the merge's own: the run builds its streams from the :class:`Plan`
that :func:`~mergekit_prodistill.plan.fits.check_fits` returns.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_prodistill import layout, parallel
from mergekit_prodistill.inputs import expert_placement
from mergekit_prodistill.models import dtypes
from mergekit_prodistill.models.families import check_supported
from mergekit_prodistill.models.model_files import ModelFiles, model_config
from mergekit_prodistill.models.shapes import ModelShape, Workload, dtype_bytes, model_shape
from mergekit_prodistill.plan import devices, generation_plan, plan_time, workload
from mergekit_prodistill.plan.context import RunContext
from mergekit_prodistill.plan.devices import DeviceClass
from mergekit_prodistill.plan.generation_plan import Generation
from mergekit_prodistill.plan.memory import (CACHE, OUTPUT, allreduce_bytes, batch_flops,
                                             context_bytes, lambda_count, output_buffer, peak_total,
                                             phase_bytes, place, step_traffic)
from mergekit_prodistill.plan.plan_table import render


@dataclass
class Plan:
    """What a merge (one process of it, ``world``) will need: bytes per device and phase,
    FLOPs, bytes moved and sent; and where its activation streams go (``placement``,
    ``activation_dir``, ``dtypes["cache"]``)."""

    recipe: object
    shape: ModelShape
    work: Workload
    dtypes: Dict[str, str]  # weights, task_vectors, compute, cache, output, generation
    device: str
    placement: str  # of the activation streams: "device", "cpu" or "disk"
    activation_dir: Optional[str]  # their folder on disk; None: no output named yet
    phases: Dict[str, Dict[str, Dict[str, int]]]  # device -> phase -> term -> bytes
    flops: Dict[str, float]
    moved_bytes: float  # element-wise traffic of all training steps
    io_bytes: float  # checkpoints read and output written
    save_bytes: float  # progress written after every block, and the units read back
    cache_bytes: int  # the activation cache at its largest, wherever it is
    available: Dict[str, Optional[int]] = field(default_factory=dict)
    generation: List[expert_placement.Placement] = field(default_factory=list)  # per expert
    continuation_reads: Dict[str, float] = field(default_factory=dict)  # bytes, by source
    world: parallel.World = parallel.SINGLE  # the planned process and its peers
    comm_bytes_per_step: float = 0.0  # sent by the planned process in a training step

    @property
    def owned(self) -> range:
        """The experts the planned process owns (all of them in one process)."""
        return self.world.owned(len(self.recipe.experts))

    @property
    def epochs(self) -> int:
        """Every block's training epochs, ``epochs: auto`` resolved: what the merge trains."""
        return self.flops["epochs"]

    @property
    def comm_bytes_per_block(self) -> float:
        return self.comm_bytes_per_step * self.flops["steps"] * self.flops["epochs"]

    @property
    def cache_at(self) -> str:
        """Where the cache's bytes are: the device's name, "cpu" or "disk"."""
        return {"device": self.device, "cpu": "cpu", "disk": "disk"}[self.placement]

    def peak(self, device: str) -> Tuple[str, Dict[str, int]]:
        """The phase with the most bytes on ``device`` and its terms."""
        name = max(self.phases[device], key=lambda ph: sum(self.phases[device][ph].values()))
        return name, self.phases[device][name]

    def total(self, device: str) -> int:
        return peak_total(self.phases, device)

    def seconds(self, cls: DeviceClass) -> float:
        return plan_time.seconds(self, cls)

    def continuation_seconds(self, cls: DeviceClass) -> float:
        return plan_time.continuation_seconds(self, cls)

    def render(self) -> str:
        return render(self)


def stream_placement(requested: str, device: torch.device, totals: Dict[str, int],
                     free: Dict[str, Optional[int]]) -> str:
    """Where the activation streams go: "device", "cpu" or "disk".

    A requested placement (the recipe's ``activation_placement``) is taken as given:
    :func:`~mergekit_prodistill.plan.fits.check_fits` refuses it when it does not fit. ``auto`` puts them on the device
    if they fit there beside the rest, else in (pinned) CPU memory if they fit there, else
    in disk-backed files. ``totals`` holds, per placement, the peak bytes of the memory
    it loads: the device's with the streams on it ("device") and without them ("disk"),
    the CPU's with them ("cpu"); ``free`` maps device names to their free bytes. When even
    the rest does not fit, the streams stay on the device: moving them would not help,
    and the check names the knob to turn.
    """
    if requested != "auto":
        return requested
    dev = str(device)
    if free.get(dev) is None or totals["device"] <= free[dev]:
        return "device"
    if device.type != "cpu" and (free.get("cpu") is None or totals["cpu"] <= free["cpu"]):
        return "cpu"
    return "disk" if totals["disk"] <= free[dev] else "device"


@dataclass
class _Basis:
    """What a plan is counted from: the models' shapes and dtypes, and the prompts."""

    recipe: object
    ctx: RunContext
    world: parallel.World
    configs: list  # transformers configs: the base's, then each expert's
    shape: ModelShape
    stored: List[str]  # each model's stored dtype, the base first
    decided: Dict[str, str]  # the merge's dtypes by role (dtypes.decide)
    work: Workload  # every expert's batches, as every process steps through them
    own: Workload  # this process's experts' batches (its rows of them)

    @property
    def owned(self) -> range:
        return self.world.owned(len(self.recipe.experts))

    @property
    def mine(self) -> List[int]:
        """This process's models among the base (0) and the experts (1, 2, ...)."""
        return [1 + i for i in self.owned]

    def bytes_of(self, role: str) -> int:
        return dtype_bytes(self.decided[role])


def _basis(recipe, options, calib, world: parallel.World, models) -> _Basis:
    """Configs (already read by the preflight checks, where given as ``models``), shapes,
    dtypes and batches; the base's family is checked before any expert is read."""
    ctx, world = RunContext.of(options), world.for_experts(len(recipe.experts))
    refs = [recipe.base] + [e.model for e in recipe.experts]

    def config(ref):
        return models[ref].config if models else model_config(ref, ctx.trust_remote_code)

    base_config = config(recipe.base)
    check_supported(base_config.architectures, base_config.to_dict(), f"model {recipe.base}")
    configs = [base_config] + [config(ref) for ref in refs[1:]]
    stored = [dtypes.stored_dtype(ref, c, models[ref] if models else None)
              for ref, c in zip(refs, configs)]
    work = workload.from_calibration(recipe, calib) if calib is not None \
        else workload.from_prompts(recipe, options, ctx.seed)
    for batches in (work.batches, work.holdout_batches):
        world.check_split([[rows for rows, _ in bs] for bs in batches])
    owned = world.owned(len(recipe.experts))
    return _Basis(recipe, ctx, world, configs, model_shape(base_config, configs[1:]), stored,
                  dtypes.decide(recipe, stored, ctx.device), work,
                  work.only(owned).rows(*world.part(len(recipe.experts))))


def _memory(b: _Basis, available: Dict[str, Optional[int]], out_shard_size: int):
    """Every phase's bytes on each device, with the streams placed; returns them, the
    placement, the continuation pass of every owned expert, and the cache's bytes."""
    p, shape, dev = b.recipe.params, b.shape, str(b.ctx.device)
    per_phase = phase_bytes(shape, b.own, p, b.stored, b.decided, b.ctx.device.type,
                            b.owned, b.world.size)
    if not p.epochs:
        del per_phase["train"]  # no merged block, gradients or Adam state
    if not (p.epochs and p.head_epochs):
        del per_phase["head"]
    buffer = output_buffer(shape, b.bytes_of("output"), out_shard_size)
    if p.epochs:
        # Each finished unit goes to its own file (progress.py): only the block being
        # written is held; the shards are assembled from those files at the very end.
        per_phase["assemble"] = {OUTPUT: buffer}
    else:
        for terms in per_phase.values():  # streamed: the writer holds up to a shard
            terms[OUTPUT] = buffer
    contexts = context_bytes(shape, b.own, b.bytes_of("compute"))
    split = {at: place(per_phase, contexts, dev, where, shape.heap_share)
             for at, where in (("device", dev), ("cpu", "cpu"), ("disk", None))}
    placement = stream_placement(p.activation_placement, b.ctx.device, {
        "device": peak_total(split["device"], dev), "cpu": peak_total(split["cpu"], "cpu"),
        "disk": peak_total(split["disk"], dev)}, available)
    phases = split[placement]
    models = [0, *b.mine] if b.world.contributes else []  # the base writes, where asked
    configs = [b.configs[m] for m in models]
    es = [dtype_bytes(dtypes.generation_dtype(b.recipe, b.stored[m])) for m in models]
    generating = generation_plan.generations(
        b.recipe, configs[1:], es[1:], b.own, b.ctx.device, available)
    writing = generation_plan.writings(b.recipe, configs, es, b.own, b.ctx.device, available)
    if generating or writing:
        generation_plan.add_phase(phases, dev, max(generating + writing,
                                                   key=Generation.device_total),
                                  shape.heap_share)
    return (phases, placement, generating, writing,
            max(t.get(CACHE, 0) for t in per_phase.values()))


def _costs(b: _Basis, generating: List[Generation], writing: List[Generation],
           cache: int) -> dict:
    """FLOPs, bytes moved, read, written, saved and sent: the plan's time estimate."""
    p, shape, leader = b.recipe.params, b.shape, b.world.leader
    fwd = [[batch_flops(shape, r, w) for r, w in bs] for bs in b.own.batches]
    steps = max(len(bs) for bs in b.work.batches)  # every process steps with the others
    # The workload counts every prompt asked to be written; the real ones set the steps.
    real = max(math.ceil((sum(r for r, _ in bs) - p.written_prompts) / p.batch_size)
               for bs in b.work.batches)
    epochs = p.epochs_for(steps, real)
    per_step = 3 * sum(sum(f) / len(f) for f in fwd)  # forward + backward = 3 forwards
    evals = 3 if p.epochs else 2  # teacher outputs, loss before training, new stream
    lam = lambda_count(shape, len(b.owned), p.granularity)
    checkpoint = [shape.num_layers * shape.block_numel
                  + shape.hidden * v * (1 if shape.tied else 2) for v in shape.vocab]
    read = [n * dtype_bytes(d) for n, d in zip(checkpoint, b.stored)]  # bytes, per model
    written = checkpoint[0] * b.bytes_of("output") if leader else 0
    unit = shape.block_numel * b.bytes_of("output")
    compute = b.bytes_of("compute")
    return dict(
        flops={
            "training": shape.num_layers * epochs * steps * per_step
            # the head: forward + backward of a hidden x vocabulary matmul per token
            + (p.head_epochs * 3 * 2 * shape.hidden * shape.vocab[0] * sum(b.own.tokens)
               if p.epochs else 0),
            "forwards": shape.num_layers * evals * sum(sum(f) for f in fwd),
            "continuation": sum(g.flops for g in generating + writing),
            # forward passes of the continuations and the prompt writing
            "generation_steps": sum(g.steps for g in generating + writing),
            "steps": steps,
            "epochs": epochs,
        },
        moved_bytes=shape.num_layers * epochs * steps * step_traffic(
            shape, [dtype_bytes(b.stored[0])] + [b.bytes_of("task_vectors")] * len(b.mine),
            compute, lam, b.ctx.device.type),
        # The base and the owned experts are read; rank 0 alone writes the output.
        io_bytes=sum(read[m] for m in [0, *b.mine]) + written,
        # Streams saved after every block; rank 0's unit files, read back at the end.
        save_bytes=shape.num_layers * (cache + (unit if leader else 0)) + written
        if p.epochs else 0.0,
        # Generating reads each expert's checkpoint once more to load it (the base too,
        # where it writes prompts).
        continuation_reads={
            "load": sum(read[m] for m in b.mine) + (read[0] if writing else 0),
            **{k: sum(g.reads[k] for g in generating + writing)
               for k in ("device", "host", "disk")},
        } if generating or writing else {},
        # Two all-reduces of one block per step: dL/dW and the fp32 partial sum.
        comm_bytes_per_step=allreduce_bytes(b.world.size, shape.block_numel, compute)
        + allreduce_bytes(b.world.size, shape.block_numel, 4) if p.epochs else 0.0,
    )


def make_plan(recipe, options, calib=None,
              available: Optional[Dict[str, Optional[int]]] = None,
              out_path: Optional[str] = None, world: parallel.World = parallel.SINGLE,
              models: Optional[Dict[object, ModelFiles]] = None) -> Plan:
    """Plan ``recipe`` under ``options`` from configs and prompts alone, for the process
    ``world`` describes (default: one process that owns every expert).

    ``calib`` is the merge's :class:`~mergekit_prodistill.inputs.calibration.CalibrationSet`
    (default: the prompts are read here). ``available`` maps a device name to the bytes
    free on it (default: what this machine shows, CPU memory split among its processes);
    the streams are placed according to it. ``out_path`` is the output folder, whose
    staging folder holds disk-backed streams unless the recipe names an ``activation_dir``.
    ``models`` are the model files the preflight checks read (default: configs read here).
    """
    b = _basis(recipe, options, calib, world, models)
    if available is None:
        available = devices.free_memory(b.ctx.device, sharing=b.world.local_size)
    phases, placement, generating, writing, cache = _memory(b, available,
                                                           options.out_shard_size)
    p = recipe.params
    return Plan(
        recipe=recipe, shape=b.shape, work=b.work, device=str(b.ctx.device),
        placement=placement, phases=phases, dtypes=b.decided,
        activation_dir=p.activation_dir or (layout.scratch_dir(out_path) if out_path else None),
        cache_bytes=cache, available=available, generation=[g.placement for g in generating],
        world=b.world, **_costs(b, generating, writing, cache))
