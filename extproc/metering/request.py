"""Request-body parsing for admission: validate, bound and estimate an LLM API request.

Pure functions over the raw body. Error messages never echo the body (prompts are not logged or
returned): they name the offending parameter only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from extproc.metering.estimate import estimate_prompt_tokens
from extproc.metering.usage import Schema

__all__ = [
    "BadRequest",
    "RequestInfo",
    "Schema",
    "inject_stream_usage",
    "parse_request",
    "schema_for_path",
]

_PATHS: dict[str, Schema] = {
    "/v1/chat/completions": Schema.OPENAI,
    "/v1/completions": Schema.OPENAI,
    "/v1/embeddings": Schema.OPENAI,
    "/v1/responses": Schema.OPENAI,
    "/v1/messages": Schema.ANTHROPIC,
}

# OpenAI: max_completion_tokens (chat) is preferred over the deprecated max_tokens; the Responses
# API calls it max_output_tokens.
_OPENAI_MAX_KEYS = ("max_completion_tokens", "max_output_tokens", "max_tokens")


class BadRequest(Exception):
    """The request is malformed: answer 400 with an OpenAI-style ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What admission needs to know about a request.

    ``max_output_tokens`` is the client's own bound (None when absent); ``n`` is how many
    completions the request asks for (OpenAI ``n`` / ``best_of``; 1 otherwise), so the most the
    response may add is ``n * max_output_tokens``. ``wants_usage_injection``: an OpenAI
    chat/completions stream that did not ask for ``stream_options.include_usage``; the proxy should
    `inject_stream_usage` so the model server reports usage at the end of the stream.
    """

    schema: Schema
    model: str
    stream: bool
    max_output_tokens: int | None
    prompt_tokens_estimate: int
    wants_usage_injection: bool
    n: int = 1


def normalize_path(path: str) -> str:
    """The path as a model server will route it: query, fragment and ``;params`` dropped,
    percent-escapes decoded, ``.`` segments and repeated or trailing slashes removed, lowercased.

    Matching on this (not on the raw ``:path``) keeps ``/v1//chat/completions``,
    ``/v1/%63hat/completions`` or ``/V1/chat/completions/`` from passing as unmetered paths.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    path = unquote(unquote(path))  # twice: a double-encoded escape is decoded by some servers too
    segments = [seg.split(";", 1)[0] for seg in path.split("/")]
    parts: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts:
                parts.pop()
            continue
        parts.append(seg)
    return "/" + "/".join(parts).lower()


def schema_for_path(path: str) -> Schema | None:
    """The API schema of a metered inference path (see `normalize_path`)."""
    return _PATHS.get(normalize_path(path))


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # str(exc) is orjson's message and position only, never the document.
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def _bool(obj: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{param or key} must be a boolean", param or key)
    return value


def _count(obj: dict[str, Any], key: str, minimum: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise BadRequest(f"{key} must be an integer", key)
    if value < minimum:
        raise BadRequest(f"{key} must be at least {minimum}", key)
    return value


def _max_output(obj: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The largest of ``keys`` given (every given one must be a non-negative integer).

    The largest, not the first: servers differ in which field wins (vLLM takes
    ``max_completion_tokens or max_tokens``, so a 0 in one field would hide the other's bound).
    """
    given = [v for v in (_count(obj, key, 0) for key in keys) if v is not None]
    return max(given) if given else None


def _messages(obj: dict[str, Any], required: bool) -> list[Any] | None:
    messages = obj.get("messages")
    if messages is None:
        if required:
            raise BadRequest("you must provide a messages parameter", "messages")
        return None
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
    return messages


def _model(obj: dict[str, Any]) -> str:
    model = obj.get("model")
    if model is None:
        raise BadRequest("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model must be a non-empty string", "model")
    return model


def parse_request(body: bytes, schema: Schema) -> RequestInfo:
    """Validate a request body and estimate its prompt. Raises `BadRequest` (400) on bad input.

    OpenAI: one of ``messages`` (chat), ``prompt`` (completions; a dict is a Responses API prompt
    template) or ``input`` (embeddings, Responses API). Anthropic: ``messages``.
    """
    obj = _load_object(body)
    model = _model(obj)
    stream = _bool(obj, "stream")
    if schema is Schema.ANTHROPIC:
        return _anthropic(obj, model, stream)
    return _openai(obj, model, stream)


def _anthropic(obj: dict[str, Any], model: str, stream: bool) -> RequestInfo:
    messages = _messages(obj, required=True)
    system = obj.get("system")
    if system is not None and not isinstance(system, str | list):
        raise BadRequest("system must be a string or an array", "system")
    return RequestInfo(
        schema=Schema.ANTHROPIC,
        model=model,
        stream=stream,
        max_output_tokens=_max_output(obj, ("max_tokens",)),
        prompt_tokens_estimate=estimate_prompt_tokens(
            messages=messages, system=system, tools=obj.get("tools")
        ),
        wants_usage_injection=False,
    )


def _openai(obj: dict[str, Any], model: str, stream: bool) -> RequestInfo:
    messages = _messages(obj, required=False)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list | dict):
        raise BadRequest("prompt must be a string or an array", "prompt")
    input_ = obj.get("input")
    if input_ is not None and not isinstance(input_, str | list):
        raise BadRequest("input must be a string or an array", "input")
    if messages is None and prompt is None and input_ is None:
        raise BadRequest("you must provide a messages parameter", "messages")
    # Chat and completions stream usage only on request; Responses API streams always report it.
    chat_or_completions = messages is not None or isinstance(prompt, str | list)

    include_usage = False
    options = obj.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        include_usage = _bool(options, "include_usage", "stream_options.include_usage")

    n = max(_count(obj, "n", 1) or 1, _count(obj, "best_of", 1) or 1)
    system = obj.get("instructions")  # Responses API
    tools = obj.get("tools") or obj.get("functions")
    text = prompt if isinstance(prompt, str | list) else input_
    return RequestInfo(
        schema=Schema.OPENAI,
        model=model,
        stream=stream,
        max_output_tokens=_max_output(obj, _OPENAI_MAX_KEYS),
        prompt_tokens_estimate=estimate_prompt_tokens(
            messages=messages, system=system, tools=tools, prompt=text
        ),
        wants_usage_injection=stream and chat_or_completions and not include_usage,
        n=n,
    )


_USAGE_OPTION = b'"stream_options":{"include_usage":true}'


def inject_stream_usage(body: bytes) -> bytes:
    """``body`` with ``stream_options.include_usage = true``, other fields and options kept.

    For a body that `parse_request` accepted. Without a ``stream_options`` key the option is spliced
    in after the opening brace, so the rest of the body is byte-for-byte unchanged (no
    re-serialisation); otherwise the body is parsed, merged and re-serialised.
    """
    stripped = body.lstrip()
    if stripped[:1] == b"{" and b'"stream_options"' not in body:
        rest = stripped[1:]
        separator = b"" if rest.lstrip()[:1] == b"}" else b","
        return b"{" + _USAGE_OPTION + separator + rest
    obj = _load_object(body)
    options = obj.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    obj["stream_options"] = merged
    return orjson.dumps(obj)
