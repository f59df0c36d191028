"""Where calibration prompts come from: prompt files, folders of them, and datasets.

An expert names its prompts with one of two recipe parameters:

* ``calibration: PATH``, a local path:
  ``*.jsonl`` holds one JSON object per line (the prompt under ``field``, by default the
  first of :data:`PROMPT_FIELDS` present) or one JSON string per line; ``*.parquet``,
  ``*.csv``, ``*.json`` and ``*.arrow`` are read through ``datasets``; any other file holds
  one prompt per line. A folder written by ``Dataset.save_to_disk`` is loaded as such; any
  other folder contributes every such file in it (sorted, hidden files skipped).
* ``dataset: NAME``, anything ``datasets.load_dataset`` understands: a Hugging Face Hub id
  (offline, or with the Hub unreachable, it is read from the local cache) or a local
  dataset folder, with ``subset`` (the dataset configuration) and ``split``.

Relative paths are resolved against the working directory, as mergekit does for models.
Prompts are data: they are tokenised, never evaluated. ``datasets`` is imported only
when a source needs it.
"""

import json
import os
from dataclasses import dataclass
from typing import List, Optional

from mergekit_prodistill.errors import ProDistillError, one_line
from mergekit_prodistill.models.model_files import hub_id

PROMPT_FIELDS = ("text", "prompt", "instruction", "question", "problem")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
PROMPT_FILE_SUFFIXES = (".jsonl", ".txt", *DATA_FILE_BUILDERS)
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class Prompts:
    """An expert's calibration prompts and where they came from."""

    texts: List[str]
    source: str  # as the user named it, for logs, the report and the model card
    hub_dataset: Optional[str] = None  # the Hub id, when they came from a Hub dataset


def read_expert_prompts(params, where: str) -> Prompts:
    """All prompts of one expert's ``calibration:`` or ``dataset:`` source."""
    if params.dataset is not None:
        texts = read_dataset(params.dataset, params.subset, params.split, params.field)
        details = [x for x in (params.subset, params.split, params.field) if x]
        source = params.dataset + (f" ({', '.join(details)})" if details else "")
        return Prompts(texts, source, hub_id(params.dataset, kind="dataset"))
    path = params.calibration
    if not os.path.exists(path):
        raise ProDistillError(f"{where}: calibration path {path} does not exist")
    if os.path.isdir(path) and _is_saved_dataset(path):
        return Prompts(read_saved_dataset(path, params.split, params.field), path)
    if params.split is not None:
        raise ProDistillError(
            f"{where}: 'split' applies to datasets, and {path} is not one; remove it"
        )
    if os.path.isdir(path):
        return Prompts(read_folder(path, params.field), path)
    if params.field is not None and path.lower().endswith(".txt"):
        raise ProDistillError(
            f"{where}: 'field' names a column or JSON key, and {path} is a text file of one "
            "prompt per line; remove it")
    return Prompts(read_prompt_file(path, params.field), path)


def read_prompt_file(path: str, field: Optional[str] = None) -> List[str]:
    builder = DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder:
        return _dataset_prompts(_load_data_file(builder, path), path, field)
    lines = _read_lines(path)
    if path.endswith(".jsonl"):
        prompts = [p for number, line in lines if (p := _jsonl_prompt(path, number, line, field))]
    else:
        prompts = [line for _, line in lines]
    if not prompts:
        raise ProDistillError(f"calibration file {path} holds no prompts")
    return prompts


def read_prompts(path: str, field: Optional[str] = None) -> List[str]:
    """The prompts of one file."""
    if not os.path.isfile(path):
        raise ProDistillError(f"calibration file {path} does not exist")
    return read_prompt_file(path, field)


def read_folder(path: str, field: Optional[str] = None) -> List[str]:
    """Every prompt file in a folder and its sub-folders, in sorted order."""
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(PROMPT_FILE_SUFFIXES)]
    if not files:
        raise ProDistillError(
            f"calibration folder {path} holds no prompt files "
            f"({', '.join('*' + s for s in PROMPT_FILE_SUFFIXES)})"
        )
    return [p for f in files for p in read_prompt_file(f, field)]


