"""Recipes for every merge in the benchmark, run through the real ``mergekit-yaml``.

Each merge is one subprocess of the ``mergekit-yaml`` next to this Python, so what is
measured is exactly what a user runs: mergekit's own methods through mergekit, and
ProDistill through the start-up hook that routes ``merge_method: prodistill`` to it.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from models import Checkpoints

REPO = Path(__file__).resolve().parents[2]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


@dataclass
class Merge:
    """One row of the results: a name, the group it is plotted in, and its recipe."""

    name: str
    group: str
    method: str
    parameters: Dict = field(default_factory=dict)  # global parameters
    weight: Optional[float] = None  # per-expert weight for mergekit's methods
    density: Optional[float] = None
    note: str = ""
    seconds: float = 0.0  # wall time of its mergekit-yaml run

    def recipe(self, ckpt: Checkpoints) -> str:
        return ckpt.recipe(self.method, self.parameters, self.weight, self.density)


def run_merge(merge: Merge, ckpt: Checkpoints, work: Path, threads: int, log=print) -> Path:
    """Write the recipe, run ``mergekit-yaml`` on it, return the merged model's folder."""
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / f"{merge.name}.yml"
    recipe.write_text(merge.recipe(ckpt), encoding="utf-8")
    out = work / merge.name
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
    )
    started = time.time()
    proc = subprocess.run(
        [str(MERGEKIT_YAML), str(recipe), str(out), "--random-seed", "0", "--quiet"],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed on {recipe}:\n{proc.stdout}\n{proc.stderr}")
    merge.seconds = time.time() - started
    log(f"  merged {merge.name} in {merge.seconds:.0f} s")
    return out


# The recipe the paper describes: prompts only, final norm and LM head by task arithmetic,
# with the same optimiser budget as the defaults so that only the calibration differs.
PAPER = {"continue_tokens": 0, "head_epochs": 0, "lr": 0.1}
# mergekit-prodistill 0.1.0's defaults, before this benchmark.
FIRST_DEFAULTS = {"continue_tokens": 0, "head_epochs": 0, "lr": 0.01, "epochs": 20}
TA_WEIGHTS = (0.3, 0.5, 0.7, 1.0)
SHOTS = (1, 4, 16)  # 64 is the default
EPOCHS = (1, 5, 10, 20, 50)  # 30 is the default
DEFAULT_SHOTS, DEFAULT_EPOCHS = 64, 30


def _prodistill(name: str, group: str, note: str = "", **params) -> Merge:
    return Merge(name, group, "prodistill", params, note=note)


def plan(suite: str = "novel") -> List[Merge]:
    """Every merge of the suite's benchmark, in the order they run."""
    merges = {"competent": _competent_plan, "hard": _hard_plan}.get(suite, _novel_plan)()
    assert len({m.name for m in merges}) == len(merges)
    return merges


def overridden(overrides: Dict) -> Merge:
    """ProDistill with the defaults but for ``overrides``, named after them."""
    name = "-".join(["prodistill"] + [f"{k}={v}" for k, v in overrides.items()])
    name = re.sub(r"[^\w.=+-]", "_", name)  # it names the merged model's folder
    return _prodistill(name, "set", ", ".join(f"{k}: {v}" for k, v in overrides.items()),
                       **overrides)


# Suite competent: few rows, so that a rerun on cached checkpoints takes minutes.
COMPETENT_TA_WEIGHTS = (0.5, 1.0)


def _mergekit_rows() -> List[Merge]:
    """mergekit's methods in the competent and hard suites."""
    return [
        Merge("linear", "mergekit", "linear", weight=1.0, note="average of the experts"),
        *[Merge(f"task_arithmetic-{w}", "mergekit", "task_arithmetic", weight=w)
          for w in COMPETENT_TA_WEIGHTS],
        Merge("ties", "mergekit", "ties", weight=1.0, density=0.5),
    ]


def _competent_plan() -> List[Merge]:
    return [
        *_mergekit_rows(),
        _prodistill("prodistill", "prodistill", "the package defaults: 64 shots"),
        _prodistill("shots-16", "prodistill", "16 shots", shots=16),
        _prodistill("head-trained", "prodistill", "64 shots, head_epochs: 50", head_epochs=50),
        _prodistill("head-trained-shots-16", "prodistill", "16 shots, head_epochs: 50",
                    shots=16, head_epochs=50),
        _prodistill("before", "prodistill", "the defaults before the hard suite: batch_size 16",
                    **BEFORE_HARD),
        _prodistill("before-shots-16", "prodistill", "the same at 16 shots", shots=16,
                    **BEFORE_HARD_16),
        _prodistill("patience-3", "prodistill", "patience: 3", patience=3),
        _prodistill("epochs-50", "prodistill", "epochs: 50", epochs=50),
    ]


# The defaults before the hard suite: 16 prompts a step, and epochs: auto meaning 50
# epochs and at least 200 steps (50 epochs at 64 shots, 200 at 16).
BEFORE_HARD = {"batch_size": 16, "epochs": 50}
BEFORE_HARD_16 = {"batch_size": 16, "epochs": 200}


def _hard_plan() -> List[Merge]:
    pd = _prodistill
    return [
        *_mergekit_rows(),
        pd("prodistill", "prodistill", "the package defaults: 64 shots"),
        pd("shots-16", "prodistill", "16 shots", shots=16),
        pd("before", "prodistill", "the defaults before this suite: 64 shots, batch_size 16",
           **BEFORE_HARD),
        pd("before-shots-16", "prodistill", "the same at 16 shots", shots=16, **BEFORE_HARD_16),
        # One lever at a time, from the defaults.
        pd("head-trained", "change", head_epochs=50),
        pd("head-trained-shots-16", "change", head_epochs=50, shots=16),
        pd("patience-3", "change", patience=3),
        pd("patience-3-shots-16", "change", patience=3, shots=16),
        pd("batch-8", "change", batch_size=8),
        pd("epochs-50", "change", epochs=50),
        pd("shots-16-steps-200", "change", "16 shots, 200 steps (the auto minimum before)",
           shots=16, epochs=50),
        pd("lr-0.3", "change", lr=0.3),
        pd("lr-0.03", "change", lr=0.03),
        pd("shots-128", "change", shots=128),
        pd("no-continuation", "change", continue_tokens=0),
    ]


def _novel_plan() -> List[Merge]:
    pd = _prodistill
    merges = [
        Merge("linear", "mergekit", "linear", weight=1.0, note="average of the experts"),
        *[Merge(f"task_arithmetic-{w}", "mergekit", "task_arithmetic", weight=w)
          for w in TA_WEIGHTS],
        Merge("ties", "mergekit", "ties", weight=1.0, density=0.5),
        Merge("dare_ties", "mergekit", "dare_ties", weight=1.0, density=0.5, note="seed 0"),
        pd("prodistill", "prodistill", "the package defaults"),
        pd("prodistill-paper", "prodistill", "prompts only; norm and head by task arithmetic",
           **PAPER),
        pd("prodistill-0.1.0", "prodistill", "the first release's defaults", **FIRST_DEFAULTS),
        pd("before", "prodistill", "the defaults before the hard suite: batch_size 16",
           **BEFORE_HARD),
        pd("before-shots-16", "prodistill", "the same at 16 shots", shots=16, **BEFORE_HARD_16),
        pd("patience-3", "change", "patience: 3", patience=3),
        # One change at a time, from the defaults.
        pd("no-continuation", "change", "continue_tokens: 0", continue_tokens=0),
        pd("lr-0.01", "change", "lr: 0.01", lr=0.01),
        pd("head-trained", "change", "head_epochs: 50", head_epochs=50),
        pd("init-0.33", "change", "init: 0.33", init=0.33),
        pd("shots-128", "change", "shots: 128", shots=128),
        pd("prompts-only-head-trained", "change", "continue_tokens: 0, head_epochs: 50",
           continue_tokens=0, head_epochs=50),
        # The paper's ablations, from the defaults.
        pd("granularity-tensor", "granularity", granularity="tensor"),
        pd("granularity-task", "granularity", granularity="task"),
        pd("inputs-merged", "inputs", inputs="merged"),
        pd("inputs-expert", "inputs", inputs="expert"),
        *[pd(f"shots-{n}", "shots", shots=n) for n in SHOTS],
        *[pd(f"epochs-{n}", "epochs", epochs=n) for n in EPOCHS],
    ]
    return merges
