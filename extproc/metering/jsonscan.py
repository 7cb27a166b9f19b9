"""Byte-level JSON scanning: cheap pre-filters and recovery from over-large bodies, without parsing.

Works on compact or spaced JSON. An unescaped ``"key":`` cannot occur inside a JSON string, so a
match of one is a real key. Total over arbitrary bytes: never raises.
"""

from __future__ import annotations

import orjson

__all__ = ["may_carry_usage", "object_end", "skip_ws", "string_value"]

_QUOTE = 0x22
_BACKSLASH = 0x5C
_WS = b" \t\r\n"


def skip_ws(data: bytes | bytearray, i: int) -> int:
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    return i


def _string_end(data: bytes | bytearray, start: int) -> int:
    """Index of the quote closing the JSON string whose content starts at ``start``; -1 if absent."""
    quote = data.find(b'"', start)
    while quote >= 0:
        back = quote - 1
        while back >= start and data[back] == _BACKSLASH:
            back -= 1
        if (quote - 1 - back) % 2 == 0:  # an even number of backslashes: not escaped
            return quote
        quote = data.find(b'"', quote + 1)
    return -1


def string_value(data: bytes, key: bytes) -> str | None:
    """The string value of the first ``key`` (e.g. ``b'"model":'``) whose value is a string."""
    at = data.find(key)
    while at >= 0:
        start = skip_ws(data, at + len(key))
        if start < len(data) and data[start] == _QUOTE:
            end = _string_end(data, start + 1)
            if end < 0:
                return None
            raw = data[start + 1 : end]
            if b"\\" not in raw:
                return raw.decode("utf-8", "replace")
            try:
                text = orjson.loads(data[start : end + 1])
            except orjson.JSONDecodeError:
                return None
            return text if isinstance(text, str) else None
        at = data.find(key, start)
    return None


def may_carry_usage(data: bytes) -> bool:
    """True if ``data`` has a ``"usage"`` key whose value is not null (cheap pre-filter)."""
    at = data.find(b'"usage"')
    while at >= 0:
        value = skip_ws(data, at + 7)
        if value < len(data) and data[value] == 0x3A:  # ':'
            value = skip_ws(data, value + 1)
        if not data.startswith(b"null", value):
            return True
        at = data.find(b'"usage"', value)
    return False


def object_end(data: bytes, start: int, limit: int) -> int:
    """Index just past the JSON object starting at ``data[start] == '{'``; -1 if not within limit."""
    depth = 0
    i = start
    stop = min(len(data), start + limit)
    while i < stop:
        c = data[i]
        if c == _QUOTE:
            end = _string_end(data, i + 1)
            if end < 0:
                return -1
            i = end
        elif c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1