def read_saved_dataset(path: str, split: Optional[str], field: Optional[str]) -> List[str]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise ProDistillError(f"saved dataset {path} cannot be loaded: {one_line(exc)}") from None
    if isinstance(data, datasets.DatasetDict):
        wanted = split or DEFAULT_SPLIT
        if wanted not in data:
            raise ProDistillError(
                f"dataset {path} has no split '{wanted}'; name one with 'split:' "
                f"(splits: {', '.join(data)})"
            )
        data = data[wanted]
    elif split is not None:
        raise ProDistillError(f"dataset {path} has no splits; remove 'split: {split}'")
    return _dataset_prompts(data, path, field)


def read_dataset(name: str, subset: Optional[str] = None, split: Optional[str] = None,
                 field: Optional[str] = None) -> List[str]:
    """A dataset by Hub id (from the local cache when offline) or local dataset folder."""
    if os.path.isdir(name) and _is_saved_dataset(name):
        if subset is not None:
            raise ProDistillError(f"dataset {name} was saved with save_to_disk and has no "
                                  f"subsets; remove 'subset: {subset}'")
        return read_saved_dataset(name, split, field)
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split or DEFAULT_SPLIT)
    except ConnectionError as exc:
        raise ProDistillError(
            f"dataset {name} is not in the local cache and the Hugging Face Hub cannot be "
            f"reached ({one_line(exc)}); load it once while online, or save it to a "
            "local file and name that with 'calibration:'"
        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise ProDistillError(f"dataset {name} cannot be loaded: {one_line(exc)}") from None
    return _dataset_prompts(data, name, field)


def _read_lines(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ProDistillError(
            f"calibration file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    except OSError as exc:
        raise ProDistillError(
            f"calibration file {path} cannot be read: {exc.strerror or exc}"
        ) from None
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def _jsonl_prompt(path: str, number: int, line: str, field: Optional[str]) -> Optional[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProDistillError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if isinstance(record, dict):
        keys = (field,) if field else PROMPT_FIELDS
        record = next((record[k] for k in keys if k in record), None)
    if not isinstance(record, str):
        wanted = repr(field) if field else " / ".join(repr(k) for k in PROMPT_FIELDS)
        raise ProDistillError(
            f"{path}:{number}: expected a string or an object with a {wanted} field"
            + ("" if field else " (name another with 'field:')")
        )
    return record if record.strip() else None


def _is_saved_dataset(path: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (
        os.path.isfile(os.path.join(path, "dataset_info.json"))
        and os.path.isfile(os.path.join(path, "state.json"))
    ) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _load_data_file(builder: str, path: str):
    import datasets

    try:
        # A data file on its own is one split, which datasets calls "train".
        return datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise ProDistillError(f"calibration file {path} cannot be read: {one_line(exc)}") from None


def _dataset_prompts(data, name: str, field: Optional[str]) -> List[str]:
    """The text column of a ``datasets.Dataset``, empty rows dropped."""
    columns = list(data.column_names)
    if field is None:
        field = next((c for c in PROMPT_FIELDS if c in columns), None)
        if field is None:
            raise ProDistillError(
                f"dataset {name} has no {' / '.join(repr(k) for k in PROMPT_FIELDS)} column; "
                f"name the prompt column with 'field:' (columns: {', '.join(columns)})"
            )
    elif field not in columns:
        raise ProDistillError(
            f"dataset {name} has no column '{field}' (columns: {', '.join(columns)})"
        )
    values = list(data.select_columns([field])[field])
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ProDistillError(
            f"dataset {name}: column '{field}' holds {type(bad).__name__} values, not text; "
            "name a text column with 'field:'"
        )
    prompts = [v for v in values if v and v.strip()]
    if not prompts:
        raise ProDistillError(f"dataset {name}: column '{field}' holds no prompts")
    return prompts
