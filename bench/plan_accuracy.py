"""How close is `mergekit-prodistill plan` to what a merge really uses?

For each model size, a child process imports everything, runs a tiny warm-up merge (so
lazily imported libraries are already in memory), resets its peak RSS
(/proc/self/clear_refs), runs the merge, and reports its peak RSS above the RSS it had
just before, beside the plan's predicted peak. It also prints the merge's time beside
the plan's estimate, once for the cpu-2core class and once with the matmul rate and
element-wise rate (an Adam step) measured in the same process just before (the machine
may be shared). The tiny size is below what RSS can resolve after the warm-up merge.

    python bench/plan_accuracy.py [--sizes tiny,small,mid] [--json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {
    # name: (layers, hidden, intermediate, heads, experts, dtype)
    "tiny": (2, 64, 128, 4, 2, "float32"),
    "small": (2, 512, 1408, 8, 2, "float32"),
    "mid": (4, 1024, 2816, 16, 3, "float32"),
}
PARAMS = dict(epochs=2, lr=0.01, shots=16, batch_size=8, max_length=64)


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def child(warmup: str, recipe: str, out: str) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.config import parse_recipe
    from mergekit_prodistill.distill import run_prodistill
    from mergekit_prodistill.plan import DEVICE_CLASSES, make_plan

    options = MergeOptions(quiet=True)

    def run(path, target):
        config = MergeConfiguration.model_validate(yaml.safe_load(Path(path).read_text()))
        run_prodistill(config, target, options)
        return config

    run(warmup, out + "-warmup")
    here = measured_class(config_dtype=yaml.safe_load(Path(recipe).read_text())["dtype"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    baseline = status("VmRSS")
    started = time.perf_counter()
    config = run(recipe, out)
    seconds = time.perf_counter() - started
    measured = status("VmHWM") - baseline
    plan = make_plan(parse_recipe(config), options)
    cpu = next(c for c in DEVICE_CLASSES if c.name == "cpu-2core")
    return {"measured": measured, "predicted": plan.total("cpu"), "phase": plan.peak("cpu")[0],
            "baseline": baseline, "seconds": seconds, "predicted_seconds": plan.seconds(cpu),
            "predicted_seconds_now": plan.seconds(here)}


def measured_class(config_dtype: str):
    """This machine's matmul and element-wise rates right now (other load included)."""
    import torch

    from mergekit_prodistill.plan import DeviceClass

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
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    from mergekit_prodistill.tiny import build_tiny_family

    warmup = common.write_recipe(build_tiny_family(tmp / "warmup"), tmp / "warmup.yml",
                                 dtype="float32", **PARAMS)
    if not args.json:
        print(f"{'size':<6} {'block':>8} {'predicted':>10} {'measured':>10} {'error':>7}"
              f" {'time':>7} {'cpu-2core':>10} {'rates now':>10}")
    for size in args.sizes.split(","):
        layers, hidden, inter, heads, experts, dtype = SIZES[size]
        config = common.llama_config(layers, hidden, inter, heads, vocab=768)
        family = common.write_family(tmp / size, config, experts,
                                     dtype=getattr(__import__("torch"), dtype))
        recipe = common.write_recipe(family, tmp / f"{size}.yml", dtype=dtype, **PARAMS)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(warmup), str(recipe), str(tmp / f"{size}-out")],
            capture_output=True, text=True, check=True, env=common.child_env(),
        )
        row = {"size": size, **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["error"] = row["predicted"] / row["measured"] - 1
        block = 4 * hidden * hidden + 3 * hidden * inter
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{size:<6} {block / 1e6:>7.1f}M {common.gb(row['predicted']):>10} "
                  f"{common.gb(row['measured']):>10} {row['error']:>+7.0%} "
                  f"{row['seconds']:>6.1f}s {row['predicted_seconds']:>9.1f}s "
                  f"{row['predicted_seconds_now']:>9.1f}s")


if __name__ == "__main__":
    main()
