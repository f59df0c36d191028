"""What the machine offers: the device classes the time estimate uses, the memory free on
a device now, and the disk space free for a folder.

:func:`available_memory` is the one reader of free memory: the plan, its check before a
merge, and the continuation pass all see the same figure.
"""

import os
import shutil
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class DeviceClass:
    """Achievable (not peak) rates of a device class, for the time estimate."""

    name: str
    kind: str  # the torch device type
    tflops: Dict[str, float]  # dense matmul TFLOP/s reached in practice, per dtype
    memory_gbps: float  # element-wise memory bandwidth, GB/s
    memory_gb: float  # device memory, GB
    disk_gbps: float  # checkpoint read/write rate, GB/s
    basis: str
    link_gbps: float = 20.0  # CPU memory to device (PCIe), GB/s


def gpu(name: str, bf16: float, fp32: float, memory_gbps: float, memory_gb: float,
        link_gbps: float, basis: str) -> DeviceClass:
    return DeviceClass(name, "cuda", {"float32": fp32, "bfloat16": bf16, "float16": bf16},
                       memory_gbps, memory_gb, 2.0, basis, link_gbps)


DEVICE_CLASSES = (
    DeviceClass(
        "cpu-2core", "cpu", {"float32": 0.18, "bfloat16": 0.77, "float16": 0.10}, 5, 24, 1.0,
        "2-core x86: idle 2048^3 matmul rates; Adam's element-wise rate (2.6 GB/s measured "
        "under load, 5 assumed idle)",
    ),
    gpu("a100-80gb", 140, 14, 1500, 80, 20,
        "45% of peak bf16 (312), fp32 without TF32 at 70% of 19.5, 75% of 2.0 TB/s"),
    gpu("h100-80gb", 445, 47, 2500, 80, 40,
        "SXM: 45% of peak bf16 (989), fp32 without TF32 at 70% of 67, 75% of 3.35 TB/s"),
    gpu("h200-141gb", 445, 47, 3600, 141, 40, "as the H100 with 75% of 4.8 TB/s"),
)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # A container's memory limit (cgroup v2) can be tighter than the machine's.
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def free_memory(device: torch.device, sharing: int = 1) -> Dict[str, Optional[int]]:
    """Bytes free on the compute device and in CPU memory, keyed by device name; CPU
    memory is split among the ``sharing`` processes of one machine."""
    cpu = available_memory(torch.device("cpu"))
    return {str(device): available_memory(device), "cpu": cpu // sharing if cpu else cpu}


def free_disk(folder: str) -> Tuple[str, int]:
    """The bytes free for files in ``folder``, which need not exist yet: its nearest
    existing parent's file system, returned with that parent."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing, shutil.disk_usage(existing).free
