"""The model card: valid Hub metadata, mergekit's card, and a ProDistill section.

The ProDistill section shows where each expert's prompts came from and in which format,
the hyper-parameters, the distillation loss of every block before and after training (a
table, and a plot when matplotlib imports), and the time and peak memory of the run.

``base_model`` lists the merged models by Hub id where the id is known: a model named
by Hub id in the recipe, or a local folder inside the Hugging Face cache
(``.../models--ORG--NAME/snapshots/...``). Any other local folder is left out rather than
guessed at: a config's ``_name_or_path`` or a README's ``base_model`` names where that
model came from, not the model itself.
"""

import logging
import os
from typing import List, Optional

import yaml
from mergekit.card import generate_card

from mergekit_prodistill.formatting import fmt_bytes, fmt_duration
from mergekit_prodistill.layout import CARD, PLOT
from mergekit_prodistill.models.model_files import hub_id
from mergekit_prodistill.output.report import BlockReport, CalibrationEntry, Fidelity, Report

LOG = logging.getLogger("mergekit_prodistill")

TAGS = ["mergekit", "merge", "prodistill"]


def card_metadata(merge_config, report: Report) -> dict:
    models = [merge_config.base_model, *(m.model for m in merge_config.models)]
    ids = list(dict.fromkeys(i for m in models if m and (i := hub_id(m.model.path))))
    meta = {"base_model": ids, "base_model_relation": "merge"} if ids else {}
    datasets = list(dict.fromkeys(c.hub_dataset for c in report.calibration if c.hub_dataset))
    if datasets:
        meta["datasets"] = datasets
    meta.update(library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS))
    return meta


def loss_plot(blocks: List[BlockReport], path: str) -> bool:
    """Draw the per-block loss before and after training; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        LOG.warning("matplotlib cannot be imported, so the model card has no loss plot; "
                    "it is a dependency of mergekit-prodistill: pip install matplotlib")
        return False
    x = [b.block for b in blocks]
    before = [b.loss_before for b in blocks]
    after = [b.loss_after for b in blocks]
    # Figure without pyplot: no global backend is chosen for the caller's process.
    fig = Figure(figsize=(9, 3.4), dpi=110)
    # Fixed margins: an automatic layout engine would double the drawing time.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.28)
    loss_ax, change_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    loss_ax.plot(x, before, marker="o", markersize=3, label="before: task arithmetic (init)")
    loss_ax.plot(x, after, marker="o", markersize=3, label="after: trained coefficients")
    if min(before + after) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="decoder block", ylabel="distillation loss (MSE)",
                title="Loss per block")
    loss_ax.legend(fontsize="small")
    change = [_change(b, a) or 0.0 for b, a in zip(before, after)]
    change_ax.bar(x, change, color=["tab:green" if c <= 0 else "tab:red" for c in change])
    change_ax.axhline(0, color="black", linewidth=0.6)
    change_ax.set(xlabel="decoder block", ylabel="loss change (%)", title="Change from training")
    for ax in (loss_ax, change_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return True


def write_card(folder: str, merge_config, name: str, report: Report) -> None:
    """Write README.md (and the loss plot it shows) into ``folder``."""
    blocks = report.blocks
    plot = PLOT if blocks and loss_plot(blocks, os.path.join(folder, PLOT)) else None
    with open(os.path.join(folder, CARD), "w", encoding="utf-8") as f:
        f.write(model_card(merge_config, name, report, plot))


def model_card(merge_config, name: str, report: Report, plot: Optional[str] = None) -> str:
    """The card's text; its Configuration section is the report's recipe."""
    card = generate_card(_paths_for_card(merge_config), report.recipe, name)
    _, _, body = card.split("---\n", 2)
    section = "\n".join(_prodistill_section(report, plot))
    marker = "### Configuration"
    body = body.replace(marker, section + marker, 1) if marker in body else body + section
    meta = yaml.safe_dump(card_metadata(merge_config, report), sort_keys=False)
    return f"---\n{meta}---\n{body}"


def _prodistill_section(report: Report, plot: Optional[str]) -> List[str]:
    params = report.parameters
    blocks = report.blocks
    hyper = {**params, "seed": report.seed}
    run = [("time", fmt_duration(report.seconds)),
           ("peak memory (process RSS)", fmt_bytes(report.peak_rss_bytes))]
    if report.peak_device_bytes is not None:
        run.append(("peak accelerator memory", fmt_bytes(report.peak_device_bytes)))
    run.append(("device", report.device))
    run += [(f"{package} version", version) for package, version in report.versions.items()]
    continued = (", each followed by the expert's own greedy continuation (up to "
                 f"{params['continue_tokens']} tokens)") if params.get("continue_tokens") and blocks else ""
    head = report.head
    ending = (
        f"Embeddings were merged by task arithmetic with weight {params['init']}; the final "
        "norm and LM head coefficients were trained to match each expert's next-token "
        f"distribution (KL {head.loss_before:.4g} -> {head.loss_after:.4g})."
        if head else
        "Embeddings, the final norm and the LM head were merged by task arithmetic with "
        f"weight {params['init']}."
    )
    if report.towers:
        ending += (f" The parts outside the language model ({', '.join(report.towers)}) were "
                   f"merged by task arithmetic with weight {params['init']}: the calibration "
                   "prompts are text, which never reaches them.")
    return [
        "### ProDistill",
        "",
        "Element-wise merging coefficients were trained block by block so that each merged "
        "decoder block, fed the merged model's own activations, reproduces every expert's "
        f"block on that expert's unlabeled calibration prompts{continued} "
        f"([Xu et al., 2025](https://arxiv.org/abs/2502.12706)). {ending}",
        *(["", report.vocabulary] if report.vocabulary else []),
        "",
        *(_fidelity_section(report.fidelity) if report.fidelity else []),
        "#### Calibration prompts",
        "",
        "| expert | prompts from | template | prompts | tokens |",
        "|---|---|---|---|---|",
        *[f"| {_model_md(c.model)} | {_source_md(c)} | {_template_md(c.template)} | "
          f"{_prompts_md(c)} | {c.tokens} |" for c in report.calibration],
        "",
        "#### Hyper-parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in hyper.items()],
        "",
        *(_loss_section(blocks, plot) if blocks else [
            "With `epochs: 0` no coefficient was trained: every tensor is task arithmetic "
            "with weight `init`.", ""]),
        "#### Run",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in run],
        "",
        "",
    ]


def _model_md(path: str) -> str:
    hub = hub_id(path)
    return f"[{hub}](https://huggingface.co/{hub})" if hub else _cell(path)


def _prompts_md(calibration: CalibrationEntry) -> str:
    """The prompts' count, and how many of them a model wrote."""
    if not calibration.written:
        return str(calibration.prompts)
    return f"{calibration.prompts - calibration.written} + {calibration.written} written"


