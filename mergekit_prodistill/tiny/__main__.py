"""Command line: ``python -m mergekit_prodistill.tiny OUT_DIR --arch llama --experts 3``
builds a tiny family in OUT_DIR and writes OUT_DIR/recipe.yml, a ProDistill recipe that
merges it in seconds. (The built-in example merges models with real skills instead:
``mergekit_prodistill.tiny.skills``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import TinyFamily, build_tiny_family
from .configs import ARCHITECTURES

EXAMPLE_PARAMETERS = dict(epochs=5, lr=0.05, shots=16, batch_size=8, max_length=64, init=0.5)


def main(argv: list[str] | None = None) -> TinyFamily:
    ap = argparse.ArgumentParser(
        prog="python -m mergekit_prodistill.tiny",
        description="Build a tiny offline base + experts model family and a ProDistill recipe.",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=32, help="calibration prompts per expert")
    args = ap.parse_args(argv)

    fam = build_tiny_family(
        args.out_dir, arch=args.arch, n_experts=args.experts, seed=args.seed, prompts_per_expert=args.prompts
    )
    recipe_path = fam.root / "recipe.yml"
    recipe_path.write_text(fam.recipe("prodistill", **EXAMPLE_PARAMETERS), encoding="utf-8")
    print(f"base:   {fam.base}")
    for e, c in zip(fam.experts, fam.calibration):
        print(f"expert: {e}  calibration: {c}")
    print(f"recipe: {recipe_path}")
    return fam


if __name__ == "__main__":
    main()
