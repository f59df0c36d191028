"""Results of the benchmark: JSON, a markdown table, and plots.

Accuracy is greedy exact match on each task's test set. A merged model's normalised
accuracy on a task is its accuracy divided by that task's expert's own accuracy; the
normalised mean averages that over tasks (the paper's "Norm Avg").
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import merges

GROUP_TITLES = {
    "mergekit": "mergekit's methods (through mergekit-yaml)",
    "prodistill": "ProDistill",
    "set": "ProDistill with settings from the command line (defaults otherwise)",
    "change": "One change at a time from the ProDistill defaults",
    "granularity": "Ablation: coefficient granularity (defaults otherwise)",
    "inputs": "Ablation: block inputs (defaults otherwise)",
    "shots": "Calibration shots per task (defaults otherwise)",
    "epochs": "Epochs per block (defaults otherwise)",
}


def _summarise(scores: Dict[str, Dict], own: Dict[str, Dict]) -> Dict:
    tasks = list(scores)
    exact = {t: scores[t]["exact"] for t in tasks}
    normalised = {t: exact[t] / own[t][t]["exact"] for t in tasks}
    return {
        "accuracy": exact,
        "char_accuracy": {t: scores[t]["chars"] for t in tasks},
        "mean": sum(exact.values()) / len(tasks),
        "normalised": normalised,
        "normalised_mean": sum(normalised.values()) / len(tasks),
    }


def best(rows: List[Dict], group: str) -> Optional[Dict]:
    candidates = [r for r in rows if r["group"] == group]
    return max(candidates, key=lambda r: r["normalised_mean"]) if candidates else None


def find(rows: List[Dict], name: str) -> Optional[Dict]:
    return next((r for r in rows if r["name"] == name), None)


def assemble(settings, ckpt, own, rows, threads: int) -> Dict:
    """Everything measured, with per-task, mean and normalised accuracies."""
    merged = [{**row, **_summarise(row["scores"], own)} for row in rows]
    for row in merged:
        del row["scores"]
    tasks = list(ckpt.experts)
    results = {
        "suite": settings.suite,
        "tasks": tasks,
        "settings": asdict(settings),
        "build_seconds": ckpt.build_seconds,
        "checkpoints_reused": ckpt.reused,
        "threads": threads,
        "own": {name: {t: s[t]["exact"] for t in tasks} for name, s in own.items()},
        "merges": merged,
        "diagnostics": {},
    }
    top = best(merged, "mergekit")
    pd = find(merged, "prodistill")
    # Training compute (token passes through the blocks, so FLOPs) relative to the defaults'.
    unit = (pd or {}).get("prodistill") or {}
    for row in merged:
        passes = (row.get("prodistill") or {}).get("token_passes")
        row["compute"] = passes / unit["token_passes"] if passes and unit.get("token_passes") \
            else None
    if top and pd:
        results["summary"] = {
            "best_mergekit": top["name"],
            "best_mergekit_normalised_mean": top["normalised_mean"],
            "prodistill_normalised_mean": pd["normalised_mean"],
            "gap_closed": (pd["normalised_mean"] - top["normalised_mean"])
            / (1 - top["normalised_mean"]),
        }
    return results


# ----------------------------------------------------------------------------- markdown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _row(label: str, r: Dict, extra: str = "") -> str:
    cells = [_pct(a) for a in r["accuracy"].values()]
    compute = "" if r.get("compute") is None else f"{r['compute']:.2f}"
    return (f"| {label} | " + " | ".join(cells) + f" | {_pct(r['mean'])} | "
            f"**{r['normalised_mean']:.3f}** | {compute} | {r['merge_seconds']:.0f} |{extra}")


def _header(tasks: List[str], first: str = "merge") -> List[str]:
    return [f"| {first} | " + " | ".join(tasks)
            + " | mean | normalised mean | training compute | seconds |",
            "|---" * (len(tasks) + 5) + "|"]


def _label(r: Dict) -> str:
    if r["method"] == "prodistill":
        params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items())
        return f"`{r['name']}`" + (f" ({params})" if params and r["group"] != "prodistill"
                                   else f" ({r['note']})" if r["note"] else "")
    extra = [f"weight={r['weight']}"] + ([f"density={r['density']}"] if r["density"] else [])
    return f"`{r['method']}` ({', '.join(extra)})"


def main_table(results: Dict) -> str:
    rows, tasks = results["merges"], results["tasks"]
    lines = _header(tasks, "model") + [
        f"| expert `{t}` | " + " | ".join(_pct(results["own"][t][u]) for u in tasks)
        + f" | {_pct(sum(results['own'][t].values()) / len(tasks))} | | | |"
        for t in tasks
    ] + [
        "| base | " + " | ".join(_pct(results["own"]["base"][u]) for u in tasks)
        + f" | {_pct(sum(results['own']['base'].values()) / len(tasks))} | | | |"
    ]
    for r in rows:
        if r["group"] in ("mergekit", "prodistill", "set"):
            lines.append(_row(_label(r), r))
    return "\n".join(lines)


# What each suite's base model knows, for the table's caption.
BASES = {
    "novel": ("Generated by `python bench/quality/run.py`; see `REPORT.md` for what it shows.",
              "neighbouring string skills (none of the tasks)"),
    "competent": ("Generated by `python bench/quality/run.py --suite competent`; see "
                  "`REPORT.md` beside this file for what it shows.",
                  "the four tasks themselves, stopped early so it is fair at each"),
    "hard": ("Generated by `python bench/quality/run.py --suite hard`; see `REPORT.md` "
             "beside this file for what it shows.",
             "neighbouring skills, reading numbers (never adding them), and two of the "
             "string tasks, stopped early"),
}


def _steps(s: Dict) -> str:
    """The base's pretraining length, with its early stop if any."""
    if s.get("pretrain_stop") is None:
        return f"{s['pretrain_steps']} steps"
    return f"stopped at step {s['pretrain_stop']} of {s['pretrain_steps']}"


