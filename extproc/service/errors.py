"""OpenAI-style error bodies for immediate responses. Never echo a key or a prompt."""

from __future__ import annotations

import orjson


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
