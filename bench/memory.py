"""Peak memory must not grow with depth: merge 4- and 16-layer models of equal width.

Both families are written block by block (one shard per block), and each merge runs in
its own child process with an output shard about one block in size, as the plan assumes.
Prints each merge's peak RSS (its ProDistill report: getrusage of the child, Python
runtime included), the plan's prediction, and the ratio (goal: <= 1.10).

    python bench/memory.py [--hidden 2048] [--intermediate 5632] [--dir DIR]
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARAMS = dict(epochs=1, lr=0.01, shots=8, batch_size=8, max_length=64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-memory-"))
    block_bytes = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.intermediate)
    shard = str(block_bytes + 4 * args.hidden)  # one block per output shard
    rows = []
    for layers in map(int, args.layers.split(",")):
        config = common.llama_config(layers, args.hidden, args.intermediate, args.heads,
                                     vocab=768)
        family = common.write_family(root / f"l{layers}", config, args.experts, torch.bfloat16)
        recipe = common.write_recipe(family, root / f"l{layers}.yml", **PARAMS)
        wall, report = common.merge("mergekit-prodistill", recipe, root / f"l{layers}-out",
                                    "--out-shard-size", shard)
        predicted = common.planned_peak(recipe, out_shard_size=int(shard))
        rows.append((layers, report.peak_rss_bytes, predicted, wall))
        shutil.rmtree(root / f"l{layers}")
        print(f"{layers:>2} layers: peak RSS {common.gb(report.peak_rss_bytes)} "
              f"(plan: {common.gb(predicted)} + Python runtime), {wall:.0f} s",
              flush=True)
    print(f"block {block_bytes / 2 / 1e6:.1f}M parameters (bfloat16), {args.experts} experts,"
          f" output shard {int(shard) / 1e6:.0f} MB")
    print(f"ratio of peak RSS, {rows[-1][0]} / {rows[0][0]} layers: "
          f"{rows[-1][1] / rows[0][1]:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