def _finetune_steps(s: Dict) -> str:
    longer = "".join(f"; {task}: {n}" for task, n in s.get("finetune_steps_of", {}).items())
    return f"{s['finetune_steps']} steps{longer}"


def markdown(results: Dict) -> str:
    s, tasks = results["settings"], results["tasks"]
    command, base = BASES[results["suite"]]
    out = [
        "# Merge quality: ProDistill against mergekit's methods",
        "",
        command,
        f"Base: {s.get('architecture', 'LlamaForCausalLM')}, {s['layers']} layers, hidden {s['hidden_size']}, pretrained on "
        f"{base} ({_steps(s)}, lr {s['pretrain_lr']}); one expert per task, "
        f"fully fine-tuned from it ({_finetune_steps(s)}, lr {s['finetune_lr']}). "
        f"{s['test_examples']} test prompts per task, greedy decoding, exact match (%). "
        "Normalised mean: merged accuracy / the expert's own accuracy, averaged over tasks.",
        "",
        main_table(results),
        "",
    ]
    summary = results.get("summary")
    if summary:
        out += [
            f"Best mergekit method: `{summary['best_mergekit']}`, normalised mean "
            f"{summary['best_mergekit_normalised_mean']:.3f}. ProDistill (defaults): "
            f"{summary['prodistill_normalised_mean']:.3f}; share of the gap to the experts "
            f"it closes: {summary['gap_closed']:.3f}.",
            "",
        ]
    for group in ("change", "granularity", "inputs", "shots", "epochs"):
        rows = [r for r in results["merges"] if r["group"] == group]
        if not rows:
            continue
        default = find(results["merges"], "prodistill")
        out += [f"## {GROUP_TITLES[group]}", "", *_header(tasks)]
        if default and group != "change":
            out.append(_row("`prodistill` (defaults)", default))
        out += [_row(_label(r), r) for r in rows] + [""]
    out += _sizes_md(results)
    out += _scaling_md(results)
    out += _diagnostics_md(results)
    out += _blocks_md(results)
    out += [
        "## Per-character accuracy (partial credit, %)",
        "",
        "| merge | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        *[f"| {r['name']} | " + " | ".join(_pct(c) for c in r["char_accuracy"].values()) + " |"
          for r in results["merges"] if r["group"] in ("mergekit", "prodistill", "set")],
        "",
        f"Run: {results['run_seconds']:.0f} s on {results['threads']} thread(s); checkpoints "
        + ("reused from the cache" if results["checkpoints_reused"] else "built")
        + f" (building took {results['build_seconds']:.0f} s).",
        "",
    ]
    return "\n".join(out)


def _sizes_md(results: Dict) -> List[str]:
    sizes = results.get("task_vector_sizes")
    if not sizes:
        return []
    return [
        "## Task vector sizes",
        "",
        "Standard deviation of each task vector (expert − base, over all weights) relative "
        "to that of the base's weights, and its largest share in any one tensor.",
        "",
        "| task | std(τ) / std(θ₀) | largest per-tensor std(τ) / std(θ₀) |",
        "|---|---|---|",
        *[f"| {t} | {s['relative_std']:.4f} | {s['largest_tensor_relative_std']:.4f} |"
          for t, s in sizes.items()],
        "",
    ]


def _scaling_md(results: Dict) -> List[str]:
    scaling = results.get("task_vector_scaling")
    if not scaling:
        return []
    columns = list(next(iter(scaling.values())))
    return [
        "## Task vectors, one at a time",
        "",
        "Exact match (%) on each task of the base plus that task's vector scaled (`alone xS`), "
        "and of the expert plus a share of every other task vector: how linear the skills "
        "are in the weights, which data-free methods rely on.",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        *[f"| {t} | " + " | ".join(_pct(row[c]) for c in columns) + " |"
          for t, row in scaling.items()],
        "",
    ]


