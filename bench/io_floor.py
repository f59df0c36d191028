"""The I/O floor: with `epochs: 0` ProDistill is streaming task arithmetic, so its wall
time should stay within 1.15x of mergekit's own `task_arithmetic` on the same models.

Both recipes run through `mergekit-yaml` (the same entry point, the same start-up cost),
alternating, after one untimed run of each so the checkpoints are in the page cache.
Prints every run, the medians and their ratio (goal: <= 1.15).

    python bench/io_floor.py [--layers 8] [--hidden 2048] [--rounds 3] [--dir DIR]
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
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-io-"))
    config = common.llama_config(args.layers, args.hidden, args.intermediate, 16, vocab=768)
    family = common.write_family(root / "family", config, args.experts, torch.bfloat16)
    recipes = {
        "task_arithmetic": common.write_recipe(family, root / "ta.yml", "task_arithmetic",
                                               weight=0.5),
        "prodistill epochs=0": common.write_recipe(family, root / "pd.yml", epochs=0,
                                                   init=0.5, shots=8, batch_size=8,
                                                   max_length=64),
    }
    times = {name: [] for name in recipes}
    for round_ in range(args.rounds + 1):
        for i, (name, recipe) in enumerate(recipes.items()):
            # One folder per recipe: a folder holding another recipe's merge is refused.
            wall, _ = common.merge("mergekit-yaml", recipe, root / f"out-{i}")
            if round_:  # the first round only warms the page cache
                times[name].append(wall)
                print(f"{name:<20} {wall:6.1f} s", flush=True)
    size = (args.experts + 1) * args.layers * 2 * (4 * args.hidden ** 2
                                                   + 3 * args.hidden * args.intermediate)
    print(f"{args.experts + 1} models of {args.layers} layers, hidden {args.hidden}, bfloat16 "
          f"({size / 1e9:.1f} GB read per merge)")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"median {name:<20} {m:6.1f} s")
    ratio = medians["prodistill epochs=0"] / medians["task_arithmetic"]
    print(f"ratio prodistill / task_arithmetic: {ratio:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
