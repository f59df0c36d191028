"""How close is `mergekit-prodistill plan` to what a merge really uses?

For each model size, a child process imports everything, runs a tiny warm-up merge (so
lazily imported libraries are already in memory), resets its peak RSS
(/proc/self/clear_refs), runs the merge, and reports its peak RSS above the RSS it had
just before, beside the plan's predicted peak. It also prints the merge's time beside
the plan's estimate, once for the cpu-2core class and once with the matmul rate and
element-wise rate (an Adam step) measured in the same process just before (the machine
may be shared). The tiny size is below what RSS can resolve after the warm-up merge.

With ``--phases`` it prints, per phase, the plan's bytes beside the peak RSS measured in
that phase: the peak is reset at every phase boundary (reading a block, training it,
writing it, training the head; "embed" is everything before the first block, "assemble"
everything after the head: the output shards built from the saved units). The ``13b``
size is a Llama-2-13B-shaped pair of blocks (bf16, 2 experts, vocabulary 32000, trained
head, task vectors of std 1e-3): about 6 GB of disk, written once into ``--dir`` and
reused, and 15 GB of memory.

    python bench/plan_accuracy.py [--sizes tiny,small,mid] [--json]
    python bench/plan_accuracy.py --sizes 13b --phases --dir /tmp/plan-13b
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    # name: (layers, hidden, intermediate, heads, experts, dtype, vocabulary)
    "tiny": (2, 64, 128, 4, 2, "float32", 768),
    "small": (2, 512, 1408, 8, 2, "float32", 768),
    "mid": (4, 1024, 2816, 16, 3, "float32", 768),
    "13b": (2, 5120, 13824, 40, 2, "bfloat16", 32000),
}
PARAMS = dict(epochs=2, lr=0.01, shots=16, batch_size=8, max_length=64)
# Two steps per block (the second builds its merged block beside the first's gradients),
# and the head trained; no continuation, whose generation is not a phase measured here.
SIZE_PARAMS = {"13b": dict(epochs=1, lr=0.01, shots=4, batch_size=2, max_length=32,
                           head_epochs=1, continue_tokens=0)}
# Task vectors of real fine-tunes' size: the coefficients' gradients are then as small.
TAU_STD = {"13b": 1e-3}


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class PhasePeaks:
    """Peak RSS above ``baseline`` in each phase of a merge, the peak reset at each start."""

    def __init__(self, baseline: int):
        self.baseline = baseline
        self.phase = None
        self.peaks = {}

    def enter(self, phase):
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0),
                                         status("VmHWM") - self.baseline)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        self.phase = phase

    def watch(self):
        """Mark the phase boundaries by wrapping the functions that start them."""
        from mergekit_prodistill.training import distill, head, weights

        load_all = weights.ModelTensors.load_all
        fit, train_head = distill.fit, head.train_head

        def loading(*args, **kwargs):
            if self.phase not in ("load", "head"):  # the head reads its tensors too
                self.enter("load")
            return load_all(*args, **kwargs)

        def around(function, phase, after):
            def wrapped(*args, **kwargs):
                self.enter(phase)
                try:
                    return function(*args, **kwargs)
                finally:
                    self.enter(after)
            return wrapped

        weights.ModelTensors.load_all = loading
        distill.fit = around(fit, "train", "write")  # the blocks' training, as distill calls it
        head.train_head = around(train_head, "head", "assemble")


def child(warmup: str, recipe: str, out: str) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.plan.devices import DEVICE_CLASSES
    from mergekit_prodistill.plan.planner import make_plan
    from mergekit_prodistill.recipe import parse_recipe
    from mergekit_prodistill.run import run_prodistill

    options = MergeOptions(quiet=True)

    def run(path, target):
        config = MergeConfiguration.model_validate(yaml.safe_load(Path(path).read_text()))
        run_prodistill(config, target, options)
        return config

    run(warmup, out + "-warmup")
    here = measured_class(config_dtype=yaml.safe_load(Path(recipe).read_text())["dtype"])
    phases = PhasePeaks(status("VmRSS"))
    phases.watch()
    phases.enter("embed")
    started = time.perf_counter()
    config = run(recipe, out)
    seconds = time.perf_counter() - started
    phases.enter(None)
    plan = make_plan(parse_recipe(config), options)
    cpu = next(c for c in DEVICE_CLASSES if c.name == "cpu-2core")
    return {"measured": max(phases.peaks.values()), "predicted": plan.total("cpu"),
            "phase": plan.peak("cpu")[0], "baseline": phases.baseline, "seconds": seconds,
            "predicted_seconds": plan.seconds(cpu), "predicted_seconds_now": plan.seconds(here),
            "phases": {name: {"measured": peak,
                              "predicted": sum(plan.phases["cpu"].get(name, {}).values())}
                       for name, peak in phases.peaks.items()}}


def measured_class(config_dtype: str):
    """This machine's matmul and element-wise rates right now (other load included)."""
    import torch

    from mergekit_prodistill.plan.devices import DeviceClass

    dtype = getattr(torch, config_dtype)
    a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 2816, dtype=dtype)
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 1:
        a @ b
        reps += 1
    tflops = 2 * 512 * 1024 * 2816 * reps / (time.perf_counter() - started) / 1e12
    # Element-wise rate as the step achieves it: an Adam step, counted as the plan counts
    # it (76 bytes per coefficient).
    lam = [torch.nn.Parameter(torch.full((2816, 1024), 0.5)) for _ in range(4)]
    for t in lam:
        t.grad = torch.randn_like(t)
    adam = torch.optim.Adam(lam)
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 1:
        adam.step()
        reps += 1
    gbps = 76 * 4 * lam[0].numel() * reps / (time.perf_counter() - started) / 1e9
    return DeviceClass("now", "cpu", {config_dtype: tflops, "float32": tflops}, gbps, 0, gbps,
                       "measured")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small,mid")
    ap.add_argument("--json", action="store_true", help="print one JSON object per size")
    ap.add_argument("--phases", action="store_true",
                    help="print predicted and measured peaks of every phase")
    ap.add_argument("--dir", help="where to write the models (reused when already there)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import subprocess

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="plan-accuracy-"))
    from mergekit_prodistill.tiny import build_tiny_family

    # Head training in the warm-up too, so that its imports are not counted.
    warmup = common.write_recipe(build_tiny_family(tmp / "warmup"), tmp / "warmup.yml",
                                 dtype="float32", **PARAMS, head_epochs=1)
    if not (args.json or args.phases):
        print(f"{'size':<6} {'block':>8} {'predicted':>10} {'measured':>10} {'error':>7}"
              f" {'time':>7} {'cpu-2core':>10} {'rates now':>10}")
    for size in args.sizes.split(","):
        layers, hidden, inter, heads, experts, dtype, vocab = SIZES[size]
        config = common.llama_config(layers, hidden, inter, heads, vocab=vocab)
        family = common.write_family(tmp / size, config, experts,
                                     dtype=getattr(__import__("torch"), dtype),
                                     tau_std=TAU_STD.get(size), reuse=True)
        recipe = common.write_recipe(family, tmp / f"{size}.yml", dtype=dtype,
                                     **SIZE_PARAMS.get(size, PARAMS))
        out = tmp / f"{size}-out"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(warmup), str(recipe), str(out)],
            capture_output=True, text=True, env=common.child_env(),
        )
        if proc.returncode:
            raise SystemExit(f"size {size} failed:\n{proc.stderr[-3000:]}")
        for done in (out, Path(str(out) + "-warmup")):
            shutil.rmtree(done, ignore_errors=True)
        row = {"size": size, **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["error"] = row["predicted"] / row["measured"] - 1
        block = 4 * hidden * hidden + 3 * hidden * inter
        if args.json:
            print(json.dumps(row))
        elif args.phases:
            print(f"{size}: {block / 1e6:.1f}M-parameter blocks, {experts} experts, {dtype}, "
                  f"vocabulary {vocab}")
            print(f"  {'phase':<8} {'predicted':>10} {'measured':>10} {'ratio':>6}")
            for name, cells in row["phases"].items():
                ratio = cells["predicted"] / cells["measured"] if cells["measured"] > 0 else 0
                print(f"  {name:<8} {common.gb(cells['predicted']):>10} "
                      f"{common.gb(cells['measured']):>10} {ratio:>6.2f}")
        else:
            print(f"{size:<6} {block / 1e6:>7.1f}M {common.gb(row['predicted']):>10} "
                  f"{common.gb(row['measured']):>10} {row['error']:>+7.0%} "
                  f"{row['seconds']:>6.1f}s {row['predicted_seconds']:>9.1f}s "
                  f"{row['predicted_seconds_now']:>9.1f}s")


if __name__ == "__main__":
    main()
