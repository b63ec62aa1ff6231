"""Validation problems as one line each, for a user who will fix the file.

``section.key: what is wrong, got <value>`` for a bad value; ``unknown key section.key: did
you mean <key>? (valid keys in [section]: ...)`` for a misspelt or unknown key; rows of an
array of tables numbered from 1 (``silos #2.kind``).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["problems_of"]


_PHRASES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must be a lower-case word (letters, digits, underscores)",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "too_short": "must not be empty",
}


def problems_of(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: where (``section.key``), what is wrong, and what was given."""
    out = []
    prefix = getattr(model, "section", "")
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        where = _where(((prefix,) if prefix else ()) + loc)
        kind, given = error["type"], error.get("input")
        if kind == "extra_forbidden":
            out.append(_unknown(loc, model, prefix))
        elif kind == "missing":
            out.append(f"{where}: is required")
        elif kind.startswith("value_error") or kind == "assertion_error":
            message = str(error["msg"]).removeprefix("Value error, ")
            out.append(f"{where}: {message}" if loc else message)
        elif kind == "literal_error":
            expected = str(error.get("ctx", {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
            out.append(f"{where}: must be one of {expected}, got {given!r}")
        elif kind in _PHRASES:
            ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in error.get("ctx", {}).items()}
            out.append(f"{where}: {_PHRASES[kind].format(**ctx)}, got {given!r}")
        else:
            out.append(f"{where}: {str(error['msg']).lower().replace('input should be', 'must be')}, got {given!r}")
    return out


def _where(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]} #{item + 1}" if parts else f"#{item + 1}"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _unknown(loc: tuple[Any, ...], model: type[BaseModel], prefix: str) -> str:
    """``unknown key federation.round: did you mean rounds? (valid keys in [federation]: ...)``."""
    owner: Any = model
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = owner.model_fields.get(str(item)) or next(
            (f for f in owner.model_fields.values() if f.alias == item), None
        )
        owner = _settings_class(getattr(field, "annotation", None)) or owner
    valid = sorted(f.alias or name for name, f in owner.model_fields.items() if name != "source")
    key = str(loc[-1])
    section = _where(((prefix,) if prefix else ()) + loc[:-1])
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]}?" if close else ""
    place = f"[{section}]" if section else "the top level"
    return f"unknown key {section + '.' if section else ''}{key}{hint} (valid keys in {place}: {', '.join(valid)})"


def _settings_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _settings_class(arg)
        if found is not None:
            return found
    return None
