"""The real-scale check, in one command: Llama-2-13B-shaped merges on a GPU.

Builds, on the machine it runs on, a base and three experts with Llama-2-13B's block
shape (hidden 5120, intermediate 13824, 40 heads, vocabulary 32000; 2 layers by default)
whose task vectors have std 1e-3 (as real fine-tunes do), once stored in float16 with a
float16 config (as Llama-2-13b-hf) and once in bfloat16, with no ``dtype:`` in the recipe.
For each it runs ``mergekit-prodistill plan`` and the merge with the package defaults in
a child process, and prints:

* predicted (plan) against measured peak device memory, and the plan's time against the
  measured time per block;
* the continuation pass's time;
* the dtype training ran in, the share of coefficient gradients below Adam's eps, the
  block-loss reduction against the task-arithmetic start and the coefficients' spread,
  and whether the merge trained (every block's loss fell, the coefficients moved);
* with ``--processes N``, the bfloat16 merge again under ``torchrun`` on N processes (one
  GPU each): its time per block against one process's, and its largest difference from
  one process's weights.

    python bench/gpu_check.py                       # on a GPU machine (< 8 minutes on an H100)
    python bench/gpu_check.py --processes 2         # also on 2 GPUs
    python bench/gpu_check.py --device cpu --small  # the same script on a CPU, smaller shape

Exit code 1 when a merge did not train.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, heads, vocabulary)
    "13b": (5120, 13824, 40, 32000),
    "small": (512, 1408, 8, 768),
}
PARAMS = dict(shots=16, batch_size=16)


def plan_figures(recipe: Path, device: str) -> dict:
    """The plan's peak on the compute device and its time for the matching class."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.recipe import parse_recipe
    from mergekit_prodistill.devices import DEVICE_CLASSES
    from mergekit_prodistill.plan import make_plan

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    plan = make_plan(parse_recipe(config), MergeOptions(device=device))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    kind = "h200" if "H200" in name else "h100" if "H100" in name else \
        "a100" if "A100" in name else "cpu"
    cls = next(c for c in DEVICE_CLASSES if c.name.startswith(kind))
    return {"peak": plan.total(plan.device), "seconds": plan.seconds(cls), "class": cls.name,
            "text": plan.render()}


def run_one(root: Path, dtype: torch.dtype, shape, layers: int, device: str) -> dict:
    hidden, intermediate, heads, vocab = shape
    config = common.llama_config(layers, hidden, intermediate, heads, vocab=vocab)
    config.dtype = str(dtype).replace("torch.", "")  # what the checkpoint's config says
    started = time.perf_counter()
    family = common.write_family(root / "family", config, 3, dtype, prompts=32, tau_std=1e-3)
    written = time.perf_counter() - started
    recipe = root / "recipe.yml"
    text = common.write_recipe(family, recipe, **PARAMS).read_text()
    recipe.write_text("\n".join(line for line in text.splitlines()
                                if not line.startswith("dtype:")) + "\n")
    planned = plan_figures(recipe, device)
    flags = ["--cuda"] if device == "cuda" else []
    _, report = common.merge("mergekit-prodistill", recipe, root / "out", *flags)
    blocks = report.blocks
    peak = report.peak_device_bytes
    return {
        "written": written, "planned": planned, "report": report,
        "measured_peak": report.peak_rss_bytes if peak is None else peak,
        "trained": all(b.loss_after < b.loss_before for b in blocks)
        and all(s > 0 for b in blocks for s in b.coefficient_std),
    }


def several_processes(root: Path, processes: int, device: str, one) -> str:
    """The merge in ``root`` again on ``processes`` processes: one line of figures."""
    from safetensors.torch import load_file

    flags = ["--cuda"] if device == "cuda" else []
    common.run_command("torchrun", "--standalone", "--nproc-per-node", processes, "-m",
                       "mergekit_prodistill", root / "recipe.yml", root / "parallel",
                       "--quiet", *flags)
    report = common.Report.read(str(root / "parallel"))
    a, b = ({k: v for f in sorted((root / out).glob("*.safetensors")) for k, v in
             load_file(f).items()} for out in ("out", "parallel"))
    worst = max(float((a[n].double() - b[n].double()).abs().max()
                      / a[n].double().abs().max().clamp_min(1e-30)) for n in a)

    def per_block(rep):
        return sum(x.seconds for x in rep.blocks) / len(rep.blocks)

    return (f"  {processes} processes: per block {per_block(report):.1f} s against "
            f"{per_block(one):.1f} s on one (ratio {per_block(report) / per_block(one):.2f}); "
            f"merge {report.seconds:.0f} s against {one.seconds:.0f} s; largest relative "
            f"difference from one process's weights {worst:.2g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="hidden 512 instead of 13B's 5120")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--processes", type=int, default=1,
                    help="also merge the bfloat16 models on this many processes (torchrun)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --device cpu --small to try the script")
    if args.device == "cuda" and args.processes > torch.cuda.device_count():
        sys.exit(f"--processes {args.processes} needs as many GPUs; "
                 f"{torch.cuda.device_count()} here")
    shape = SHAPES["small" if args.small else "13b"]
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="gpu-check-"))
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{where}: {args.layers} blocks of hidden {shape[0]}, 3 experts with task vectors "
          f"of std 1e-3, defaults with {PARAMS}", flush=True)
    results, ok = {}, True
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        r = run_one(scratch / name, dtype, shape, args.layers, args.device)
        results[name] = r
        rep, plan = r["report"], r["planned"]
        blocks = rep.blocks
        per_block = sum(b.seconds for b in blocks) / len(blocks)
        reduction = [1 - b.loss_after / b.loss_before for b in blocks]
        print(f"\n== {name} checkpoint (models written in {r['written']:.0f} s)", flush=True)
        print(f"  peak memory on {args.device}: planned {common.gb(plan['peak'])}, measured "
              f"{common.gb(r['measured_peak'])} (ratio {r['measured_peak'] / plan['peak']:.2f})")
        continued = rep.continuation_seconds
        print(f"  time: merge {rep.seconds:.0f} s; per block {per_block:.1f} s; plan for "
              f"{plan['class']}: {plan['seconds']:.0f} s in all")
        print(f"  continuation pass: {float('nan') if continued is None else continued:.1f} s")
        print(f"  training dtype {rep.activation_dtype}; gradients below eps "
              + ", ".join(f"{b.small_gradient_share:.1%}" for b in blocks)
              + "; block-loss reduction " + ", ".join(f"{x:.1%}" for x in reduction)
              + "; coefficient std " + ", ".join(
                  f"{sum(b.coefficient_std) / len(b.coefficient_std):.3g}" for b in blocks))
        print(f"  trained: {'yes' if r['trained'] else 'NO'}", flush=True)
        if args.processes > 1 and dtype == torch.bfloat16:
            print(several_processes(scratch / name, args.processes, args.device, rep),
                  flush=True)
        ok &= r["trained"]
        shutil.rmtree(scratch / name)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {**v, "report": v["report"].to_dict(),
                 "planned": {x: y for x, y in v["planned"].items() if x != "text"}}
             for k, v in results.items()}, indent=1, default=str))
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\nfloat16 and bfloat16 both train" if ok else "\nA MERGE DID NOT TRAIN")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
