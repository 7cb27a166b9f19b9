"""What the four OpenAI-style APIs share: the request shape, the ``usage`` object of chat
completions, completions and embeddings, the ``include_usage`` injection, and a base class.

Requests. OpenAI-compatible servers accept overlapping fields on these paths (vLLM's embeddings
endpoint takes chat ``messages``; servers differ in which output bound they read), and admission
must bound whatever a server may read. So the four APIs validate and estimate one request shape,
as the gateway always has: one of ``messages`` (chat), ``prompt`` (completions; a dict is a
Responses API prompt template) or ``input`` (embeddings, Responses API); the output bound is the
largest of ``max_completion_tokens`` (chat), ``max_output_tokens`` (Responses API) and
``max_tokens`` (chat, deprecated there; completions); ``n``/``best_of`` multiply it; ``instructions``
(Responses API) counts as a system prompt, ``tools`` (or the legacy ``functions``) by JSON size.
They differ in `OpenAIApi.injects_usage`: chat and completions streams report usage only when
asked (``stream_options.include_usage``); Responses API streams always do; embeddings do not
stream.

Usage (chat completions, completions, embeddings): ``usage.prompt_tokens``, ``completion_tokens``
(absent for embeddings: ``total_tokens - prompt_tokens``, else 0), ``total_tokens``,
``prompt_tokens_details.cached_tokens`` (part of the prompt) and
``completion_tokens_details.reasoning_tokens`` (part of the completion). In a stream, the latest
event with a non-null ``usage`` wins: the ``include_usage`` final chunk (``"choices": []``), or
vLLM's ``continuous_usage_stats``, which puts the cumulative usage on every chunk.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import orjson

from extproc.apis import _request as field
from extproc.apis.base import Api, BadRequest, EnvoyRule, RequestInfo, envoy_count, loads_object
from extproc.metering.estimate import estimate_prompt_tokens
from extproc.metering.usage import Usage, count

__all__ = [
    "MODEL_RULE",
    "USAGE_RULES",
    "OpenAIApi",
    "OpenAIStreamUsage",
    "add_include_usage",
    "chat_usage",
    "chat_usage_from_envoy",
    "clamped_usage",
    "detail",
    "is_include_usage_chunk",
    "may_hold_include_usage_chunk",
]

# Responses API: max_output_tokens; chat: max_completion_tokens, else the deprecated max_tokens.
MAX_KEYS = ("max_completion_tokens", "max_output_tokens", "max_tokens")

# The ``usage`` object of chat completions, completions and embeddings (bodies and chunks).
USAGE_RULES: tuple[EnvoyRule, ...] = (
    (("usage", "prompt_tokens"), "prompt_tokens"),
    (("usage", "completion_tokens"), "completion_tokens"),
    (("usage", "total_tokens"), "total_tokens"),
    (("usage", "prompt_tokens_details", "cached_tokens"), "cached_tokens"),
    (("usage", "completion_tokens_details", "reasoning_tokens"), "reasoning_tokens"),
)
MODEL_RULE: EnvoyRule = (("model",), "response_model")

_USAGE_OPTION = b'"stream_options":{"include_usage":true}'
# `"choices": []`, however spaced: only the include_usage chunk has no choices (a cheap test)
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def detail(usage: Mapping[str, object], section: str, key: str) -> int:
    details = usage.get(section)
    if isinstance(details, dict):
        return count(details.get(key)) or 0
    return 0


def clamped_usage(prompt: int, completion: int, cached: int, reasoning: int) -> Usage:
    """An OpenAI-style usage: ``cached`` is part of the prompt, ``reasoning`` part of the completion
    (each clamped to its total)."""
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(cached, prompt),
        reasoning_tokens=min(reasoning, completion),
    )


def chat_usage(usage: Mapping[str, object]) -> Usage | None:
    """Normalise one ``usage`` object of chat completions, completions or embeddings."""
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    if completion is None and usage.get("completion_tokens") is None:
        # Embeddings report only prompt_tokens and total_tokens.
        total = count(usage.get("total_tokens"))
        if prompt is not None and (total is None or total >= prompt):
            completion = 0 if total is None else total - prompt
    if prompt is None or completion is None:
        return None
    cached = detail(usage, "prompt_tokens_details", "cached_tokens")
    reasoning = detail(usage, "completion_tokens_details", "reasoning_tokens")
    return clamped_usage(prompt, completion, cached, reasoning)


def chat_usage_from_envoy(fields: Mapping[str, object]) -> Usage | None:
    """`chat_usage` over the tokenmeter.usage keys of `USAGE_RULES`."""
    prompt = envoy_count(fields.get("prompt_tokens"))
    if prompt is None:
        return None
    completion = envoy_count(fields.get("completion_tokens"))
    if completion is None:  # embeddings (or a malformed count: treated as absent, as in JSON)
        total = envoy_count(fields.get("total_tokens"))
        if total is None:
            completion = 0
        elif total >= prompt:
            completion = total - prompt
        else:
            return None
    cached = envoy_count(fields.get("cached_tokens")) or 0
    reasoning = envoy_count(fields.get("reasoning_tokens")) or 0
    return clamped_usage(prompt, completion, cached, reasoning)


def add_include_usage(body: bytes) -> bytes:
    """``body`` with ``stream_options.include_usage = true``, other fields and options kept.

    For a body that `OpenAIApi.parse_request` accepted. Without a ``stream_options`` key the option
    is spliced in after the opening brace, so the rest of the body is byte-for-byte unchanged (no
    re-serialisation); otherwise the body is parsed, merged and re-serialised. Raises `BadRequest`
    for a body that is not a JSON object.
    """
    stripped = body.lstrip()
    if stripped[:1] == b"{" and b'"stream_options"' not in body:
        rest = stripped[1:]
        separator = b"" if rest.lstrip()[:1] == b"}" else b","
        return b"{" + _USAGE_OPTION + separator + rest
    obj = field.load_object(body)
    options = obj.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    obj["stream_options"] = merged
    return orjson.dumps(obj)


def may_hold_include_usage_chunk(chunk: bytes) -> bool:
    return _EMPTY_CHOICES.search(chunk) is not None


def is_include_usage_chunk(obj: Mapping[str, object]) -> bool:
    """The chunk ``include_usage`` adds at the end of a stream: no choices, a usage object."""
    return obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _no_text(choice: Mapping[str, object]) -> int:
    return 0


class OpenAIStreamUsage:
    """Chat/completions/embeddings stream state: the latest non-null ``usage`` (cumulative), the
    first ``model``, and the output text of each choice (``choice_text_bytes``: the API's
    `OpenAIApi.chunk_choice_text_bytes`)."""

    __slots__ = ("_choice_text_bytes", "_usage", "model", "text_bytes", "text_pieces")

    def __init__(self, choice_text_bytes: Callable[[Mapping[str, object]], int] = _no_text) -> None:
        self.model: str | None = None
        self.text_bytes = 0
        self.text_pieces = 0
        self._usage: Usage | None = None
        self._choice_text_bytes = choice_text_bytes

    def feed(self, name: str | None, data: bytes) -> None:
        obj = loads_object(data)
        if obj is None:
            return
        if self.model is None:
            model = obj.get("model")
            if isinstance(model, str):
                self.model = model
        usage = obj.get("usage")
        if isinstance(usage, dict):
            reported = chat_usage(usage)
            if reported is not None:
                self._usage = reported  # the latest wins (vLLM continuous_usage_stats: cumulative)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    nbytes = self._choice_text_bytes(choice)
                    if nbytes:
                        self.text_bytes += nbytes
                        self.text_pieces += 1

    def usage(self) -> Usage | None:
        return self._usage

    def estimate(self, prompt_estimate: int, completion_tokens: int) -> Usage:
        return Usage(prompt_estimate, completion_tokens, estimated=True)


class OpenAIApi:
    """Base of the OpenAI-style API modules: the shared request shape (module docstring) and, by
    default, the chat/completions/embeddings ``usage`` object and the ``include_usage`` chunk.
    Subclasses set `api`, `path` and `injects_usage`, and say where their ``choices`` carry output
    text (`choice_text_bytes`, `chunk_choice_text_bytes`), or override what their responses carry."""

    __slots__ = ()

    api: Api
    path: str
    injects_usage = False  # the server reports a stream's usage only when asked
    # every field parse_request reads a maximum from (MAX_KEYS), the one added when none is given first
    output_keys: tuple[str, ...] = ("max_tokens", "max_completion_tokens", "max_output_tokens")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    # -- request ---------------------------------------------------------------------------------

    def parse_request(self, body: bytes) -> RequestInfo:
        obj, model, stream = field.load_request(body)
        messages = field.messages(obj, required=False)
        prompt = obj.get("prompt")
        if prompt is not None and not isinstance(prompt, str | list | dict):
            raise BadRequest("prompt must be a string or an array", "prompt")
        input_ = obj.get("input")
        if input_ is not None and not isinstance(input_, str | list):
            raise BadRequest("input must be a string or an array", "input")
        if messages is None and prompt is None and input_ is None:
            raise BadRequest("you must provide a messages parameter", "messages")

        include_usage = False
        options = obj.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise BadRequest("stream_options must be an object", "stream_options")
            include_usage = field.boolean(options, "include_usage", "stream_options.include_usage")

        n = max(field.count(obj, "n", 1) or 1, field.count(obj, "best_of", 1) or 1)
        tools = obj.get("tools") or obj.get("functions")
        text = prompt if isinstance(prompt, str | list) else input_
        # a chat or completions body: the shape whose streams report usage only on request
        wants_usage = stream and self.injects_usage and not include_usage
        return RequestInfo(
            api=self,
            model=model,
            stream=stream,
            max_output_tokens=field.max_output(obj, MAX_KEYS),
            prompt_tokens_estimate=estimate_prompt_tokens(
                messages=messages, system=obj.get("instructions"), tools=tools, prompt=text
            ),
            wants_usage_injection=wants_usage and (messages is not None or isinstance(prompt, str | list)),
            n=n,
        )

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        return add_include_usage(body) if self.injects_usage else None

    # -- response --------------------------------------------------------------------------------

    def usage_from_json(self, obj: Mapping[str, object]) -> Usage | None:
        usage = obj.get("usage")
        return chat_usage(usage) if isinstance(usage, dict) else None

    def choice_text_bytes(self, choice: Mapping[str, object]) -> int:
        """Output text bytes of one of a response body's ``choices`` (none by default)."""
        return 0

    def chunk_choice_text_bytes(self, choice: Mapping[str, object]) -> int:
        """Output text bytes of one of a stream chunk's ``choices`` (none by default)."""
        return 0

    def output_text_bytes(self, obj: Mapping[str, object]) -> int:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return 0
        return sum(self.choice_text_bytes(choice) for choice in choices if isinstance(choice, dict))

    def new_stream_usage(self) -> OpenAIStreamUsage:
        return OpenAIStreamUsage(self.chunk_choice_text_bytes)

    # The usage chunk exists where the proxy asks for it: the streams that report usage only then.

    def may_hold_usage_event(self, chunk: bytes) -> bool:
        return self.injects_usage and may_hold_include_usage_chunk(chunk)

    def is_usage_event(self, obj: Mapping[str, object]) -> bool:
        return self.injects_usage and is_include_usage_chunk(obj)

    # -- Envoy -----------------------------------------------------------------------------------

    def envoy_usage_rules(self) -> Sequence[EnvoyRule]:
        return (*USAGE_RULES, MODEL_RULE)

    def usage_from_envoy(self, fields: Mapping[str, object]) -> Usage | None:
        return chat_usage_from_envoy(fields)
