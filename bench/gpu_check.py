"""The real-scale check, in one command: Llama-2-13B-shaped merges on a GPU.

Builds, on the machine it runs on, a base and three experts with Llama-2-13B's block
shape (hidden 5120, intermediate 13824, 40 heads, vocabulary 32000; 2 layers by default)
whose task vectors move each weight by 1e-3 of its size (tau = 1e-3 |theta| N(0, 1), as
small full fine-tunes do), and merges them in three cases:

* float16 checkpoints (as Llama-2-13b-hf), no ``dtype:`` in the recipe: written as float16;
* the same float16 checkpoints with ``dtype: bfloat16`` (the combination that erases most
  of these task vectors): the merge must warn, and must not come out worse than task
  arithmetic;
* bfloat16 checkpoints, no ``dtype:``.

For each it runs ``mergekit-prodistill plan``, the merge with the package defaults and the
same recipe with ``epochs: 0`` (task arithmetic), each in a child process, and prints:

* predicted (plan) against measured peak device memory, allocated and reserved, and the
  plan's time per block against the measured one;
* the continuation pass's time;
* the dtype training ran in, the block-loss reduction against the task-arithmetic start,
  the coefficients' spread, whether the dtype warning fired;
* the mean token KL(expert || merge) on held-out prompts, every model loaded from its
  files with ``AutoModelForCausalLM`` on the device (float32), trained against task
  arithmetic per expert: the case trains when every ratio is <= 0.9, and is accepted when
  it trains, or when it warned and is no worse than task arithmetic;
* with ``--processes N``, the bfloat16 merge again under ``torchrun`` on N processes (one
  GPU each): its time per block against one process's, and its largest difference from
  one process's weights.

    python bench/gpu_check.py                       # on a GPU machine (< 8 minutes on an H100)
    python bench/gpu_check.py --processes 2         # also on 2 GPUs
    python bench/gpu_check.py --device cpu --small  # the same script on a CPU, smaller shape

Exit code 1 when a case is not accepted.
"""

import argparse
import json
import logging
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
# 200 steps of 16 prompts, as the check was sized when it was written (the defaults would
# give 480 steps here).
PARAMS = dict(shots=16, batch_size=16, epochs=200)


