"""Does training behave the same at every model width and task-vector size?

Real merges differ from the tiny test models in two ways that change the size of every
coefficient gradient: the width (hidden 5120 at 13B) and the task vectors (~1e-3 per
element for real fine-tunes, against ~1e-2 and more for the tiny models). This writes,
for each cell of a grid of hidden sizes and task-vector stds, a Llama base and three
experts (base + noise of that std in every tensor), merges them with the package
defaults (prompts only, so that only the optimiser is measured) in a child process, and
prints per cell: the relative block-loss reduction against the task-arithmetic start
(mean over blocks), the share of coefficients whose first gradient is below Adam's eps,
and the spread (std) of the trained coefficients.

    python bench/scale.py [--hidden 256 1024 2048] [--tau 1e-2 1e-3 1e-4] [--layers 2]
                          [--set lr=0.05 ...] [--dir DIR]

Goal: every cell within 15 points of the best one, and none worse than task arithmetic.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARAMS = dict(shots=32, batch_size=16, continue_tokens=0)


def value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cell(root: Path, hidden: int, tau: float, layers: int, params: dict) -> dict:
    config = common.llama_config(layers, hidden, 64 * round(2.7 * hidden / 64), hidden // 64,
                                 vocab=768)
    family = common.write_family(root / "family", config, 3, torch.float32, prompts=64,
                                 tau_std=tau)
    recipe = common.write_recipe(family, root / "recipe.yml", dtype="float32",
                                 **{**PARAMS, **params})
    _, report = common.merge("mergekit-prodistill", recipe, root / "out")
    blocks = report.blocks
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "reduction": mean([1 - b.loss_after / b.loss_before for b in blocks]),
        "worse": sum(b.loss_after > b.loss_before for b in blocks),
        "small": mean([b.small_gradient_share for b in blocks]),
        "spread": mean([mean(b.coefficient_std) for b in blocks]),
        "loss": mean([b.loss_before for b in blocks]),
        "seconds": mean([b.seconds for b in blocks]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--tau", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe parameter to change from the defaults")
    ap.add_argument("--dir", help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    params = {k: value(v) for k, v in (s.split("=", 1) for s in args.set)}
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"defaults{' with ' + str(params) if params else ''}; {args.layers} blocks, 3 "
          f"experts, {PARAMS}", flush=True)
    print(f"{'hidden':>6} {'tau std':>8} {'loss at init':>12} {'reduction':>9} "
          f"{'grad<eps':>8} {'lambda std':>10} {'s/block':>8}", flush=True)
    results = []
    for hidden in args.hidden:
        for tau in args.tau:
            root = scratch / f"h{hidden}-t{tau:g}"
            r = cell(root, hidden, tau, args.layers, params)
            shutil.rmtree(root)
            results.append(r)
            flag = f"  ({r['worse']} blocks worse than task arithmetic)" if r["worse"] else ""
            print(f"{hidden:>6} {tau:>8.0e} {r['loss']:>12.3g} {r['reduction']:>9.1%} "
                  f"{r['small']:>8.1%} {r['spread']:>10.3g} {r['seconds']:>8.1f}{flag}",
                  flush=True)
    best = max(r["reduction"] for r in results)
    worst = min(r["reduction"] for r in results)
    print(f"best cell {best:.1%}, worst {worst:.1%}: spread {100 * (best - worst):.1f} points "
          f"(goal <= 15); cells worse than task arithmetic: "
          f"{sum(r['worse'] > 0 for r in results)}")
    if not args.dir:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