def _diagnostics_md(results: Dict) -> List[str]:
    diag = results["diagnostics"]
    if not diag:
        return []
    out = [
        "## Where the error sits",
        "",
        "Teacher-forced on test prompts + correct answers. Hidden error: squared distance of "
        "the merged model's last hidden state from the task's expert's, relative to the "
        "expert's, at prompt positions and at the positions that predict the answer. "
        "Agreement: share of answer tokens where the merged model's next-token choice is "
        "the expert's.",
        "",
        "| merge | task | hidden error, prompt | hidden error, answer | answer agreement |",
        "|---|---|---|---|---|",
    ]
    for name, per_task in diag.items():
        for t, d in per_task.items():
            out.append(f"| {name} | {t} | {d['hidden_error_prompt']:.3f} | "
                       f"{d['hidden_error_answer']:.3f} | {_pct(d['answer_token_agreement'])} |")
    return out + [""]


def _blocks_md(results: Dict) -> List[str]:
    out = []
    for name in ("prodistill-paper", "prodistill"):
        r = find(results["merges"], name)
        if not r or not r["prodistill"]:
            continue
        rep = r["prodistill"]
        out += [
            f"### `{name}`: per-block distillation loss and coefficients",
            "",
            "| block | loss before | loss after | coefficient mean per expert | std | range |",
            "|---|---|---|---|---|---|",
        ]
        for b in rep["blocks"]:
            out.append(
                f"| {b['block']} | {b['loss_before']:.4f} | {b['loss_after']:.4f} | "
                + ", ".join(f"{m:.2f}" for m in b["coefficient_mean"]) + " | "
                + ", ".join(f"{x:.2f}" for x in b.get("coefficient_std", [])) + " | "
                + ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in b.get("coefficient_range", []))
                + " |")
        if rep.get("head"):
            h = rep["head"]
            out.append(f"| head | {h['loss_before']:.4f} (KL) | {h['loss_after']:.4f} (KL) | "
                       + ", ".join(f"{m:.2f}" for m in h["coefficient_mean"]) + " | | |")
        out += ["", f"Calibration tokens per expert: {rep['calibration_tokens']}.", ""]
    return out


# ----------------------------------------------------------------------------- plots

COLORS = {"mergekit": "#9e9e9e", "prodistill": "#1f77b4", "set": "#2ca02c",
          "change": "#6baed6", "granularity": "#fdae6b", "inputs": "#fd8d3c"}
TASK_MARKERS = {"rev": "o", "sort": "s", "rot": "^", "add": "D"}


def _plots(results: Dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    rows = [r for r in results["merges"] if r["group"] in COLORS]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["normalised_mean"] for r in rows],
            color=[COLORS[r["group"]] for r in rows], height=0.7)
    for yi, r in zip(y, rows):
        ax.text(0.005, yi, f"{r['normalised_mean']:.3f}", va="center", fontsize=7,
                color="white" if r["normalised_mean"] > 0.1 else "black")
    for t in tasks:
        ax.scatter([r["normalised"][t] for r in rows], y, marker=TASK_MARKERS.get(t, "o"),
                   s=14, color="black", zorder=3, label=f"task {t}")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.axvline(0.95, color="#2ca02c", lw=0.8, ls="--", label="0.95")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("normalised accuracy (merged / expert), bars: mean over tasks")
    ax.set_title("Merge quality by method (grey: mergekit, blue: ProDistill)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "methods.png", dpi=120)
    plt.close(fig)

    default = find(results["merges"], "prodistill")
    top = best(results["merges"], "mergekit")
    for group, default_x, xlabel in (("shots", merges.DEFAULT_SHOTS, "calibration shots per task"),
                                     ("epochs", merges.DEFAULT_EPOCHS, "epochs per block")):
        points = sorted([(r["parameters"][group], r) for r in results["merges"]
                         if r["group"] == group] + ([(default_x, default)] if default else []),
                        key=lambda p: p[0])
        if len(points) < 2:
            continue
        xs = [x for x, _ in points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [r["normalised_mean"] for _, r in points], marker="o", lw=2.2,
                color=COLORS["prodistill"], label="ProDistill, mean")
        for t in tasks:
            ax.plot(xs, [r["normalised"][t] for _, r in points], marker=TASK_MARKERS.get(t, "o"),
                    lw=0.9, alpha=0.7, label=f"task {t}")
        if top:
            ax.axhline(top["normalised_mean"], color=COLORS["mergekit"], ls="--",
                       label=f"best mergekit ({top['name']})")
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("normalised accuracy")
        ax.set_title(f"ProDistill accuracy against {xlabel}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / f"{group}.png", dpi=120)
        plt.close(fig)

    diag = results["diagnostics"]
    if diag:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        width = 0.8 / len(diag)
        for ax, where in zip(axes, ("prompt", "answer")):
            for k, (name, per_task) in enumerate(diag.items()):
                ax.bar([i + k * width for i in range(len(tasks))],
                       [per_task[t][f"hidden_error_{where}"] for t in tasks], width, label=name)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
            ax.set_title(f"at {where} positions")
        axes[0].set_ylabel("relative hidden-state error vs expert")
        axes[1].legend(fontsize=7)
        fig.suptitle("Where the merged model departs from the experts")
        fig.tight_layout()
        fig.savefig(folder / "positions.png", dpi=120)
        plt.close(fig)


def write(results: Dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(markdown(results))
    _plots(results, folder)
