"""What the fidelity report costs: the same merge with and without held-out prompts.

Merges one family twice per round, alternating ``holdout: 0`` and the default (1/8 of the
shots, continued and advanced through the merged, task-arithmetic and expert blocks, then
scored through the head), each in its own child process as a user runs it. Prints each
merge's wall time and peak RSS, and the ratios of the medians (goal: a small share, a few
percent, of the run).

    python bench/fidelity_cost.py [--hidden 512] [--layers 4] [--rounds 2]
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shots", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-fidelity-"))
    config = common.llama_config(args.layers, args.hidden, args.intermediate, args.heads,
                                 vocab=768)
    family = common.write_family(root / "family", config, 2, torch.bfloat16,
                                 prompts=2 * args.shots)
    params = dict(shots=args.shots, max_length=64, continue_tokens=16, epochs=20)
    recipes = {name: common.write_recipe(family, root / f"{name}.yml", holdout=holdout,
                                         **params)
               for name, holdout in (("without", 0), ("with", 0.125))}
    runs = {name: [] for name in recipes}
    for r in range(args.rounds):
        for name, recipe in recipes.items():
            wall, report = common.merge("mergekit-prodistill", recipe, root / f"{name}-{r}")
            runs[name].append((wall, report.peak_rss_bytes))
            kept = "; ".join(f"{100 * f.prodistill['agreement']:.1f}% / "
                             f"{100 * f.task_arithmetic['agreement']:.1f}%"
                             for f in report.fidelity or [])
            print(f"round {r + 1}, {name} held-out prompts: {wall:.1f} s, peak RSS "
                  f"{common.gb(report.peak_rss_bytes)}"
                  + (f", kept (ProDistill / task arithmetic): {kept}" if kept else ""),
                  flush=True)
    wall = {n: statistics.median(w for w, _ in v) for n, v in runs.items()}
    rss = {n: statistics.median(m for _, m in v) for n, v in runs.items()}
    print(f"hidden {args.hidden}, {args.layers} blocks, 2 experts, {args.shots} shots, "
          f"{params}")
    print(f"time with / without: {wall['with'] / wall['without']:.3f}; "
          f"peak RSS with / without: {rss['with'] / rss['without']:.3f}")


if __name__ == "__main__":
    main()
