"""The activation streams, allocated where the plan put them: on the device, in (pinned)
CPU memory, or on disk.

Two streams per expert (the merged model's and the expert's own) of shots x tokens x
hidden values are gigabytes for a 13B model. Their dtype, place and folder are decided by
the plan (``plan.py``), which checks that they fit; this module only allocates them: on
the compute device, in CPU memory (pinned when a GPU is used, so copies to it are fast),
or in memory-mapped files. Every stream is a list per expert of one tensor per batch,
updated in place as blocks advance.
"""

import contextlib
import logging
import os
from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_prodistill.formatting import fmt_bytes
from mergekit_prodistill.layout import activation_file

LOG = logging.getLogger("mergekit_prodistill")

Stream = List[List[torch.Tensor]]  # [expert][batch] -> [batch, length, hidden]
PLACEMENTS = ("device", "cpu", "disk")


def on_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A stream's batch on the compute device. From pinned CPU memory the copy is queued
    without waiting for it (the kernels that read it follow on the same CUDA stream): no
    host synchronisation per batch."""
    return batch.to(device, non_blocking=batch.device.type == "cpu" and batch.is_pinned())


class ActivationStore:
    """Allocates the streams for a given set of batch shapes, at ``placement``: "device",
    "cpu" or "disk" (files in ``directory``)."""

    def __init__(self, shapes: Sequence[Sequence[Tuple[int, int]]], hidden: int,
                 dtype: torch.dtype, placement: str, device: torch.device,
                 directory: Optional[str]):
        self.shapes = shapes
        self.hidden = hidden
        self.dtype = dtype
        self.nbytes_per_stream = sum(
            b * n * hidden for batches in shapes for b, n in batches
        ) * dtype.itemsize
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
        if placement == "disk" and not directory:
            raise ValueError("disk-backed streams need a directory (the plan names one)")
        self.placement = placement
        self.compute_device = device  # pinned host memory only speeds copies to a GPU
        self.device = device if self.placement == "device" else torch.device("cpu")
        self.directory = directory
        self.files: List[str] = []  # the disk-backed streams' files
        LOG.info("activation streams of %s each, %s, on %s",
                 fmt_bytes(self.nbytes_per_stream), dtype, self.placement)

    def allocate(self, name: str) -> Stream:
        if self.placement == "disk":
            return self._allocate_on_disk(name)
        pin = self.placement == "cpu" and self.compute_device.type == "cuda"
        return [
            [torch.empty(b, n, self.hidden, dtype=self.dtype, device=self.device, pin_memory=pin)
             for b, n in batches]
            for batches in self.shapes
        ]

    def _allocate_on_disk(self, name: str) -> Stream:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, activation_file(name))
        self.files.append(path)
        numel = self.nbytes_per_stream // self.dtype.itemsize
        with open(path, "wb") as f:  # a sparse file of the right size
            f.truncate(self.nbytes_per_stream)
        flat = torch.from_file(path, shared=True, size=numel, dtype=self.dtype)
        stream, offset = [], 0
        for batches in self.shapes:
            views = []
            for b, n in batches:
                size = b * n * self.hidden
                views.append(flat[offset : offset + size].view(b, n, self.hidden))
                offset += size
            stream.append(views)
        return stream

    def remove_files(self) -> None:
        """Delete the disk-backed streams' files (their memory maps stay valid until freed)."""
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self.files.clear()
