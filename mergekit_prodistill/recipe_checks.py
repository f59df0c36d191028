"""How a recipe's values are validated and refused: the pydantic errors of ``parameters:``
turned into one line, single values enforced where mergekit allows gradients, the
folders a merge writes, and mergekit's ``chat_template``.

Each problem raises :class:`ProDistillError` (or returns the words for one) naming the
value and what is wrong with it; nothing here reads a weight or writes a file.
"""

import difflib
import importlib.resources
import os
from typing import Any, Dict, Optional

from mergekit.config import ConditionalParameter
from pydantic import ValidationError

from mergekit_prodistill.errors import ProDistillError


def plain(raw: Optional[Dict[str, Any]], where: str) -> Dict[str, Any]:
    """Reject mergekit's gradients and filters: ProDistill settings are single values."""
    out = {}
    for key, value in (raw or {}).items():
        if isinstance(value, (list, ConditionalParameter)):
            raise ProDistillError(
                f"{where}: parameter '{key}' must be a single value; prodistill does not "
                "support mergekit's per-layer gradients or filters"
            )
        out[key] = value
    return out


def validated(schema, raw: Dict[str, Any], where: str):
    """``raw`` validated by the pydantic ``schema``; its first problem as one line."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a check across several keys
            raise ProDistillError(f"{where}: {err['ctx']['error']}") from None
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, schema.model_fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(schema.model_fields)
            raise ProDistillError(
                f"{where}: unknown parameter '{key}'{hint}; valid keys: {valid}"
            ) from None
        if err["type"] == "missing":
            raise ProDistillError(f"{where}: missing required parameter '{key}'") from None
        # Our own validators' words, without pydantic's "Value error, " in front.
        why = err["ctx"]["error"] if err["type"] == "value_error" else err["msg"]
        raise ProDistillError(f"{where}: parameter '{key}' = {err.get('input')!r}: {why}") from None


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


def check_chat_template(value: Optional[str]) -> None:
    """mergekit's rule for ``chat_template``, which it applies only after the whole merge:
    ``auto``, one of its presets, or a Jinja template (at least 20 characters, with ``{``)."""
    from mergekit._data import chat_templates

    presets = sorted(f.name[:-len(".jinja")] for f in
                     importlib.resources.files(chat_templates).iterdir()
                     if f.name.endswith(".jinja"))
    if value is None or value == "auto" or value in presets or (
            len(value) >= 20 and "{" in value):
        return
    raise ProDistillError(
        f"recipe: chat_template {value!r} is not auto, one of mergekit's presets "
        f"({', '.join(presets)}) or a Jinja template"
    )
