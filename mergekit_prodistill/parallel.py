"""Expert-parallel merges on ``torch.distributed``: which experts a process owns, and the
few collectives the block loop needs.

Started by ``torchrun`` or ``accelerate launch`` (which set ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous address), each process owns a contiguous run of the
experts: their task vectors, coefficients, Adam state, activation streams and
continuations. The loss is a sum over experts of losses of one shared merged block, so a
training step needs two sums over processes: the merged block theta_0 + sum_i lambda_i
tau_i from each process's partial sum, and the gradient dL/dW from each process's own
experts. Contiguous ownership makes those sums add the experts in the same order as one
process does: with two processes the result is the same bit for bit.

With more processes than experts, the processes that share an expert split the rows of
each of its batches (data-parallel): each back-propagates its rows' share of the batch's
loss, and all hold the same coefficients, trained alike from the same summed gradient;
only the first of them adds the expert's lambda_i tau_i and reports its coefficients.

One process (no launcher) is :data:`SINGLE`, whose collectives do nothing.

Two process groups carry the collectives. Waits that may be long (the continuations of a
large expert, a leader's disk writes, barriers) and Python objects go through the
default group, gloo over TCP, with a timeout of hours. Tensor sums, the per-step traffic,
go through a group of their own (:meth:`World.with_timeout`), NCCL on CUDA, whose timeout
the run sizes from the plan's time per block once the plan exists. A process whose peer
died sees it at its next collective: gloo's connections close at once; NCCL, which
cannot tell, gives up when that timeout passes (``TORCH_NCCL_BLOCKING_WAIT`` makes it
raise in the waiting process), and both end in :class:`PeerStopped`'s one line.
"""

import contextlib
import datetime
import logging
import os
import re
import signal
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from mergekit_prodistill.errors import ProDistillError, one_line

LOG = logging.getLogger("mergekit_prodistill")
T = TypeVar("T")

# Processes wait for each other at every training step, and for the slowest one after
# the continuations (an expert of 70B generating for tens of minutes): the default
# 10-30 minute timeouts would end a healthy merge. A process that dies closes its
# connections, which ends the others' waits at once.
TIMEOUT = datetime.timedelta(hours=6)


class PeerStopped(ProDistillError):
    """Another process of the merge stopped; its own message says why."""


