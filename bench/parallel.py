"""Memory and time per process of one merge run by 1 and by 2 processes (torchrun, gloo).

Writes (once, kept under --dir) a Llama-shaped base and 2 experts wide enough that the
coefficients' state (lambda and Adam's two moments, fp32, one per weight element and
expert) outweighs the rest, then runs the same recipe in one process and under
``torchrun --standalone --nproc-per-node 2``, every process with OMP_NUM_THREADS=1. Each
process (``worker``) runs a tiny warm-up merge (lazily imported libraries then count as
runtime), then the merge in-process through ``run.run_prodistill``, and records its peak
RSS (VmHWM, which getrusage reports; Python runtime included), its growth above the RSS
before the merge in each phase (the peak reset at every phase, as
``plan_accuracy.py --phases`` does), the largest lambda state it held (lambda and the
moments of every ``Optimizer`` it built), its wall time, the plan for its own place
among the processes, and (2 processes) the time of a step's two all-reduces alone.
Prints them side by side, the ratios 2-process / 1-process (goal: lambda state per
process <= 0.55x), and whether both outputs are the same bits.

    python bench/parallel.py [--hidden 2048] [--layers 2] [--dtype bfloat16] [--dir DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from plan_accuracy import PhasePeaks, status  # noqa: E402

PARAMS = dict(epochs=10, lr=0.01, shots=8, batch_size=4, max_length=64, continue_tokens=0)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def worker(warmup: str, recipe: str, out: str, results: str) -> None:
    """One process of the merge: a warm-up merge (so that lazily imported libraries are
    in memory), then the merge, its peak RSS reset at each phase; what it measured goes
    to ``results``."""
    import torch.distributed as dist
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill import parallel
    from mergekit_prodistill.plan import memory, planner
    from mergekit_prodistill.recipe import parse_recipe
    from mergekit_prodistill.run import run_prodistill
    from mergekit_prodistill.training import optimizer

    held = {"lambda_state": 0}
    init = optimizer.Optimizer.__init__

    def recording(self, params, lr):
        init(self, params, lr)
        tensors = [*params, *(m for pair in self.moments for m in pair)]
        held["lambda_state"] = max(held["lambda_state"],
                                   sum(t.numel() * t.element_size() for t in tensors))

    optimizer.Optimizer.__init__ = recording
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    options = MergeOptions(quiet=True)
    configs = [MergeConfiguration.model_validate(yaml.safe_load(Path(r).read_text()))
               for r in (warmup, recipe)]
    if size > 1:  # one process group for both merges (a merge leaves one it did not join)
        dist.init_process_group("gloo")
    run_prodistill(configs[0], out + "-warmup", options)
    held["lambda_state"] = 0
    planned = planner.make_plan(parse_recipe(configs[1]), options,
                             world=parallel.World(rank, size, local_size=size))
    exchange = allreduce_seconds(planned) if size > 1 else 0.0
    phases = PhasePeaks(status("VmRSS"))
    phases.watch()
    phases.enter("embed")
    started = time.perf_counter()
    run_prodistill(configs[1], out, options)
    wall = time.perf_counter() - started
    phases.enter(None)
    if size > 1:
        dist.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "size": size, "wall": wall, "rss_before": phases.baseline,
        # The peak getrusage reports (VmHWM) is reset at every phase: the largest phase's.
        "peak_rss": phases.baseline + max(phases.peaks.values()),
        "growth": max(phases.peaks.values()), "phase": max(phases.peaks, key=phases.peaks.get),
        "lambda_state": held["lambda_state"], "experts": list(planned.owned),
        "planned_total": planned.total("cpu"), "planned_phase": planned.peak("cpu")[0],
        "planned_lambda": planned.phases["cpu"]["train"][memory.LAMBDA],
        "phases": {name: [peak, sum(planned.phases["cpu"].get(name, {}).values())]
                   for name, peak in phases.peaks.items()},
        "comm_per_step": planned.comm_bytes_per_step, "comm_seconds": exchange,
        "steps": planned.flops["steps"] * planned.flops["epochs"] * planned.shape.num_layers,
        "comm_all": planned.comm_bytes_per_block * planned.shape.num_layers}))


def allreduce_seconds(planned, rounds: int = 3) -> float:
    """Seconds of a training step's two all-reduces alone (dL/dW in the compute dtype and
    the fp32 partial sum of one block)."""
    import torch.distributed as dist

    numel = planned.shape.block_numel
    tensors = [torch.ones(numel, dtype=getattr(torch, planned.dtypes["compute"])),
               torch.ones(numel, dtype=torch.float32)]
    for t in tensors:
        dist.all_reduce(t)
    started = time.perf_counter()
    for _ in range(rounds):
        for t in tensors:
            dist.all_reduce(t)
    return (time.perf_counter() - started) / rounds


def launch(command, results: Path):
    results.mkdir(parents=True, exist_ok=True)
    env = dict(common.child_env(), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{command[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]


def same_bits(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048, help="intermediate: 2.75 x, heads of 64")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default="/tmp/mergekit-prodistill-bench-parallel",
                    help="where the models are kept between runs (and the outputs written)")
    args = ap.parse_args()
    root, intermediate = Path(args.dir), args.hidden * 11 // 4
    shape = f"h{args.hidden}-l{args.layers}-{args.dtype}"
    config = common.llama_config(args.layers, args.hidden, intermediate, args.hidden // 64,
                                 vocab=768)
    family = common.write_family(root / shape, config, 2, getattr(torch, args.dtype),
                                 reuse=True)
    recipe = common.write_recipe(family, root / f"{shape}.yml", dtype=args.dtype, **PARAMS)
    from mergekit_prodistill.tiny import build_tiny_family

    warmup = common.write_recipe(build_tiny_family(root / "warmup"), root / "warmup.yml",
                                 dtype=args.dtype, **PARAMS)
    runs = {}
    for n in (1, 2):
        out, results = root / f"out-{n}", root / f"results-{n}"
        for folder in (out, Path(f"{out}-warmup"), results):
            shutil.rmtree(folder, ignore_errors=True)
        script = [__file__, "worker", warmup, recipe, out, results]
        command = [sys.executable, *script] if n == 1 else \
            [common.BIN / "torchrun", "--standalone", "--nproc-per-node", n, *script]
        runs[n] = launch(command, results)
    report(args, intermediate, runs)
    print("outputs the same bits:", "yes" if same_bits(root / "out-1", root / "out-2") else "NO")


def report(args, intermediate: int, runs) -> None:
    block = 4 * args.hidden ** 2 + 3 * args.hidden * intermediate + 2 * args.hidden
    print(f"{args.layers} blocks of {block / 1e6:.1f}M parameters ({args.dtype}), 2 experts, "
          f"{PARAMS['shots']} shots, batch_size {PARAMS['batch_size']}, max_length "
          f"{PARAMS['max_length']}, {PARAMS['epochs']} epochs; OMP_NUM_THREADS=1 per process")
    print("processes rank experts   peak RSS  RSS before   growth (phase)      plan (phase)  "
          "lambda state  plan lambda    wall  sent/step       sent")
    for n, rows in runs.items():
        for r in rows:
            print(f"{n:>9} {r['rank']:>4} {','.join(map(str, r['experts'])):>7} "
                  f"{mb(r['peak_rss']):>10} {mb(r['rss_before']):>11} "
                  f"{mb(r['growth']):>10} {r['phase']:<6} {mb(r['planned_total']):>10} "
                  f"{r['planned_phase']:<6} {mb(r['lambda_state']):>12} "
                  f"{mb(r['planned_lambda']):>12} {r['wall']:>6.1f}s "
                  f"{mb(r['comm_per_step']):>10} {mb(r['comm_all']):>10}")
    print("growth above the RSS before the merge, by phase: measured / plan")
    for n, rows in runs.items():
        for r in rows:
            print(f"  {n} process{'es' * (n > 1)}, rank {r['rank']}: " + ", ".join(
                f"{name} {mb(got)} / {mb(want)}" for name, (got, want) in r["phases"].items()))
    one, two = runs[1][0], runs[2]
    r = two[0]
    print(f"a step's two all-reduces alone: {r['comm_seconds']:.3f} s "
          f"({r['comm_seconds'] * r['steps']:.1f} s over the merge's {r['steps']} steps)")
    for key, label, goal in (("lambda_state", "lambda state", " (goal <= 0.55)"),
                             ("peak_rss", "peak RSS", ""), ("growth", "growth", ""),
                             ("wall", "wall time", "")):
        ratios = ", ".join(f"rank {r['rank']} {r[key] / one[key]:.3f}" for r in two)
        print(f"{label}, 2 processes / 1 process: {ratios}{goal}")

if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:6])
    else:
        main()
