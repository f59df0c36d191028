"""Whether a merge may write its output folder: never over a model that another recipe
made, and never without the disk room for its result.

A folder holds "the same merge" when the recipe it records is this recipe, parsed and
compared as mergekit reads it (formatting aside): the mergekit_config.yml written beside
the card, or, when the card was not written, the recipe in the run's report. The same
merge may be replaced; any other model is refused before anything is read, as is a path
where this process cannot make or write a folder.
"""

import os
from typing import Optional

import yaml
from mergekit.config import MergeConfiguration

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.formatting import fmt_bytes
from mergekit_prodistill.layout import OUTPUT_FILES, RECIPE, REPORT, WEIGHT_PREFIXES
from mergekit_prodistill.output.report import Report
from mergekit_prodistill.plan.devices import free_disk

# Room for config, tokenizer, card and report on top of the weights.
DISK_MARGIN_BYTES = 64 * 2**20


def folder_problem(path: str, writable: bool = False) -> Optional[str]:
    """What stops the merge from making files in the folder ``path`` (created if missing),
    in words that follow the path; None when nothing does.

    ``path`` or a folder above it may be a file; with ``writable``, the nearest folder
    that exists must also let this process create files in it.
    """
    full = os.path.abspath(path)
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return ("is a file, not a folder" if existing == full
                else f"cannot be a folder: {existing} is a file")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return ("is not writable" if existing == full
                else f"cannot be created: {existing} is not writable")
    return None


def check_output_folder(out_path: str, merge_config: MergeConfiguration) -> None:
    """Refuse to overwrite a model that this recipe did not make, and a folder that this
    process cannot create or write."""
    if os.path.lexists(out_path) and not os.path.isdir(out_path):
        raise ProDistillError(f"output path {out_path} exists and is not a folder")
    problem = folder_problem(out_path, writable=True)
    if problem:
        raise ProDistillError(f"output path {out_path} {problem}")
    if not os.path.lexists(out_path):
        return
    recorded = {name: text for name, text in ((RECIPE, _recipe_file(out_path)),
                                              (REPORT, _report_recipe(out_path)))
                if text is not None}
    if any(_same_recipe(text, merge_config) for text in recorded.values()):
        return  # the same merge again: replace it
    if recorded:
        where = f"its {RECIPE} is" if RECIPE in recorded else f"the recipe in its {REPORT} is"
        raise ProDistillError(
            f"output folder {out_path} already holds a different merge ({where} not this "
            "recipe); choose another folder, or delete that one to replace it"
        )
    clash = sorted(
        name for name in os.listdir(out_path)
        if name in OUTPUT_FILES or name.startswith(WEIGHT_PREFIXES)
    )
    if clash:
        raise ProDistillError(
            f"output folder {out_path} already holds {', '.join(clash[:3])}, which this "
            "merge would overwrite; choose an empty or new folder"
        )


def _recipe_file(out_path: str) -> Optional[str]:
    path = os.path.join(out_path, RECIPE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""  # a recipe file that is no recipe: certainly not this one


def _report_recipe(out_path: str) -> Optional[str]:
    try:
        return Report.read(out_path).recipe
    except (OSError, ValueError):  # no report, or none that records its recipe
        return None


def _same_recipe(text: str, merge_config: MergeConfiguration) -> bool:
    try:
        previous = MergeConfiguration.model_validate(yaml.safe_load(text))
    except Exception:  # unreadable or not a recipe: certainly not this one
        return False
    return previous == merge_config


def check_free_disk(out_path: str, needed: int) -> None:
    existing, free = free_disk(out_path)
    if free < needed + DISK_MARGIN_BYTES:
        raise ProDistillError(
            f"not enough free disk for the output: it needs about {fmt_bytes(needed + DISK_MARGIN_BYTES)}, "
            f"and {existing} has {fmt_bytes(free)} free"
        )
