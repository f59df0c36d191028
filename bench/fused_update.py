"""The fused element-wise pass of a training step, alone, on one weight tensor.

Times `optimizer.TrainingStep.update` (chain rule, scale-free Adam and the next merged
weight, one pass per tensor) on Llama-2-13B's largest block tensor (13824 x 5120, bf16
weights, 2 experts with element-wise coefficients), after the first step. To compare two
checkouts, run it alternately with PYTHONPATH set to each.

    PYTHONPATH=. python bench/fused_update.py [--rows 13824] [--cols 5120] [--experts 2]
                                              [--compiled]

With ``--compiled`` it times the pass that CUDA runs, one compiled kernel per tensor
(``optimizer.elementwise_step``), on the CPU, and prints its compile time apart.
"""

import argparse
import statistics
import time

import torch

from mergekit_prodistill.training import optimizer
from mergekit_prodistill.training.optimizer import Optimizer, TrainingStep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=13824)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    optimizer.COMPILED_ON = ("cpu",) if args.compiled else ()
    torch.manual_seed(0)
    shape = (args.rows, args.cols)
    base = {"w": (0.02 * torch.randn(shape)).bfloat16()}
    deltas = [{"w": (1e-3 * torch.randn(shape)).bfloat16()} for _ in range(args.experts)]
    coeffs = [{"w": torch.nn.Parameter(torch.full(shape, 0.5))} for _ in range(args.experts)]
    step = TrainingStep(base, deltas, coeffs, torch.bfloat16,
                        Optimizer([c["w"] for c in coeffs], 0.01))
    grad = (1e-6 * torch.randn(shape)).bfloat16()
    seconds = []
    for _ in range(args.repeats + 1 + args.compiled):
        step.weights["w"].grad = grad.clone()
        started = time.perf_counter()
        step.update()
        seconds.append(time.perf_counter() - started)
    # The first step sets the gradient units; the second compiles the compiled pass.
    timed = seconds[2:] if args.compiled else seconds[1:]
    median = statistics.median(timed)
    kind = f"compiled (compiling: {seconds[1]:.1f} s)" if args.compiled else "chunked"
    print(f"{kind} update of a {args.rows} x {args.cols} tensor, {args.experts} experts, "
          f"{torch.get_num_threads()} threads: median {median:.3f} s "
          f"({', '.join(f'{s:.3f}' for s in timed)})")


if __name__ == "__main__":
    main()
