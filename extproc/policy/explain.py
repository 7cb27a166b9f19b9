"""A schema failure as `file:line: reason`: the first (by line) of pydantic's errors, worded as the
loader words them, at the line of the YAML value (or key) its location names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from extproc.policy.errors import PolicyError
from extproc.policy.fields import PROBLEM
from extproc.policy.lines import Lines, Path, kind, where

# a key's errors about these fields name the key ("key 'web': sha256 must be ...")
_KEY_FIELDS = frozenset({"sha256", "models", "not_before", "expires", "reason", "previous"})

_TYPE_WORDS = {
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
}


def explain(error: ValidationError, data: Any, lines: Lines, source: str) -> PolicyError:
    """The PolicyError for `error`, raised validating `data` (whose lines are `lines`)."""
    found = [_one(detail, data, lines) for detail in error.errors(include_url=False)]
    line, reason = min(found, key=lambda f: f[0] if f[0] is not None else 1 << 62)
    return PolicyError(source, line, reason)


def _one(detail: ErrorDetails, data: Any, lines: Lines) -> tuple[int | None, str]:
    loc: Path = tuple(detail["loc"])
    on_key = bool(loc) and loc[-1] == "[key]"  # a mapping key that is not valid: `loc` names its entry
    if on_key:
        loc = loc[:-1]
    kind_ = detail["type"]
    ctx: Mapping[str, Any] = detail.get("ctx") or {}
    if kind_ == PROBLEM:
        at: Path = tuple(ctx.get("at") or ())
        at_key: Path = tuple(ctx.get("at_key") or ())
        subject = loc[:-1] if on_key else loc
        if on_key:
            line = lines.of_key(loc)
        elif at_key:
            line = lines.of_key((*loc, *at_key))
        else:
            line = lines.of((*loc, *at))
        reason = _fill(str(ctx.get("text", detail["msg"])), subject)
        return line, _key_prefix(data, (*loc, *at, *at_key)) + reason
    if kind_ == "missing":
        parent = loc[:-1]
        return lines.of(parent), f"missing required key '{loc[-1]}' in {where(parent) or 'the top level'}"
    if kind_ == "extra_forbidden":
        return lines.of_key(loc), f"unknown key '{loc[-1]}' in {where(loc[:-1]) or 'the top level'}"
    shown = where(loc) or "policy"
    if kind_ in _TYPE_WORDS:
        return lines.of(loc), f"{shown} must be {_TYPE_WORDS[kind_]}, got {kind(detail.get('input'))}"
    return lines.of(loc), f"{shown}: {detail['msg']}"


def _fill(text: str, path: Path) -> str:
    place = where(path)
    last = next((p for p in reversed(path) if isinstance(p, str)), "value")
    return (text.replace("{where}", place or "policy").replace("{place}", place or "the top level")
            .replace("{field}", last))


def _key_prefix(data: Any, path: Path) -> str:
    """"key 'ID': " for an error about one of a key's identifying fields, when the key has an id."""
    if len(path) < 3 or path[0] != "keys" or not isinstance(path[1], int) or path[2] not in _KEY_FIELDS:
        return ""
    keys = data.get("keys") if isinstance(data, dict) else None
    entry = keys[path[1]] if isinstance(keys, list) and path[1] < len(keys) else None
    key_id = entry.get("id") if isinstance(entry, dict) else None
    return f"key '{key_id}': " if isinstance(key_id, str) else ""