def plan_figures(recipe: Path, device: str) -> dict:
    """The plan's peak on the compute device and its time for the matching class."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.models import erasure
    from mergekit_prodistill.plan.devices import DEVICE_CLASSES
    from mergekit_prodistill.plan.planner import make_plan
    from mergekit_prodistill.recipe import parse_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    recipe_ = parse_recipe(config)
    plan = make_plan(recipe_, MergeOptions(device=device))
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("mergekit_prodistill").addHandler(handler)
    try:
        erasure.warn_if_erased(recipe_, plan.dtypes["output"])
    finally:
        logging.getLogger("mergekit_prodistill").removeHandler(handler)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    kind = "h200" if "H200" in name else "h100" if "H100" in name else \
        "a100" if "A100" in name else "cpu"
    cls = next(c for c in DEVICE_CLASSES if c.name.startswith(kind))
    return {"peak": plan.total(plan.device), "seconds": plan.seconds(cls), "class": cls.name,
            "per_block": plan.seconds(cls) / plan.shape.num_layers, "text": plan.render(),
            "warnings": "\n".join(warnings)}


CASES = (  # name, stored dtype, the recipe's dtype
    ("float16", torch.float16, None),
    ("float16 as bfloat16", torch.float16, "bfloat16"),
    ("bfloat16", torch.bfloat16, None),
)


def run_one(root: Path, stored: torch.dtype, recipe_dtype, shape, layers: int,
            device: str) -> dict:
    hidden, intermediate, heads, vocab = shape
    config = common.llama_config(layers, hidden, intermediate, heads, vocab=vocab)
    config.dtype = str(stored).replace("torch.", "")  # what the checkpoint's config says
    started = time.perf_counter()
    family = common.write_family(root / "family", config, 3, stored, prompts=32,
                                 tau_relative=1e-3, reuse=True)
    written = time.perf_counter() - started
    flags = ["--cuda"] if device == "cuda" else []
    outputs, warned = {}, False
    for name, extra in (("trained", {}), ("task_arithmetic", {"epochs": 0})):
        recipe = root / f"recipe-{name}.yml"
        text = common.write_recipe(family, recipe, **PARAMS, **extra).read_text()
        recipe.write_text("\n".join(line for line in text.splitlines()
                                    if not line.startswith("dtype:"))
                          + (f"\ndtype: {recipe_dtype}" if recipe_dtype else "") + "\n")
        if name == "trained":
            planned = plan_figures(recipe, device)
            warned = "erases" in planned["warnings"]
        shutil.rmtree(root / name, ignore_errors=True)
        outputs[name] = common.merge("mergekit-prodistill", recipe, root / name, *flags)[1]
    report = outputs["trained"]
    kl = {name: [common.mean_kl(e, root / name, prompts, torch.float32, device)
                 for e, prompts in zip(family.experts, held_out(family))]
          for name in outputs}
    ratios = [t / max(a, 1e-30) for t, a in zip(kl["trained"], kl["task_arithmetic"])]
    trains = all(r <= 0.9 for r in ratios)
    blocks = report.blocks
    return {
        "written": written, "planned": planned, "report": report, "warned": warned,
        "kl": kl, "ratios": ratios, "trains": trains,
        "accepted": trains or (warned and all(r <= 1.0 for r in ratios)),
        "measured_peak": report.peak_rss_bytes if report.peak_device_bytes is None
        else report.peak_device_bytes,
        "reserved_peak": report.peak_device_reserved_bytes,
        "coefficients_moved": all(s > 0 for b in blocks for s in b.coefficient_std),
    }


def held_out(family, prompts: int = 8):
    return [common.held_out_ids(family.base, i, prompts) for i in range(len(family.experts))]


def several_processes(root: Path, processes: int, device: str, one) -> str:
    """The merge in ``root`` again on ``processes`` processes: one line of figures."""
    from safetensors.torch import load_file

    flags = ["--cuda"] if device == "cuda" else []
    common.run_command("torchrun", "--standalone", "--nproc-per-node", processes, "-m",
                       "mergekit_prodistill", root / "recipe-trained.yml", root / "parallel",
                       "--quiet", *flags)
    report = common.Report.read(str(root / "parallel"))
    a, b = ({k: v for f in sorted((root / out).glob("*.safetensors")) for k, v in
             load_file(f).items()} for out in ("trained", "parallel"))
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
          f"of 1e-3 of each weight, defaults with {PARAMS}", flush=True)
    results, ok = {}, True
    for name, stored, recipe_dtype in CASES:
        folder = scratch / str(stored).replace("torch.", "")
        r = run_one(folder, stored, recipe_dtype, shape, args.layers, args.device)
        results[name] = r
        rep, plan = r["report"], r["planned"]
        blocks = rep.blocks
        per_block = sum(b.seconds for b in blocks) / len(blocks)
        reduction = [1 - b.loss_after / b.loss_before for b in blocks]
        print(f"\n== {name} (models written in {r['written']:.0f} s)", flush=True)
        reserved = r["reserved_peak"]
        measured = "allocated" if reserved else "process RSS, runtime included"
        print(f"  peak memory on {args.device}: planned {common.gb(plan['peak'])}, measured "
              f"{common.gb(r['measured_peak'])} {measured} (ratio "
              f"{r['measured_peak'] / plan['peak']:.2f})"
              + (f", {common.gb(reserved)} reserved (ratio {reserved / plan['peak']:.2f})"
                 if reserved else ""))
        continued = rep.continuation_seconds
        print(f"  time: merge {rep.seconds:.0f} s; per block {per_block:.1f} s against the "
              f"plan's {plan['per_block']:.1f} s for {plan['class']} (ratio "
              f"{per_block / plan['per_block']:.2f})")
        print(f"  continuation pass: {float('nan') if continued is None else continued:.1f} s")
        print(f"  training dtype {rep.activation_dtype}; block-loss reduction "
              + ", ".join(f"{x:.1%}" for x in reduction) + "; coefficient std " + ", ".join(
                  f"{sum(b.coefficient_std) / len(b.coefficient_std):.3g}" for b in blocks)
              + f"; dtype warning: {'yes' if r['warned'] else 'no'}")
        print("  KL(expert || merge), task arithmetic: "
              + ", ".join(f"{k:.3g}" for k in r["kl"]["task_arithmetic"])
              + "; trained / task arithmetic: " + ", ".join(f"{x:.2f}" for x in r["ratios"]))
        verdict = "trains" if r["trains"] else "warns, no worse" if r["accepted"] else "FAILS"
        print(f"  result: {verdict}", flush=True)
        if args.processes > 1 and stored == torch.bfloat16:
            print(several_processes(folder, args.processes, args.device, rep), flush=True)
        ok &= r["accepted"]
        if recipe_dtype is not None or stored == torch.bfloat16:
            shutil.rmtree(folder)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {**v, "report": v["report"].to_dict(),
                 "planned": {x: y for x, y in v["planned"].items() if x != "text"}}
             for k, v in results.items()}, indent=1, default=str))
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\nevery case trains, or warns and is no worse than task arithmetic" if ok
          else "\nA CASE FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
