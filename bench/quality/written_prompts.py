"""Calibration prompts written by a model: does distilling on them keep more of the skill?

    python bench/quality/written_prompts.py [--suite hard|novel] [--cache DIR] [--results DIR]

On the hard suite ProDistill is limited by its prompts (results/hard/REPORT.md): 64 real
prompts keep more than 16, 128 more than 64. A language model can write more prompts like
a set of calibration prompts: start from the tokens they all begin with (the template and
the task's name) and sample until the tokens they all end with
(``mergekit_prodistill.inputs.prompt_writing``, which ``written_prompts`` runs). This
builds a suite (``hard`` unless told) with a base that has also read its tasks' prompts,
unanswered (``read_prompts``: like a pretrained LM that has read questions it cannot
answer; the experts are fine-tuned on answers only, as in the suite), has the base or each
expert write prompts, and merges with the package defaults on the real prompts alone and
with the written ones beside them; then lets the package write them itself
(``written_prompts``).
Writes results.json and results.md to bench/quality/results/written/SUITE/.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  # isort: skip  (pins the kernels before torch starts)
import merges  # noqa: E402
import models  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mergekit_prodistill.inputs.prompt_writing import sample_prompts  # noqa: E402
from mergekit_prodistill.output.report import Report  # noqa: E402
from mergekit_prodistill.tiny.skills import scoring  # noqa: E402

READ_PROMPTS = 0.1
# (name, real prompts, who writes more, how many, recipe parameters). holdout 0: each
# merge trains on exactly the prompts of its file.
ROWS = [
    ("16 real", 16, None, 0, {"shots": 16}),
    ("16 real + 48 written by the base", 16, "base", 48, {"shots": 64}),
    ("16 real + 48 written by each expert", 16, "expert", 48, {"shots": 64}),
    ("64 real", 64, None, 0, {"shots": 64}),
    ("64 real + 192 written by the base, 8 epochs", 64, "base", 192,
     {"shots": 256, "epochs": 8}),
    ("64 real + 192 written by the base", 64, "base", 192, {"shots": 256}),
    # The package writes them itself (written_prompts): the expert or the base, whichever
    # predicts the real prompts better, and only prompts like them.
    ("16 real, `written_prompts: 48`", 16, None, 0, {"shots": 16, "written_prompts": 48}),
    ("64 real, `written_prompts: 192`, 8 epochs", 64, None, 0,
     {"shots": 64, "written_prompts": 192, "epochs": 8}),
    # Where the written prompts stop helping at the defaults' 480 steps, and what twice the
    # steps buy.
    ("16 real, `written_prompts: 112`", 16, None, 0, {"shots": 16, "written_prompts": 112}),
    ("16 real, `written_prompts: 112`, 30 epochs", 16, None, 0,
     {"shots": 16, "written_prompts": 112, "epochs": 30}),
    ("64 real, `written_prompts: 192`, 15 epochs", 64, None, 0,
     {"shots": 64, "written_prompts": 192, "epochs": 15}),
]


def calibration_files(ckpt, tokenizer, real_count: int, writer, count: int, folder: Path):
    """One prompt file per task: its first ``real_count`` calibration prompts, then
    ``count`` written by the base or by the task's expert."""
    folder.mkdir(parents=True, exist_ok=True)
    files, samples = {}, {}
    for i, (task, path) in enumerate(ckpt.calibration.items()):
        real = [json.loads(line)["text"] for line in path.read_text().splitlines()][:real_count]
        written = []
        if writer:
            source = ckpt.base if writer == "base" else ckpt.experts[task]
            model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
            ids = [tokenizer(t).input_ids for t in real]
            written = [tokenizer.decode(s, skip_special_tokens=True) for s in sample_prompts(
                model, ids, count, i, "cpu", tokenizer.pad_token_id, [tokenizer.eos_token_id])]
        files[task] = folder / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps({"text": t}) + "\n" for t in real + written))
        samples[task] = written[:5]
    return files, samples


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--suite", choices=sorted(models.SETTINGS), default="hard")
    ap.add_argument("--results", type=Path, help="default: results/written/SUITE/")
    args = ap.parse_args(argv)
    settings = dataclasses.replace(models.SETTINGS[args.suite], read_prompts=READ_PROMPTS)
    results_dir = args.results or HERE / "results" / "written" / args.suite
    started = time.time()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    ckpt = models.build(args.cache, settings)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.base)
    tests = models.held_out_sets(settings)
    own = {name: {t: s["exact"] for t, s in scoring.score_model(path, tokenizer, tests).items()}
           for name, path in [("base", ckpt.base), *ckpt.experts.items()]}
    for line in models.broken_claims(args.suite, own):
        print(f"WARNING: the models are not what the {args.suite} suite says: {line}")
    rows = []
    for n, (name, real_count, writer, count, params) in enumerate(ROWS):
        files, samples = calibration_files(ckpt, tokenizer, real_count, writer, count,
                                           ckpt.root / "written" / str(n))
        merge = merges.overridden({**params, "holdout": 0})
        merge.name = f"written-{n}"
        out = merges.run_merge(merge, dataclasses.replace(
            ckpt, calibration=files), ckpt.root / "merges", 1, log=lambda *a: None)
        scores = {t: s["exact"] for t, s in scoring.score_model(out, tokenizer, tests).items()}
        kept = {t: scores[t] / own[t][t] for t in scores}
        rows.append({"name": name, "parameters": params, "scores": scores, "kept": kept,
                     "normalised_mean": sum(kept.values()) / len(kept), "written": samples,
                     "prodistill": run.prodistill_report(out),
                     "package_written": [c.written or 0
                                         for c in Report.read(str(out)).calibration]})
        print(f"{name}: {rows[-1]['normalised_mean']:.3f}", flush=True)
    reference = next(r for r in rows if r["name"] == "64 real")["prodistill"]["token_passes"]
    for r in rows:
        r["training_compute"] = r["prodistill"]["token_passes"] / reference
    results = {"settings": dataclasses.asdict(settings), "own": own, "rows": rows,
               "run_seconds": time.time() - started}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (results_dir / "results.md").write_text(table)
    print(table)


def markdown(results) -> str:
    tasks = list(results["rows"][0]["scores"])
    lines = ["# Calibration prompts written by a model", "",
             f"Generated by `python bench/quality/written_prompts.py --suite "
             f"{results['settings']['suite']}`. The {results['settings']['suite']} suite's "
             "models, with a base that has also read its tasks' prompts: base "
             + ", ".join(f"{t} {results['own']['base'][t]:.1%}" for t in tasks)
             + "; experts " + ", ".join(f"{t} {results['own'][t][t]:.1%}" for t in tasks)
             + " on their own task. Package defaults, holdout 0.", "",
             "| calibration prompts per expert | " + " | ".join(tasks)
             + " | normalised mean | training compute |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for r in results["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['kept'][t]:.3f}" for t in tasks)
                     + f" | **{r['normalised_mean']:.3f}** | {r['training_compute']:.2f} |")
    lines += ["", "Each task's cell is the share of its expert's accuracy kept; training "
              "compute is the tokens passed through the blocks in training, over the 64 real "
              "prompts'. The first prompts each writer wrote:", ""]
    for r in results["rows"]:
        if r["parameters"].get("written_prompts"):
            lines.append(f"- {r['name']}: the package wrote " + ", ".join(
                f"{n} for {t}" for t, n in zip(tasks, r["package_written"])))
        if any(r["written"].values()):
            lines.append(f"- {r['name']}: " + "; ".join(
                f"`{p}`" for t in tasks for p in r["written"][t][:2]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
