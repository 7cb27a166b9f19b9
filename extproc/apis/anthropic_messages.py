"""Anthropic Messages: ``POST /v1/messages``.

Request: ``messages`` (required), ``system`` (a string or text blocks), ``tools``, ``max_tokens``.
Streams always report usage: nothing to inject.

Response: ``usage`` with ``input_tokens``, ``output_tokens``, ``cache_creation_input_tokens``
(cache writes) and ``cache_read_input_tokens`` (cache reads); the cache counts are *in addition
to* ``input_tokens``. Normalised so that ``prompt_tokens = input_tokens + cache writes + cache
reads``: every input token the model processed, exactly as OpenAI's ``prompt_tokens`` includes its
cached part, with ``cached_tokens`` = the reads and ``cache_creation_tokens`` = the writes (both
inside ``prompt_tokens``), for pricing that treats them differently.

Streams: ``message_start`` carries the input counts (``message.usage``, with a placeholder
``output_tokens``); every ``message_delta`` carries ``usage`` with the *cumulative*
``output_tokens`` (and, from newer servers, cumulative input and cache counts). The stream's usage
is the ``message_start`` counts overridden field by field by the latest ``message_delta``; it
counts as reported once a ``message_delta`` carried ``output_tokens``. A stream cut before that
is estimated, but with the reported input counts and at least the reported output so far. Output
text: ``content_block_delta`` events' ``delta.text``, ``delta.thinking``, ``delta.partial_json``;
a body's ``content`` blocks. Events are named (``event: message_start``), so the others (ping,
content_block_start/stop, message_stop, error) are skipped without parsing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from extproc.apis import _request as field
from extproc.apis.base import Api, BadRequest, EnvoyRule, RequestInfo, envoy_count, loads_object
from extproc.metering.estimate import content_text_bytes, estimate_prompt_tokens, utf8_len
from extproc.metering.usage import Usage, count

__all__ = ["API", "AnthropicMessages", "anthropic_counts", "anthropic_usage"]

_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_DELTA_KEYS = ("text", "thinking", "partial_json")
_PARSED = frozenset({"content_block_delta", "message_start", "message_delta"})

# message_start's output_tokens is a placeholder (1): not read, so that a stream cut after
# message_start does not look complete.
_RULES: tuple[EnvoyRule, ...] = (
    *((("usage", key), key) for key in _KEYS),
    *((("message", "usage", key), key) for key in _KEYS if key != "output_tokens"),
    (("model",), "response_model"),
    (("message", "model"), "response_model"),
)


def anthropic_counts(usage: Mapping[str, object]) -> dict[str, int]:
    """The valid token fields present in one ``usage`` object (possibly partial, as in a
    ``message_delta``). Streams merge these: later fields override earlier ones."""
    out: dict[str, int] = {}
    for key in _KEYS:
        value = count(usage.get(key))
        if value is not None:
            out[key] = value
    return out


def anthropic_usage(counts: Mapping[str, int]) -> Usage | None:
    """A Usage from merged counts; None unless both input and output tokens are known."""
    input_tokens = counts.get("input_tokens")
    output_tokens = counts.get("output_tokens")
    if input_tokens is None or output_tokens is None:
        return None
    cache_write = counts.get("cache_creation_input_tokens", 0)
    cache_read = counts.get("cache_read_input_tokens", 0)
    return Usage(
        prompt_tokens=input_tokens + cache_write + cache_read,
        completion_tokens=output_tokens,
        cached_tokens=cache_read,
        cache_creation_tokens=cache_write,
    )


class _AnthropicStreamUsage:
    __slots__ = ("_counts", "_final", "model", "text_bytes", "text_pieces")

    def __init__(self) -> None:
        self.model: str | None = None
        self.text_bytes = 0
        self.text_pieces = 0
        self._counts: dict[str, int] = {}  # merged usage counts
        self._final = False  # a message_delta reported output_tokens

    def feed(self, name: str | None, data: bytes) -> None:
        if name is not None:
            if name not in _PARSED:
                return  # ping, content_block_start/stop, message_stop, error
        elif b'"usage"' not in data and b"content_block_delta" not in data:
            return
        obj = loads_object(data)
        if obj is None:
            return
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                nbytes = 0
                for key in _DELTA_KEYS:
                    text = delta.get(key)
                    if isinstance(text, str):
                        nbytes += utf8_len(text)
                if nbytes:
                    self.text_bytes += nbytes
                    self.text_pieces += 1
            return
        usage: Any
        if kind == "message_start":
            message = obj.get("message")
            if not isinstance(message, dict):
                return
            model = message.get("model")
            if isinstance(model, str):
                self.model = model
            usage = message.get("usage")
        elif kind == "message_delta":
            usage = obj.get("usage")
        else:
            return
        if isinstance(usage, dict):
            counts = anthropic_counts(usage)
            self._counts.update(counts)  # message_delta counts are cumulative: latest wins
            if kind == "message_delta" and "output_tokens" in counts:
                self._final = True

    def usage(self) -> Usage | None:
        return anthropic_usage(self._counts) if self._final else None

    def estimate(self, prompt_estimate: int, completion_tokens: int) -> Usage:
        counts = self._counts
        if "input_tokens" in counts:  # cut after message_start: its input is known
            base = anthropic_usage({**counts, "output_tokens": counts.get("output_tokens", 0)})
            if base is not None:
                return Usage(
                    prompt_tokens=base.prompt_tokens,
                    completion_tokens=max(completion_tokens, base.completion_tokens),
                    cached_tokens=base.cached_tokens,
                    cache_creation_tokens=base.cache_creation_tokens,
                    estimated=True,
                )
        return Usage(
            prompt_tokens=prompt_estimate,
            completion_tokens=max(completion_tokens, counts.get("output_tokens", 0)),
            estimated=True,
        )


class AnthropicMessages:
    __slots__ = ()

    api = Api.API_ANTHROPIC_MESSAGES
    path = "/v1/messages"
    output_keys = ("max_tokens",)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    def parse_request(self, body: bytes) -> RequestInfo:
        obj, model, stream = field.load_request(body)
        messages = field.messages(obj, required=True)
        system = obj.get("system")
        if system is not None and not isinstance(system, str | list):
            raise BadRequest("system must be a string or an array", "system")
        return RequestInfo(
            api=self,
            model=model,
            stream=stream,
            max_output_tokens=field.max_output(obj, ("max_tokens",)),
            prompt_tokens_estimate=estimate_prompt_tokens(messages=messages, system=system, tools=obj.get("tools")),
            wants_usage_injection=False,
        )

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        return None

    def usage_from_json(self, obj: Mapping[str, object]) -> Usage | None:
        """Of a body, or of a ``message_start`` event (``message.usage``)."""
        usage = obj.get("usage")
        if usage is None:
            message = obj.get("message")
            if isinstance(message, dict):
                usage = message.get("usage")
        return anthropic_usage(anthropic_counts(usage)) if isinstance(usage, dict) else None

    def output_text_bytes(self, obj: Mapping[str, object]) -> int:
        return content_text_bytes(obj.get("content"))

    def new_stream_usage(self) -> _AnthropicStreamUsage:
        return _AnthropicStreamUsage()

    def may_hold_usage_event(self, chunk: bytes) -> bool:
        return False

    def is_usage_event(self, obj: Mapping[str, object]) -> bool:
        return False

    def envoy_usage_rules(self) -> Sequence[EnvoyRule]:
        return _RULES

    def usage_from_envoy(self, fields: Mapping[str, object]) -> Usage | None:
        counts: dict[str, int] = {}
        for key in _KEYS:
            value = envoy_count(fields.get(key))
            if value is not None:
                counts[key] = value
        return anthropic_usage(counts)


API = AnthropicMessages()
