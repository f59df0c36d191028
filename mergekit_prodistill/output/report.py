"""The run's report (prodistill_report.json): what a finished merge says about itself.

One typed structure, built once at the end of a run, written by output.py and read back
by the model card, the Hub upload, the output-folder check and the bench scripts. Its JSON
keys are the format: a field that defaults to None (training facts, the head, accelerator
memory, the recipe, the file list) is left out of the file while it is None, and a report
that lacks it still reads.
"""

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any, Dict, List, Optional

from mergekit_prodistill import __version__
from mergekit_prodistill.layout import REPORT
from mergekit_prodistill.plan.context import RunContext


def _from_dict(cls, data: dict):
    """``cls`` from its JSON object; keys this version does not know are ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"{cls.__name__}: {exc}") from None


def _without_absent(cls, data: dict) -> dict:
    """``data`` without the fields of ``cls`` that default to None and are None."""
    optional = {f.name for f in fields(cls) if f.default is None}
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


@dataclass
class CalibrationEntry:
    """One expert's calibration prompts: where from, in which format, how many."""

    model: str
    source: str  # as the recipe names it
    hub_dataset: Optional[str]  # the Hub id of the source, where there is one
    template: str
    prompts: int
    tokens: int
    written: Optional[int] = None  # of the prompts, those a model wrote


@dataclass
class Training:
    """Losses and trained coefficients of one trained part of the model."""

    loss_before: float  # with every coefficient at init (task arithmetic)
    loss_after: float
    epoch_losses: List[float]
    coefficient_mean: List[float]  # per expert
    coefficient_std: List[float]
    coefficient_range: List[List[float]]  # per expert: [min, max]
    small_gradient_share: float


@dataclass
class BlockReport(Training):
    """One decoder block: its distillation loss (MSE) and coefficients."""

    block: int
    seconds: float
    # The same loss on the held-out prompts, which decides whether the trained block or
    # task arithmetic is written (None without held-out prompts).
    heldout_loss_before: Optional[float] = None
    heldout_loss_after: Optional[float] = None
    kept_task_arithmetic: bool = False
    # The held-out loss at each early-stopping check (none without ``patience``).
    heldout_checks: List[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"block": self.block, **asdict(self)}  # the block first, for a reader


@dataclass
class HeadReport(Training):
    """The final norm and LM head: their KL to the experts and coefficients."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Fidelity:
    """One expert's held-out prompts: the share of its next-token choices each merge keeps
    (``agreement``) and the mean KL from the expert's distribution (``kl``)."""

    model: str
    prompts: int
    tokens: int
    prodistill: Dict[str, float]
    task_arithmetic: Dict[str, float]


@dataclass
class MergeResults:
    """What a merge measured, as the report's dicts: every trained block's report, the
    head's (None unless trained) and the fidelity on held-out prompts (None unless
    measured)."""

    blocks: List[dict] = field(default_factory=list)
    head: Optional[dict] = None
    fidelity: Optional[List[dict]] = None


@dataclass(kw_only=True)
class Report:
    """Everything prodistill_report.json holds, in the order it holds it."""

    method: str = "prodistill"
    version: str = __version__
    parameters: Dict[str, Any]  # the recipe's ProDistill parameters
    seed: int
    device: str
    processes: int = 1  # processes that merged together (torchrun), each on its device
    activation_dtype: Optional[str] = None  # the three training facts: only with epochs
    epochs: Optional[int] = None
    continuation_seconds: Optional[float] = None  # only with continue_tokens
    # A multimodal checkpoint's parts outside its language model (vision tower,
    # projector), merged by task arithmetic with weight init.
    towers: Optional[List[str]] = None
    calibration: List[CalibrationEntry]
    vocabulary: Optional[str]  # how the output vocabulary was built; None: the base's
    blocks: List[BlockReport]  # empty without training
    head: Optional[HeadReport] = None
    fidelity: Optional[List[Fidelity]] = None  # with held-out prompts and training
    seconds: float
    peak_rss_bytes: int
    peak_device_bytes: Optional[int] = None  # allocated by tensors
    peak_device_reserved_bytes: Optional[int] = None  # held by the caching allocator
    versions: Dict[str, str]
    recipe: Optional[str] = None  # the recipe's text, as given
    files: Optional[List[str]] = None  # every file of the finished merge, set when written

    @classmethod
    def of_run(cls, recipe, recipe_text: str, calib, vocabulary: Optional[str],
               results: MergeResults, ctx: RunContext, started: float,
               **facts) -> "Report":
        """The report of a run ending now: its inputs, results, time and peak memory.

        ``facts`` are ``processes``, ``activation_dtype``, ``epochs``,
        ``continuation_seconds`` and ``towers``.
        """
        return cls(
            parameters=recipe.params.model_dump(),
            seed=ctx.seed,
            device=str(ctx.device),
            **facts,
            calibration=[
                CalibrationEntry(str(e.model), source, hub_dataset, e.params.template, n,
                                 calib.tokens(i), calib.written[i] if calib.written else None)
                for i, (e, source, hub_dataset, n) in enumerate(
                    zip(recipe.experts, calib.sources, calib.hub_datasets, calib.prompts))
            ],
            vocabulary=vocabulary,
            blocks=[_from_dict(BlockReport, b) for b in results.blocks],
            head=_from_dict(HeadReport, results.head) if results.head else None,
            fidelity=([_from_dict(Fidelity, f) for f in results.fidelity]
                      if results.fidelity else None),
            seconds=time.time() - started,
            **peak_memory(ctx.device),
            versions=versions(),
            recipe=recipe_text,
        )

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            calibration=[_without_absent(CalibrationEntry, asdict(c)) for c in self.calibration],
            blocks=[b.to_dict() for b in self.blocks],
            head=self.head.to_dict() if self.head else None,
            fidelity=[asdict(f) for f in self.fidelity] if self.fidelity else None,
        )
        return _without_absent(Report, data)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """Raises ValueError when ``data`` is not a report."""
        report = _from_dict(cls, data)
        try:
            report.calibration = [_from_dict(CalibrationEntry, c) for c in report.calibration]
            report.blocks = [_from_dict(BlockReport, b) for b in report.blocks]
        except TypeError as exc:  # not a list
            raise ValueError(f"Report: {exc}") from None
        report.head = _from_dict(HeadReport, report.head) if report.head else None
        if report.fidelity:
            report.fidelity = [_from_dict(Fidelity, f) for f in report.fidelity]
        return report

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, REPORT), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def read(cls, folder: str) -> "Report":
        """The report in ``folder``; OSError when there is none, ValueError when unreadable."""
        with open(os.path.join(folder, REPORT), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def peak_memory(device) -> dict:
    """``peak_rss_bytes`` of this process, and on CUDA ``peak_device_bytes`` (allocated)
    and ``peak_device_reserved_bytes``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss * (1 if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        import torch

        peak["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        peak["peak_device_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peak


def versions() -> Dict[str, str]:
    found = {"mergekit-prodistill": __version__}
    for package in ("mergekit", "transformers", "torch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found
