"""Validation of request-body fields, shared by the API modules' ``parse_request``.

Error messages name the parameter, never echo the body.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.apis.base import BadRequest


def load_object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # str(exc) is orjson's message and position only, never the document.
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def load_request(body: bytes) -> tuple[dict[str, Any], str, bool]:
    """What every API's request body has: the JSON object, its ``model`` and its ``stream`` flag."""
    obj = load_object(body)
    return obj, model(obj), boolean(obj, "stream")


def model(obj: dict[str, Any]) -> str:
    value = obj.get("model")
    if value is None:
        raise BadRequest("you must provide a model parameter", "model")
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("model must be a non-empty string", "model")
    return value


def boolean(obj: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{param or key} must be a boolean", param or key)
    return value


def count(obj: dict[str, Any], key: str, minimum: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise BadRequest(f"{key} must be an integer", key)
    if value < minimum:
        raise BadRequest(f"{key} must be at least {minimum}", key)
    return value


def max_output(obj: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The largest of ``keys`` given (every given one must be a non-negative integer).

    The largest, not the first: servers differ in which field wins (vLLM takes
    ``max_completion_tokens or max_tokens``, so a 0 in one field would hide the other's bound).
    """
    given = [v for v in (count(obj, key, 0) for key in keys) if v is not None]
    return max(given) if given else None


def messages(obj: dict[str, Any], required: bool) -> list[Any] | None:
    value = obj.get("messages")
    if value is None:
        if required:
            raise BadRequest("you must provide a messages parameter", "messages")
        return None
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty array", "messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
    return value


def bound_output(body: bytes, keys: tuple[str, ...], asked: int | None, limit: int) -> bytes | None:
    """``body`` allowing no more than ``limit`` output tokens, or None when it already does.

    ``keys`` are the API's output-maximum fields, the first being the one to add to a request that
    names none: it is spliced in after the opening brace (the rest of the body is byte-for-byte
    unchanged). A request asking for more (``asked``) has every one of those fields it sets lowered
    to ``limit`` (parsed and re-serialised: the rare case). For a body `parse_request` accepted.
    """
    if not keys or (asked is not None and asked <= limit):
        return None
    if asked is None:
        stripped = body.lstrip()
        rest = stripped[1:]
        separator = b"" if rest.lstrip()[:1] == b"}" else b","
        return b'{"' + keys[0].encode() + b'":' + str(limit).encode() + separator + rest
    obj = load_object(body)
    for key in keys:
        if key in obj:
            obj[key] = limit
    return orjson.dumps(obj)
