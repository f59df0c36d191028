"""What the machine offers: the device classes the time estimate uses, the memory free on
a device now, and the disk space free for a folder.

:func:`available_memory` is the one reader of free memory: the plan, its check before a
merge, and the continuation pass all see the same figure.
"""

import datetime
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
    comm_gbps: float = 1.5  # all-reduce bus bandwidth between a machine's processes, GB/s
    decode_layer_s: float = 3e-4  # a decoding step's fixed cost per layer (launches, Python)


def gpu(name: str, bf16: float, memory_gbps: float, memory_gb: float, link_gbps: float,
        comm_gbps: float, basis: str) -> DeviceClass:
    # float32 blocks run TF32 matmuls (dtypes.fast_float32_matmuls): half the dense bf16
    # peak on A100 and H100. A decoding step of an eager transformers model launches ~15
    # kernels per layer, ~0.1 ms with Python's share.
    return DeviceClass(name, "cuda", {"float32": bf16 / 2, "bfloat16": bf16, "float16": bf16},
                       memory_gbps, memory_gb, 2.0, basis, link_gbps, comm_gbps, 1e-4)


DEVICE_CLASSES = (
    DeviceClass(
        "cpu-2core", "cpu", {"float32": 0.18, "bfloat16": 0.77, "float16": 0.10}, 5, 24, 1.0,
        "2-core x86: idle 2048^3 matmul rates; Adam's element-wise rate (2.6 GB/s measured "
        "under load, 5 assumed idle); gloo all-reduces on loopback (1.7 GB/s measured)",
    ),
    gpu("a100-80gb", 140, 1500, 80, 20, 170,
        "45% of peak bf16 (312) and of TF32 (156) for fp32, 75% of 2.0 TB/s, NVLink "
        "all-reduce at 170 GB/s"),
    gpu("h100-80gb", 445, 2500, 80, 40, 340,
        "SXM: 45% of peak bf16 (989) and of TF32 (494) for fp32, 75% of 3.35 TB/s, NVLink "
        "all-reduce at 340 GB/s"),
    gpu("h200-141gb", 445, 3600, 141, 40, 340, "as the H100 with 75% of 4.8 TB/s"),
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


# A process gives up on its peers when a tensor sum has waited this many times the plan's
# time per block on the slowest listed device of its kind (a block's set-up and writes
# come between two steps' sums), and never sooner than MIN_WAIT.
WAIT_FACTOR = 20
MIN_WAIT = datetime.timedelta(minutes=15)


def collective_timeout(plan) -> float:
    """Seconds a tensor sum of ``plan``'s merge waits for the other processes."""
    kind = torch.device(plan.device).type
    slowest = [c for c in DEVICE_CLASSES if c.kind == kind] or list(DEVICE_CLASSES)
    per_block = max(plan.seconds(c) for c in slowest) / max(plan.shape.num_layers, 1)
    return max(MIN_WAIT.total_seconds(), WAIT_FACTOR * per_block)