@dataclass(frozen=True)
class World:
    """This process's place among the merge's processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live
    local_size: int = 1  # processes on this machine, sharing its CPU memory
    experts: int = 0  # in the merge; 0: one process, which owns them all
    tensors: Optional[object] = None  # the group of tensor sums; None: the default one

    def with_timeout(self, seconds: float) -> "World":
        """This world with its tensor sums in a group of their own (NCCL on CUDA, on this
        process's GPU), which gives up on a peer after ``seconds``. Every process calls it."""
        if not self.distributed:
            return self
        cuda = self.device.type == "cuda"
        group = self._call(dist.new_group, backend="nccl" if cuda else "gloo",
                           timeout=datetime.timedelta(seconds=seconds),
                           device_id=self.device if cuda else None)
        return replace(self, tensors=group)

    def for_experts(self, experts: int) -> "World":
        return replace(self, experts=experts)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0 writes the output, the report and the shared progress."""
        return self.rank == 0

    def owned(self, experts: int) -> range:
        """The experts this process owns: a contiguous run, the first ``experts % size``
        processes one more than the rest; with more processes than experts, one expert,
        shared with its neighbours."""
        if self.size > experts:
            first = self.rank * experts // self.size
            return range(first, first + 1)
        share, extra = divmod(experts, self.size)
        start = self.rank * share + min(self.rank, extra)
        return range(start, start + share + (self.rank < extra))

    def sharing(self, expert: int, experts: int) -> List[int]:
        """The ranks that own ``expert`` when there are more processes than experts."""
        return [r for r in range(self.size) if r * experts // self.size == expert]

    def part(self, experts: int) -> Tuple[int, int]:
        """(k, m): this process takes rows k, k + m, ... of each batch of its experts."""
        if self.size <= experts:
            return 0, 1
        peers = self.sharing(self.owned(experts).start, experts)
        return self.rank - peers[0], len(peers)

    def check_split(self, rows: List[List[int]]) -> None:
        """Refuse to split batches (``rows`` per batch, per expert) into empty parts."""
        for expert in range(len(rows)) if self.size > len(rows) else ():
            parts = len(self.sharing(expert, len(rows)))
            if rows[expert] and min(rows[expert]) < parts:
                raise ProDistillError(
                    f"{parts} processes share expert {expert + 1}'s batches, but one batch "
                    f"holds {min(rows[expert])} prompts: every batch needs at least one "
                    "prompt per process; raise 'batch_size' or 'shots', or start fewer "
                    "processes")

    @property
    def contributes(self) -> bool:
        """Whether this process adds its experts' lambda_i tau_i to the merged weights and
        reports them: all but the second and later processes sharing one expert."""
        return not self.distributed or self.part(self.experts)[0] == 0

    # -- collectives (identities in one process) ------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes, in place."""
        if self.distributed:
            self._call(dist.all_reduce, tensor, group=self.tensors)
        return tensor

    def sum_later(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start summing ``tensor`` over processes, in place; returns the wait for it, so
        that other work runs meanwhile."""
        if not self.distributed:
            return lambda: tensor
        work = self._call(dist.all_reduce, tensor, group=self.tensors, async_op=True)

        def wait() -> torch.Tensor:
            self._call(work.wait)
            return tensor
        return wait

    def sum_floats(self, values: List[float]) -> List[float]:
        """Python floats summed over processes (float64)."""
        if not self.distributed:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def gather(self, own: List[T]) -> List[T]:
        """Every process's list of per-expert items, joined in expert order (from one of
        the processes that share an expert)."""
        if not self.distributed:
            return list(own)
        parts = [None] * self.size
        self._call(dist.all_gather_object, parts, list(own) if self.contributes else [])
        return [item for part in parts for item in part]

    def sum_by_expert(self, own: List[List[float]]) -> List[List[float]]:
        """Per expert, the sum over the processes sharing it of their vectors of sums (for
        example [loss x tokens, tokens] over their rows), in expert order."""
        if not self.distributed:
            return [list(v) for v in own]
        parts = [None] * self.size
        self._call(dist.all_gather_object, parts,
                   list(zip(self.owned(self.experts), map(list, own))))
        sums: Dict[int, List[float]] = {}
        for part in parts:
            for expert, values in part:
                if expert in sums:
                    sums[expert] = [a + b for a, b in zip(sums[expert], values)]
                else:
                    sums[expert] = values
        return [sums[e] for e in sorted(sums)]

    def from_leader(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 only, its result (or its error) on every process."""
        if not self.distributed:
            return make()
        box = [None]
        if self.leader:
            try:
                box[0] = ("ok", make())
            except ProDistillError as exc:
                box[0] = ("error", str(exc))
        self._call(dist.broadcast_object_list, box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise ProDistillError(value)
        return value

    def barrier(self) -> None:
        if self.distributed:
            self._call(dist.barrier)

    def _call(self, collective, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:
            # gloo and NCCL start with "[file:line] " and add a paragraph of advice.
            cause = re.sub(r"^\[[^\]]*\]\s*", "", one_line(exc)).split(". ")[0][:200]
            raise PeerStopped(
                f"process {self.rank} of {self.size}: another process of this merge stopped "
                f"({cause}); its own message, or the launcher's, says why. Run the same "
                "command again to continue from the last finished block"
            ) from None


SINGLE = World()


def start(device: torch.device) -> World:
    """The world this process runs in: :data:`SINGLE` without a launcher, else a joined
    process group ("gloo" on CPU, NCCL for CUDA tensors). On CUDA every process takes the
    GPU of its local rank. Other ranks than 0 log errors only, so the merge's messages
    and progress bars appear once."""
    _catch_stop_signals()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise ProDistillError(
                f"process {rank} of {size}: its local rank is {local} but this node has "
                f"{gpus} GPU{'s' if gpus != 1 else ''}; start at most one process per GPU "
                "on each node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        # A timed-out NCCL collective raises in the process that waits for it (one line),
        # rather than in NCCL's watchdog thread, which would end the process silently.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=TIMEOUT)
            _joined.append(True)  # this run joined it, so this run leaves it
        except (RuntimeError, ValueError) as exc:
            raise ProDistillError(f"process {rank} of {size}: could not join the other "
                                  f"processes: {one_line(exc)[:300]}") from None
    if rank != 0:
        LOG.setLevel(logging.ERROR)
    return World(rank, size, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


_previous_handlers = {}
_joined = []
_signalled = []


def _catch_stop_signals() -> None:
    """Ctrl-C, and the SIGTERM a launcher sends the other processes when one fails (or a
    scheduler before it preempts a job), end the merge as one line that keeps its
    progress, instead of a traceback or a death mid-write."""
    _signalled.clear()
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            _previous_handlers[signum] = signal.signal(signum, _interrupt)


def _interrupt(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` ended this run because it was told to stop. A signal that lands
    inside a C extension can surface as that library's own error instead of
    KeyboardInterrupt (safetensors reading a tensor raises ValueError), so the signal
    itself is what counts."""
    return isinstance(exc, KeyboardInterrupt) or bool(_signalled)


def stop(leave_group: bool = True) -> None:
    """Leave the process group (after the last collective) and restore the signal
    handlers. A failed run, whose process is about to end, does not wait to leave it
    (``leave_group``)."""
    if _joined and dist.is_initialized() and leave_group:
        dist.destroy_process_group()
    _joined.clear()
    for signum, handler in _previous_handlers.items():
        signal.signal(signum, handler)
    _previous_handlers.clear()
