"""Achieved FLOP rate of the training step against this machine's plain matmul rate.

Builds one Llama-style block (random weights, base + experts) and calibration batches of
real width, and times `distill.distill_block`, the loop's own training, with 1 and with
1 + N epochs: the difference over N is the time of N steps, without the per-block set-up.
A step's FLOPs are counted as the plan counts them (forward + backward = 3 forwards of the
block's matmuls and attention products, one batch per expert). Between runs it times a
plain matmul of the same dtype and a comparable shape, alternating, and prints the ratio
of the medians (goal: >= 0.75 at the 13B block shape). Then, unless --no-profile, it
profiles a block's training with torch.profiler and prints the top operators by self CPU
time, by name and by input shapes. To compare two checkouts side by side, run this script
alternately with PYTHONPATH set to each.

    python bench/flops.py [--hidden 1024] [--dtype bfloat16] [--tokens 256] [--batch 8]
                          [--no-profile]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mergekit_prodistill.inputs.calibration import Batch  # noqa: E402
from mergekit_prodistill.models.blocks import BlockRunner  # noqa: E402
from mergekit_prodistill.models.dtypes import Precision  # noqa: E402
from mergekit_prodistill.models.shapes import model_shape  # noqa: E402
from mergekit_prodistill.plan.memory import batch_flops  # noqa: E402
from mergekit_prodistill.recipe import ProDistillParameters  # noqa: E402
from mergekit_prodistill.training import distill, optimizer  # noqa: E402


def build(args):
    config = common.llama_config(1, args.hidden, args.intermediate, args.heads, vocab=768)
    dtype = getattr(torch, args.dtype)
    runner = BlockRunner(config, torch.device("cpu"))
    layer = runner.layer(0)
    shapes = {n: p.shape for n, p in layer.named_parameters()}
    base = {n: ((1 + 0.1 * common.randn(n, s, 0)) if len(s) == 1 else 0.02 * common.randn(n, s, 0))
            .to(dtype) for n, s in shapes.items()}
    deltas = [{n: (0.002 * common.randn(n, s, i + 1)).to(dtype) for n, s in shapes.items()}
              for i in range(args.experts)]
    batches, student, targets, contexts = [], [], [], []
    for i in range(args.experts):
        mask = torch.ones(args.batch, args.tokens, dtype=torch.long)
        mask[1::2, args.tokens * 3 // 4:] = 0  # some padding, as real prompts have
        batch = Batch(torch.zeros_like(mask), mask)
        x = torch.randn(args.batch, args.tokens, args.hidden, dtype=dtype)
        student.append([x])
        targets.append([x + 0.01 * torch.randn_like(x)])
        contexts.append([runner.context(batch.attention_mask, x.dtype)])
        batches.append(batch)
    shape = model_shape(config, [config] * args.experts)
    step_flops = 3 * args.experts * batch_flops(shape, args.batch, args.tokens)
    return runner, layer, base, deltas, student, targets, contexts, step_flops


def train(runner, layer, base, deltas, student, targets, contexts, epochs):
    params = ProDistillParameters(epochs=epochs, lr=0.01, batch_size=len(student[0][0]))
    experts = [{n: base[n] + d[n] for n in base} for d in deltas]
    streams = distill.Streams(student, targets, contexts, [len(s) for s in student])
    dtype = student[0][0].dtype
    block = distill.Block(runner, 0, layer, Precision(dtype, dtype, dtype))
    distill.distill_block(block, base, experts, streams, params, epochs,
                          torch.Generator().manual_seed(0))


def matmul_rate(args) -> float:
    dtype = getattr(torch, args.dtype)
    a = torch.randn(args.batch * args.tokens, args.hidden, dtype=dtype)
    b = torch.randn(args.hidden, args.intermediate, dtype=dtype)
    a @ b
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 1.0:
        a @ b
        reps += 1
    return 2 * a.shape[0] * args.hidden * args.intermediate * reps / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=2, help="extra epochs (= steps) timed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="the element-wise pass as CUDA runs it: one compiled kernel per "
                    "tensor (compiled in the warm-up)")
    args = ap.parse_args()
    optimizer.COMPILED_ON = ("cpu",) if args.compiled else ()
    torch.manual_seed(0)
    *block, step_flops = build(args)
    train(*block, epochs=2)  # warm-up (its second step compiles the compiled pass)

    def seconds(epochs):
        started = time.perf_counter()
        train(*block, epochs=epochs)
        return time.perf_counter() - started

    step_rates, mm_rates = [], []
    for _ in range(args.rounds):
        step_seconds = (seconds(1 + args.steps) - seconds(1)) / args.steps
        step_rates.append(step_flops / step_seconds)
        mm_rates.append(matmul_rate(args))
    rate, mm = statistics.median(step_rates), statistics.median(mm_rates)
    print(f"block: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} "
          f"experts, batch {args.batch} x {args.tokens} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, "
          f"{'compiled' if args.compiled else 'chunked'} element-wise pass")
    print(f"training step: {step_flops / 1e9:.1f} GFLOP, {step_flops / rate:.2f} s at the "
          f"median rate {rate / 1e9:.1f} GFLOP/s "
          f"(runs: {', '.join(f'{r / 1e9:.1f}' for r in step_rates)})")
    print(f"plain matmul [{args.batch * args.tokens} x {args.hidden}] @ [{args.hidden} x "
          f"{args.intermediate}]: {mm / 1e9:.1f} GFLOP/s "
          f"(runs: {', '.join(f'{r / 1e9:.1f}' for r in mm_rates)})")
    print(f"ratio: {rate / mm:.2f} (goal >= 0.75 at the 13B block shape)")
    if args.no_profile:
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train(*block, epochs=1 + args.steps)
    print(f"\none block, {1 + args.steps} steps (set-up included), top operators by self CPU:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=45))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=30,
        max_shapes_column_width=70))


if __name__ == "__main__":
    main()
