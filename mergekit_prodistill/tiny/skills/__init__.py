"""Tiny model families with real, checkable skills, built offline with torch.

A base and one expert per task that write exact answers to string and number tasks
(``rev:hcafk=`` -> ``kfach``, ``rot:hcafk=`` -> ``kfdin``, ``add:584+739=`` -> ``2241``),
so a merge can be scored by what it keeps of each expert's skill. The subpackage splits
the work by job: `tasks` (tasks, suites, data splits, tokenizer), `training` (the
training loop), `kernels` (the environment that pins torch's kernels; imports nothing),
`family` (build and cache a family), `scoring` (greedy exact match) and `quickstart` (the
example's recipes and table; ``python -m mergekit_prodistill.tiny.skills``).
The quality benchmark (bench/quality) builds its larger suites with the same code.
"""

from pathlib import Path

from .family import QUICK, BuildSettings, Checkpoints, build, held_out_sets
from .scoring import score_model

__all__ = ["QUICK", "BuildSettings", "Checkpoints", "build", "build_skill_family",
           "held_out_sets", "score_model"]


def build_skill_family(folder: Path, settings: BuildSettings = QUICK,
                       log=lambda message: None) -> Checkpoints:
    """The quick start's base and experts, built once under ``folder`` and reused after.

    They are kept in ``folder/models-<fingerprint of settings>``; a call with the same
    settings finds them there and returns at once.
    """
    return build(Path(folder), settings, log=log)
