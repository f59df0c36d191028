"""Merge quality, measured: ProDistill against mergekit's own methods on conflicting experts.

    python bench/quality/run.py [--suite novel|competent|hard] [--cache DIR] [--results DIR]
                                [--threads N] [--jobs N] [--only [NAME ...]]
                                [--set KEY=VALUE ...] [--build KEY=VALUE ...]

Builds (or reuses) a small Llama base and one expert per task fully fine-tuned from it on
tasks that pull the weights apart, runs every merge of ``merges.plan(suite)`` through the
real ``mergekit-yaml``, scores each merged model by greedy exact match on held-out test
sets, and writes a markdown table, JSON and plots. Offline and deterministic; CPU only.

Suite ``novel`` (the default; three experts, results in ``results/``): the base knows none
of the tasks. Suite ``competent`` (four experts, one of them adding numbers; results in
``results/competent/``): the base is already fair at every task and the experts are small
steps from it, as with real fine-tuned LLMs.

``--set lr=0.03 --set epochs=30`` adds one ProDistill row with those parameters (defaults
otherwise); with ``--only`` and no names it is the only merge run. ``--build seed=1``
builds the suite's models with that setting changed (another draw of the data and the
initial weights). A run that leaves out rows (``--only``, ``--set``) or changes the build
writes its results under the cache, not over the committed ones, unless ``--results``
says where.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def torch_free_kernels():
    """mergekit_prodistill.tiny.skills.kernels, loaded by path: importing it through its
    package would import torch (the package's __init__ files do) before KERNELS is set."""
    package = importlib.util.find_spec("mergekit_prodistill").submodule_search_locations[0]
    path = Path(package) / "tiny" / "skills" / "kernels.py"
    spec = importlib.util.spec_from_file_location("_prodistill_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The kernels the skill families are built with (family.PINNED), set before torch starts,
# here and so in every mergekit-yaml: the merges and the scores, like the checkpoints, come
# out the same on any x86-64 CPU. (The threads are --threads.)
KERNELS = torch_free_kernels().KERNELS
os.environ.update(KERNELS)

import diagnose  # noqa: E402
import merges  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from mergekit_prodistill.output.report import Report  # noqa: E402
from mergekit_prodistill.tiny.skills import scoring  # noqa: E402

RESULTS = {"novel": HERE / "results", "competent": HERE / "results" / "competent",
           "hard": HERE / "results" / "hard"}
# The merges whose errors are traced position by position.
DIAGNOSED = ("prodistill-paper", "prodistill")


def prodistill_report(path: Path):
    """Per-block losses and coefficient statistics a ProDistill merge wrote, if any."""
    try:
        data = Report.read(str(path))
    except FileNotFoundError:
        return None
    keep = ("block", "loss_before", "loss_after", "coefficient_mean", "coefficient_std",
            "coefficient_range", "seconds")
    head = data.head.to_dict() if data.head else {}
    tokens = sum(c.tokens for c in data.calibration)
    return {
        "blocks": [{k: getattr(b, k) for k in keep} for b in data.blocks],
        # Every block's epochs times the calibration tokens: the training's FLOPs, up to a
        # constant factor.
        "token_passes": sum(len(b.epoch_losses) for b in data.blocks) * tokens,
        "head": {k: v for k, v in head.items() if k != "epoch_losses"} or None,
        "calibration_tokens": [c.tokens for c in data.calibration],
        "seconds": data.seconds,
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
        "scores": scoring.score_model(out, tokenizer, tests),
        "merge_seconds": merge.seconds,
        "prodistill": prodistill_report(out),
    }


def override(text: str):
    """One ``KEY=VALUE`` of ``--set``, the value read as YAML reads it (0.03, 30, tensor)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=sorted(models.SETTINGS), default="novel")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache",
                    help="where checkpoints and merged models are kept")
    ap.add_argument("--results", type=Path,
                    help="where results are written (default: the suite's folder in results/)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and in each mergekit-yaml (1 suits a busy CPU)")
    ap.add_argument("--jobs", type=int, default=2, help="mergekit-yaml runs at a time")
    ap.add_argument("--only", nargs="*", help="run only these merges (by name)")
    ap.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE",
                    help="add a ProDistill row with this parameter (repeat for several)")
    ap.add_argument("--build", type=override, action="append", default=[], metavar="KEY=VALUE",
                    help="build the suite's models with this setting changed (seed=1, "
                    "read_prompts=0.1; repeat for several)")
    args = ap.parse_args(argv)
    partial = args.only is not None or bool(args.set) or bool(args.build)
    results_dir = args.results or (args.cache / "results" / args.suite if partial
                                   else RESULTS[args.suite])

    started = time.time()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = dataclasses.replace(models.SETTINGS[args.suite], **dict(args.build))
    ckpt = models.build(args.cache, settings)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.base)
    tests = models.held_out_sets(settings)

    print("scoring the base model and the experts")
    own = {name: scoring.score_model(path, tokenizer, tests)
           for name, path in [("base", ckpt.base), *ckpt.experts.items()]}
    broken = models.broken_claims(args.suite, {n: {t: s["exact"] for t, s in scores.items()}
                                               for n, scores in own.items()})
    for line in broken:
        print(f"WARNING: the {args.suite} suite's models are not what it says: {line}")
    plan = [m for m in merges.plan(args.suite) if args.only is None or m.name in args.only]
    if args.set:
        plan.append(merges.overridden(dict(args.set)))
    rows = [None] * len(plan)
    # mergekit-yaml runs in subprocesses, --jobs at a time; scoring happens here meanwhile.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(merges.run_merge, m, ckpt, ckpt.root / "merges", args.threads): i
                   for i, m in enumerate(plan)}
        for done in as_completed(running):
            i = running[done]
            rows[i] = row(plan[i], done.result(), tokenizer, tests)

    results = report.assemble(settings, ckpt, own, rows, args.threads)
    results["broken_claims"] = broken

    print("tracing errors by position")
    experts = {t: transformers.AutoModelForCausalLM.from_pretrained(p).eval()
               for t, p in ckpt.experts.items()}
    best_mergekit = report.best(results["merges"], "mergekit")
    for name in ([best_mergekit["name"]] if best_mergekit else []) + list(DIAGNOSED):
        if any(r["name"] == name for r in results["merges"]):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt.root / "merges" / name).eval()
            results["diagnostics"][name] = diagnose.position_errors(
                model, experts, tokenizer, tests)
    results["task_vector_sizes"] = diagnose.task_vector_sizes(ckpt.base, ckpt.experts)
    print("scaling single task vectors")
    results["task_vector_scaling"] = diagnose.task_vector_scaling(
        ckpt.base, ckpt.experts, tokenizer, tests,
        lambda model, tok, pairs: scoring.score(model, tok, pairs, 10)["exact"])
    results["run_seconds"] = time.time() - started
    report.write(results, results_dir)
    print(report.main_table(results))
    print(f"\nwrote {results_dir} in {results['run_seconds']:.0f} s "
          f"(checkpoints built in {results['build_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
