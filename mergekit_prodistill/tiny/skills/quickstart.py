"""The quick start: a skill family, its two merge recipes, and a table of the skill kept.

``build`` writes the family (cached under ``OUT/models``) and two recipes, one for
mergekit's ``task_arithmetic`` and one for ProDistill. After ``mergekit-yaml`` has merged
each into ``OUT/<method>``, ``table`` scores the base, every expert and both merges on
every task (greedy decoding, exact match on held-out prompts), prints the table, and
writes it as ``OUT/skills.json`` and ``OUT/skills.png``. ``examples/tiny/run.sh`` runs
exactly these steps.
"""

import json
from pathlib import Path
from typing import Dict

from .family import QUICK, Checkpoints, build, held_out_sets

MERGES = ("task_arithmetic", "prodistill")
LABELS = {"task_arithmetic": "task arithmetic", "prodistill": "ProDistill"}
# Task arithmetic at 0.5 per expert: the best of mergekit's methods on these experts (the
# quality benchmark's competent suite; at 1.0 the summed task vectors over-shoot).
TASK_ARITHMETIC_WEIGHT = 0.5
# ProDistill's settings for the example: half the default shots, and continuations as long
# as the longest answer (plus its end token) rather than 64 tokens, so that the merge takes
# seconds on two CPU cores.
PRODISTILL_PARAMETERS = {"shots": 32, "continue_tokens": 9}


def write_recipes(ckpt: Checkpoints, out: Path) -> Dict[str, Path]:
    """``OUT/task_arithmetic.yml`` and ``OUT/prodistill.yml``; method -> path."""
    texts = {
        "task_arithmetic": ckpt.recipe("task_arithmetic", weight=TASK_ARITHMETIC_WEIGHT),
        "prodistill": ckpt.recipe("prodistill", PRODISTILL_PARAMETERS),
    }
    paths = {}
    for method, text in texts.items():
        paths[method] = out / f"{method}.yml"
        paths[method].write_text(text, encoding="utf-8")
    return paths


def score_all(ckpt: Checkpoints, out: Path) -> Dict[str, Dict[str, float]]:
    """Exact match per task of the base, each expert on its own task, and each merge."""
    import transformers

    from .scoring import score_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.base)
    tests = held_out_sets(ckpt.settings)

    def exact(path):
        return {t: s["exact"] for t, s in score_model(path, tokenizer, tests).items()}

    scores = {"base": exact(ckpt.base),
              "expert": {t: exact(path)[t] for t, path in ckpt.experts.items()}}
    for method in MERGES:
        scores[method] = exact(out / method)
    return scores


def kept(scores: Dict[str, Dict[str, float]], method: str) -> Dict[str, float]:
    """Per task, the merged model's accuracy over the expert's."""
    return {t: scores[method][t] / max(e, 1e-9) for t, e in scores["expert"].items()}


def table(scores: Dict[str, Dict[str, float]]) -> str:
    """The table a person reads at a glance: accuracies, and the share of skill kept."""
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    head = ["task", "base", "expert"] + [LABELS[m] + " (kept)" for m in MERGES]
    rows = [head]
    for task in scores["expert"]:
        rows.append([task, pct(scores["base"][task]), pct(scores["expert"][task])]
                    + [f"{pct(scores[m][task])} ({pct(kept(scores, m)[task])})"
                       for m in MERGES])
    means = [kept(scores, m) for m in MERGES]
    rows.append(["mean kept", "", ""] + [pct(sum(k.values()) / len(k)) for k in means])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def plot(scores: Dict[str, Dict[str, float]], path: Path) -> None:
    """The table as grouped bars per task, the share kept written above each merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(scores["expert"])
    series = ["base", "expert", *MERGES]
    colours = {"base": "#bbbbbb", "expert": "#444444", "task_arithmetic": "#e69f00",
               "prodistill": "#0072b2"}
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 2, 3.6))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        ys = [100 * scores[name][t] for t in tasks]
        ax.bar(xs, ys, width, label=LABELS.get(name, name), color=colours[name])
        if name in MERGES:
            for x, y, share in zip(xs, ys, kept(scores, name).values()):
                ax.text(x, y + 1, f"{100 * share:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 112)
    ax.set_ylabel("exact match (%)")
    ax.set_title("Exact match per task; above each merge, the share of the expert's it kept",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=len(series), loc="lower center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    import argparse

    import transformers

    ap = argparse.ArgumentParser(prog="python -m mergekit_prodistill.tiny.skills",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["build", "table"])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model
    out = args.out.resolve()
    log = print if args.step == "build" else (lambda message: None)
    ckpt = build(out / "models", QUICK, log=log)
    if args.step == "build":
        for method, path in write_recipes(ckpt, out).items():
            print(f"{LABELS[method]} recipe: {path}")
        return
    scores = score_all(ckpt, out)
    (out / "skills.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
    plot(scores, out / "skills.png")
    n = len(held_out_sets(ckpt.settings)[next(iter(ckpt.experts))])
    print(f"\nExact match on {n} held-out prompts per task. expert: the task's own expert;"
          " (kept): the merge's accuracy over the expert's.\n")
    print(table(scores))
    print(f"\nmerged model: {out / 'prodistill'}")
    print(f"model card:   {out / 'prodistill' / 'README.md'}")
    print(f"this table:   {out / 'skills.png'}")