def _source_md(calibration: CalibrationEntry) -> str:
    hub = calibration.hub_dataset
    text = _cell(calibration.source)
    if hub:
        return text.replace(hub, f"[{hub}](https://huggingface.co/datasets/{hub})", 1)
    return text


def _template_md(template: str) -> str:
    from mergekit_prodistill.inputs.templates import CHAT, PRESETS

    if template in PRESETS or template == CHAT:
        return template
    return f"`{_cell(template)}`"


def _cell(text: str) -> str:
    """Text that cannot break a Markdown table row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")


def _change(before: float, after: float) -> Optional[float]:
    return 100.0 * (after - before) / before if before > 0 else None


def _change_md(before: float, after: float) -> str:
    change = _change(before, after)
    return "n/a" if change is None else f"{change:+.1f}%"


def _paths_for_card(merge_config):
    """Models as a reader knows them: the Hub id when known, else an absolute path.

    mergekit's card asks the Hub whether an existing relative path is a repo; absolute
    paths and ids that are not local folders it decides offline.
    """

    def fix(ref):
        path = ref.model.path
        shown = hub_id(path) or (os.path.abspath(path) if os.path.exists(path) else path)
        return ref.model_copy(update={"model": ref.model.model_copy(update={"path": shown})})

    models = [m.model_copy(update={"model": fix(m.model)}) for m in merge_config.models]
    return merge_config.model_copy(update={
        "models": models,
        "base_model": fix(merge_config.base_model),
    })


def _fidelity_section(fidelity: List[Fidelity]) -> List[str]:
    measured = [f for f in fidelity if f.tokens]
    if not measured:
        return []
    mean = lambda merge: sum(getattr(f, merge)["agreement"] for f in measured) / len(measured)  # noqa: E731
    return [
        "#### What the merge kept",
        "",
        f"Kept of each expert's next-token choices on held-out prompts: **ProDistill "
        f"{100 * mean('prodistill'):.0f}%**, task arithmetic {100 * mean('task_arithmetic'):.0f}% "
        "(mean over experts). Each expert's held-out prompts were never trained on; every "
        "real token's greedy next-token choice of the merged model is compared with the "
        "expert's own, and KL is the mean KL divergence from the expert's distribution.",
        "",
        "| expert | held-out prompts | tokens | ProDistill kept | task arithmetic kept "
        "| KL ProDistill | KL task arithmetic |",
        "|---|---|---|---|---|---|---|",
        *[f"| {_model_md(f.model)} | {f.prompts} | {f.tokens} | "
          f"{100 * f.prodistill['agreement']:.1f}% | {100 * f.task_arithmetic['agreement']:.1f}% | "
          f"{f.prodistill['kl']:.3g} | {f.task_arithmetic['kl']:.3g} |" for f in measured],
        "",
    ]


def _loss_section(blocks: List[BlockReport], plot) -> List[str]:
    return [
        "#### Distillation loss per block",
        "",
        "Mean squared error between the merged block's output and each expert's block "
        "output, averaged over experts: *before* with every coefficient at `init` (task "
        "arithmetic), *after* with the trained coefficients.",
        "",
        *([f"![Distillation loss per block, before and after training]({plot})", ""]
          if plot else []),
        "| block | loss before | loss after | change |",
        "|---|---|---|---|",
        *[f"| {b.block} | {b.loss_before:.4g} | {b.loss_after:.4g} | "
          f"{_change_md(b.loss_before, b.loss_after)} |" for b in blocks],
        "",
    ]
