"""Half precision at the task-vector sizes of real fine-tunes, judged by the full model.

A Llama-family base (hidden 256, 4 layers, norms and biases moved off their initial
values) and two experts, each weight moved by a fraction r of its own size:
theta_i = theta_0 + r |theta_0| N(0, 1), r in {1e-2, 3e-3, 1e-3} (small full fine-tunes
move weights by ~1e-3). The checkpoints are stored in float16 and in bfloat16, and each
family is merged by recipes with ``dtype`` float16, bfloat16 and float32, twice: with
``epochs: 0`` (task arithmetic at init 0.5) and trained (``shots`` prompts per expert,
defaults otherwise). Both outputs and the experts are loaded with
``AutoModelForCausalLM`` from their files and run in float64 on held-out prompts.

Per case it prints: the share of the stored task vectors that the recipe's dtype turns to
zero; whether the merge warned that its dtype erases the experts; the mean token
KL(expert || merge) of task arithmetic, and trained / task arithmetic per expert. A case
trains when that ratio is <= 0.9 for every expert.

    PYTHONPATH=. python bench/half_precision.py [--shots 32] [--only float16/bfloat16]
                                                [--rates 0.001] [--activation-dtype float32]
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RATES = (1e-2, 3e-3, 1e-3)
STORED = ("float16", "bfloat16")
RECIPES = ("float16", "bfloat16", "float32")
HELD_OUT = 16  # prompts per expert, never seen by the merge


def build(root: Path, shots: int, holdout: float):
    """The float32 base and the prompts; the experts are written per case."""
    from mergekit_prodistill.tiny import ModelSpec, build_tiny_family

    return build_tiny_family(root / "float32", "llama", 2,
                             model=ModelSpec(num_layers=4, hidden_size=256,
                                             intermediate_size=688, num_heads=4, num_kv_heads=2,
                                             max_shard_size="2MB"),
                             prompts_per_expert=shots + int(shots * holdout) + 2)


def write_case(fam, root: Path, stored: str, rate: float) -> Path:
    """The base and two experts (tau = rate |theta_0| N(0, 1)) stored in ``stored``."""
    from transformers import AutoModelForCausalLM

    folder = root / f"{stored}-r{rate:g}"
    if (folder / "expert_1" / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, name in enumerate(["base", "expert_0", "expert_1"]):
        gen = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for n, p in model.named_parameters():
                moved = rate * base[n].abs() * torch.randn(p.shape, generator=gen) if k else 0
                p.copy_(base[n] + moved)
        dtype = getattr(torch, stored)
        model.to(dtype).save_pretrained(folder / name, max_shard_size="2MB")
        model.to(torch.float32)
        for f in fam.base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, folder / name / f.name)
    return folder


def erased_share(folder: Path, recipe: str) -> float:
    """Over both experts and every tensor: the share of the stored task vector's nonzero
    elements that are zero once the base and the expert are cast to ``recipe``."""
    from safetensors.torch import load_file

    def tensors(model):
        out = {}
        for shard in sorted((folder / model).glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    base = tensors("base")
    erased = moved = 0
    for expert in ("expert_0", "expert_1"):
        for name, t in tensors(expert).items():
            dtype = getattr(torch, recipe)
            stored = t.float() != base[name].float()
            cast = t.to(dtype) != base[name].to(dtype)
            moved += int(stored.sum())
            erased += int((stored & ~cast).sum())
    return erased / max(moved, 1)


def merge(folder: Path, fam, recipe_dtype: str, out: Path, **params) -> list:
    """One merge in this process, as mergekit-yaml runs it; returns its warning lines."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    doc = {"merge_method": "prodistill", "base_model": str(folder / "base"),
           "models": [{"model": str(folder / f"expert_{i}"),
                       "parameters": {"calibration": str(fam.calibration[i])}}
                      for i in range(2)],
           "parameters": params, "dtype": recipe_dtype}
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("mergekit_prodistill")
    logger.addHandler(handler)
    try:
        text = yaml.safe_dump(doc)
        run_merge(MergeConfiguration.model_validate(doc), str(out),
                  options=MergeOptions(quiet=True), config_source=text)
    finally:
        logger.removeHandler(handler)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--only", help="one stored/recipe pair, e.g. float16/bfloat16")
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--work", help="folder for the models (default: a temporary one)")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--activation-dtype", default="auto",
                        help="the trained merges' activation_dtype (default: auto)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    root = Path(args.work or tempfile.mkdtemp(prefix="half-precision-"))
    holdout = 0.125
    fam = build(root, args.shots, holdout)
    prompts = [common.held_out_ids(fam.base, i, HELD_OUT) for i in range(2)]
    rows = []
    print(f"llama, hidden 256, 4 layers, 2 experts, {args.shots} shots; KL(expert || merge) "
          "per token in float64, full model from the written files")
    print(f"{'stored':9} {'r':>6} {'recipe':9} {'tau zeroed':>10} {'warned':>6} "
          f"{'KL task arith.':>22} {'trained / task arith.':>22} {'result':>8} {'s':>5}")
    for stored in STORED:
        for rate in map(float, args.rates.split(",")):
            folder = write_case(fam, root, stored, rate)
            for recipe in RECIPES:
                if args.only and args.only != f"{stored}/{recipe}":
                    continue
                started = time.time()
                zeroed = erased_share(folder, recipe)
                ta, tr = root / "out-ta", root / "out-trained"
                for out in (ta, tr):
                    shutil.rmtree(out, ignore_errors=True)
                warned = merge(folder, fam, recipe, ta, epochs=0, shots=args.shots)
                warned += merge(folder, fam, recipe, tr, shots=args.shots, holdout=holdout,
                                activation_dtype=args.activation_dtype)
                erases = any("erases" in w for w in warned)
                kl_ta = [common.mean_kl(folder / f"expert_{i}", ta, prompts[i]) for i in range(2)]
                kl_tr = [common.mean_kl(folder / f"expert_{i}", tr, prompts[i]) for i in range(2)]
                ratio = [t / max(a, 1e-30) for t, a in zip(kl_tr, kl_ta)]
                trains = all(r <= 0.9 for r in ratio)
                result = "trains" if trains else ("warns" if erases else "FAILS")
                rows.append({"stored": stored, "rate": rate, "recipe": recipe,
                             "tau_zeroed": zeroed, "warned": erases, "kl_task_arithmetic": kl_ta,
                             "kl_trained": kl_tr, "ratio": ratio, "result": result})
                print(f"{stored:9} {rate:>6g} {recipe:9} {100 * zeroed:>9.1f}% "
                      f"{'yes' if erases else 'no':>6} "
                      f"{', '.join(f'{k:.2e}' for k in kl_ta):>22} "
                      f"{', '.join(f'{r:.2f}' for r in ratio):>22} {result:>8} "
                      f"{time.time() - started:>5.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.work:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
