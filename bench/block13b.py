"""A real 13B block on this machine: Llama-2-13B shapes, 2 decoder layers.

Writes a base and two experts (hidden 5120, intermediate 13824, 40 heads, vocabulary
32000; random bfloat16 weights) as sharded safetensors, one tensor at a time, then merges
them with a few short prompts and 1 epoch in a child process, as a user would. Prints the
plan, the peak RSS, the time per block and the total time. The models take about 6 GB of
disk; the merge about 14.5 GB of memory (see the plan it prints first).

    python bench/block13b.py [--dir DIR] [--keep]
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARAMS = dict(epochs=1, lr=0.01, shots=4, batch_size=4, max_length=32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the models and the output")
    ap.add_argument("--out-shard-size", default="1B")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-13b-"))
    config = common.llama_config(2, 5120, 13824, 40, vocab=32000)
    family = common.write_family(root / "family", config, 2, torch.bfloat16, prompts=8)
    recipe = common.write_recipe(family, root / "recipe.yml", **PARAMS)
    plan = common.run_command("mergekit-prodistill", "plan", recipe,
                              "--out-shard-size", args.out_shard_size)
    print(plan, flush=True)
    wall, report = common.merge("mergekit-prodistill", recipe, root / "out",
                                "--out-shard-size", args.out_shard_size)
    print(f"\npeak RSS {common.gb(report.peak_rss_bytes)}; total {wall:.0f} s "
          f"(merge {report.seconds:.0f} s); per block: "
          + ", ".join(f"{b.seconds:.0f} s" for b in report.blocks)
          + "; loss " + ", ".join(f"{b.loss_before:.3g} -> {b.loss_after:.3g}"
                                  for b in report.blocks))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
