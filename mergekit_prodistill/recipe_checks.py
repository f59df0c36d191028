"""How a recipe's values are validated and refused: the pydantic errors of ``parameters:``
turned into one line, single values enforced where mergekit allows gradients, and
mergekit's ``chat_template``.

Each problem raises :class:`ProDistillError` (or returns the words for one) naming the
value and what is wrong with it; nothing here reads a weight or writes a file.
"""

import difflib
import importlib.resources
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
