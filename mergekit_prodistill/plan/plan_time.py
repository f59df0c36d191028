"""The plan's time estimate on a device class: every term the merge spends time on.

* the block loop's FLOPs (training steps and the forwards around them) at the class's
  achievable matmul rate in the compute dtype;
* the training steps' element-wise traffic at its memory bandwidth;
* reading the checkpoints and writing the output, at its disk rate;
* the progress saved after every block: this process's activation streams (written and
  synced) and, on the writing process, the block's unit file, read back once more when
  the shards are assembled;
* the tensor sums between processes, at the class's link between GPUs (or between
  machines, at :data:`NODE_GBPS`, when the merge spans several), not overlapped;
* the continuations (and the prompts written before them): their FLOPs, their weights
  read at every decoding step from where they are, loading each model, and a fixed cost
  per decoding step and layer (kernel launches and Python, :attr:`DeviceClass.decode_layer_s`).
"""

from mergekit_prodistill.formatting import GB
from mergekit_prodistill.plan.devices import DeviceClass

# Between machines: 400 Gb/s InfiniBand or RoCE at 80%.
NODE_GBPS = 40.0


def seconds(plan, cls: DeviceClass) -> float:
    rate = cls.tflops.get(plan.dtypes["compute"], cls.tflops["float32"]) * 1e12
    return (
        (plan.flops["training"] + plan.flops["forwards"]) / rate
        + plan.moved_bytes / (cls.memory_gbps * GB)
        + (plan.io_bytes + plan.save_bytes) / (cls.disk_gbps * GB)
        + communication_seconds(plan, cls)
        + continuation_seconds(plan, cls)
    )


def communication_seconds(plan, cls: DeviceClass) -> float:
    """The tensor sums of every training step, over the slowest link they cross."""
    if not plan.comm_bytes_per_step:
        return 0.0
    w = plan.world
    gbps = cls.comm_gbps if w.size <= w.local_size else min(cls.comm_gbps, NODE_GBPS)
    return plan.shape.num_layers * plan.comm_bytes_per_block / (gbps * GB)


def continuation_seconds(plan, cls: DeviceClass) -> float:
    """Generating every expert's continuations (and writing prompts): loading each model,
    the FLOPs, its weights read at every forward pass from where they are, and each
    decoding step's fixed cost."""
    reads = plan.continuation_reads
    if not reads:
        return 0.0
    rate = cls.tflops.get(plan.dtypes["generation"], cls.tflops["float32"]) * 1e12
    steps = plan.flops["generation_steps"]
    return (
        plan.flops["continuation"] / rate
        + reads["device"] / (cls.memory_gbps * GB)
        + reads["host"] / (cls.link_gbps * GB)
        + (reads["load"] + reads["disk"]) / (cls.disk_gbps * GB)
        + steps * plan.shape.num_layers * cls.decode_layer_s
    )
