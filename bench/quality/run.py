"""Merge quality, measured: ProDistill against mergekit's own methods on conflicting experts.

    python bench/quality/run.py [--cache DIR] [--results DIR] [--threads N] [--jobs N]
                                [--only NAME ...]

Builds (or reuses) a small Llama base and three experts fully fine-tuned from it on tasks
that pull the weights apart, runs every merge of ``merges.plan()`` through the real
``mergekit-yaml``, scores each merged model by greedy exact match on held-out test sets,
and writes a markdown table, JSON and plots to ``bench/quality/results/``. Offline and
deterministic; CPU only.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import diagnose  # noqa: E402
import evaluate  # noqa: E402
import merges  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

# The merges whose errors are traced position by position.
DIAGNOSED = ("prodistill-paper", "prodistill")


def prodistill_report(path: Path):
    """Per-block losses and coefficient statistics a ProDistill merge wrote, if any."""
    file = path / "prodistill_report.json"
    if not file.exists():
        return None
    data = json.loads(file.read_text())
    keep = ("block", "loss_before", "loss_after", "coefficient_mean", "coefficient_std",
            "coefficient_range", "seconds")
    return {
        "blocks": [{k: b[k] for k in keep if k in b} for b in data["blocks"]],
        "head": {k: v for k, v in data.get("head", {}).items() if k != "epoch_losses"} or None,
        "calibration_tokens": [c["tokens"] for c in data["calibration"]],
        "seconds": data["seconds"],
    }


def row(merge: merges.Merge, out: Path, tokenizer, tests) -> dict:
    """One merge's recipe, scores and (for ProDistill) training report."""
    return {
        "name": merge.name,
        "group": merge.group,
        "method": merge.method,
        "parameters": merge.parameters,
        "weight": merge.weight,
        "density": merge.density,
        "note": merge.note,
        "scores": evaluate.score_model(out, tokenizer, tests),
        "merge_seconds": merge.seconds,
        "prodistill": prodistill_report(out),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=HERE / ".cache",
                    help="where checkpoints and merged models are kept")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and in each mergekit-yaml (1 suits a busy CPU)")
    ap.add_argument("--jobs", type=int, default=2, help="mergekit-yaml runs at a time")
    ap.add_argument("--only", nargs="*", help="run only these merges (by name)")
    args = ap.parse_args(argv)

    started = time.time()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = models.BuildSettings()
    ckpt = models.build(args.cache, settings)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.base)
    tests = models.test_sets(settings)

    print("scoring the base model and the experts")
    own = {name: evaluate.score_model(path, tokenizer, tests)
           for name, path in [("base", ckpt.base), *ckpt.experts.items()]}
    plan = [m for m in merges.plan() if not args.only or m.name in args.only]
    rows = [None] * len(plan)
    # mergekit-yaml runs in subprocesses, --jobs at a time; scoring happens here meanwhile.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(merges.run_merge, m, ckpt, args.cache / "merges", args.threads): i
                   for i, m in enumerate(plan)}
        for done in as_completed(running):
            i = running[done]
            rows[i] = row(plan[i], done.result(), tokenizer, tests)

    results = report.assemble(settings, ckpt, own, rows, args.threads)

    print("tracing errors by position")
    experts = {t: transformers.AutoModelForCausalLM.from_pretrained(p).eval()
               for t, p in ckpt.experts.items()}
    best_mergekit = report.best(results["merges"], "mergekit")
    for name in ([best_mergekit["name"]] if best_mergekit else []) + list(DIAGNOSED):
        if (args.cache / "merges" / name).exists():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.cache / "merges" / name).eval()
            results["diagnostics"][name] = diagnose.position_errors(
                model, experts, tokenizer, tests)
    print("scaling single task vectors")
    results["task_vector_scaling"] = diagnose.task_vector_scaling(
        ckpt.base, ckpt.experts, tokenizer, tests,
        lambda model, tok, pairs: evaluate.score(model, tok, pairs, 10)["exact"])
    results["run_seconds"] = time.time() - started
    report.write(results, args.results)
    print(report.main_table(results))
    print(f"\nwrote {args.results} in {results['run_seconds']:.0f} s "
          f"(checkpoints built in {results['build_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
