"""Incremental metering of one model-server response, chunk by chunk, off nothing but its bytes.

`ResponseMeter.feed` sees every response body chunk as it passes through the proxy;
`ResponseMeter.finish` gives the usage to settle with. Reported usage always wins; without it the
meter returns an estimate (``estimated=True``): the caller's prompt estimate plus the output text
seen, via `estimate_tokens_from_byte_count` (i.e. ``estimate_tokens_from_text`` of the concatenated
output, computed without building the string), never less than the number of non-empty output
deltas, since a streamed delta carries at least one token.

Streams (the caller says so: Content-Type ``text/event-stream``) are framed with `SSEFramer`.
Events that can carry neither usage nor output text are skipped without parsing, by their SSE
``event:`` name (Anthropic; Responses API) or a ``bytes.find`` pre-filter. The rest (in practice one
per generated chunk) are parsed once with orjson: measured, that is cheaper than scanning the bytes
for string values in Python (~0.6 us for a typical vLLM chunk). Output text counted for the fallback:

* OpenAI chat/completions chunks: ``delta.content``, ``delta.reasoning_content`` (else
  ``delta.reasoning``; vLLM sends both with the same text), ``delta.tool_calls[].function.arguments``,
  completions ``text``;
* OpenAI Responses API: ``delta`` of ``response.*.delta`` events;
* Anthropic ``content_block_delta``: ``delta.text``, ``delta.thinking``, ``delta.partial_json``.

Usage sources:

* OpenAI streams: the latest event with usage (the ``include_usage`` final chunk with
  ``choices: []``; vLLM's ``continuous_usage_stats`` puts cumulative usage on every chunk; Responses
  API ``response.completed``/``incomplete``/``failed`` carry ``response.usage``).
* Anthropic streams: input counts from ``message_start`` (``message.usage``), merged with the latest
  ``message_delta`` usage, whose ``output_tokens`` is cumulative. Usage counts as reported once a
  ``message_delta`` carried ``output_tokens``; a stream cut after ``message_start`` is estimated,
  but with the reported input counts and at least the reported output so far.
* Non-streaming bodies: the JSON body, buffered up to ``max_json_bytes`` and parsed at the end.
  Every supported server writes the top-level ``usage`` object last (or nearly), so for a body above
  ``PARSE_BYTES`` the usage object is first recovered from the body's last ``TAIL_BYTES`` without
  parsing the rest (an embeddings batch is megabytes of floats: ~17 ms to parse 4 MiB); only if
  that fails is the whole body parsed. A body above ``max_json_bytes`` stops being buffered: only a
  bounded tail window is kept (and ``model`` is taken from its first bytes), the usage is recovered
  from the tail, and if that fails it is estimated with no output text (such bodies are not
  scanned for text).

The body must be identity-encoded (not gzip).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from extproc.metering.estimate import (
    content_text_bytes,
    estimate_tokens_from_byte_count,
    message_text_bytes,
    utf8_len,
)
from extproc.metering.sse import SSEEvent, SSEFramer
from extproc.metering.usage import (
    Schema,
    Usage,
    anthropic_counts,
    anthropic_usage,
    openai_usage,
    usage_from_anthropic,
    usage_from_openai,
)

__all__ = ["DEFAULT_MAX_JSON_BYTES", "PARSE_BYTES", "TAIL_BYTES", "ResponseMeter", "Schema"]

DEFAULT_MAX_JSON_BYTES = 4 * 1024 * 1024
PARSE_BYTES = 256 * 1024  # a larger non-streaming body is parsed only if its tail lacks usage
TAIL_BYTES = 64 * 1024  # kept from the end of an over-large non-streaming body
_HEAD_SCAN_BYTES = 64 * 1024  # searched for "model" in an over-large non-streaming body
_USAGE_SCAN_BYTES = 16 * 1024  # longest usage object we recover from a tail

_QUOTE = 0x22
_BACKSLASH = 0x5C
_WS = b" \t\r\n"

_ANTHROPIC_DELTA_KEYS = ("text", "thinking", "partial_json")
_ANTHROPIC_PARSED = frozenset({"content_block_delta", "message_start", "message_delta"})

# -- byte-level JSON scanning (compact or spaced JSON), for pre-filters and over-large bodies ----


def _skip_ws(data: bytes, i: int) -> int:
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    return i


def _string_end(data: bytes, start: int) -> int:
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


def _string_value(data: bytes, key: bytes) -> str | None:
    """The string value of the first ``key`` (e.g. ``b'"model":'``) whose value is a string.

    An unescaped ``"key":`` cannot occur inside a JSON string, so every match is a real key.
    """
    at = data.find(key)
    while at >= 0:
        start = _skip_ws(data, at + len(key))
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


def _may_carry_usage(data: bytes) -> bool:
    """True if ``data`` has a ``"usage"`` key whose value is not null (cheap pre-filter)."""
    at = data.find(b'"usage"')
    while at >= 0:
        value = _skip_ws(data, at + 7)
        if value < len(data) and data[value] == 0x3A:  # ':'
            value = _skip_ws(data, value + 1)
        if not data.startswith(b"null", value):
            return True
        at = data.find(b'"usage"', value)
    return False


def _object_end(data: bytes, start: int, limit: int) -> int:
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


def _usage_from_tail(tail: bytes, schema: Schema) -> Usage | None:
    """The usage object nearest the end of ``tail`` (the top-level one in every supported format)."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        value = _skip_ws(tail, at + 7)
        if value < len(tail) and tail[value] == 0x3A:
            value = _skip_ws(tail, value + 1)
            if value < len(tail) and tail[value] == 0x7B:
                end = _object_end(tail, value, _USAGE_SCAN_BYTES)
                if end > 0:
                    try:
                        obj = orjson.loads(tail[value:end])
                    except orjson.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict):
                        if schema is Schema.OPENAI:
                            return openai_usage(obj)
                        return anthropic_usage(anthropic_counts(obj))
        at = tail.rfind(b'"usage"', 0, at)
    return None


# -- the meter -----------------------------------------------------------------------------------


class ResponseMeter:
    """Meters one response. Not thread-safe; one instance per response. Never raises on bad input."""

    __slots__ = (
        "_anthropic",
        "_anthropic_final",
        "_body",
        "_finished",
        "_framer",
        "_overflowed",
        "_parsed",
        "_parsed_len",
        "_tail",
        "_usage",
        "bytes_seen",
        "content_bytes",
        "content_pieces",
        "max_json_bytes",
        "response_model",
        "schema",
        "streaming",
    )

    def __init__(self, schema: Schema, streaming: bool, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        self.schema = schema
        self.streaming = streaming
        self.max_json_bytes = max_json_bytes
        self.response_model: str | None = None
        self.bytes_seen = 0
        self.content_bytes = 0  # UTF-8 bytes of output text seen (fallback counting)
        self.content_pieces = 0  # non-empty output text values seen
        self._framer: SSEFramer | None = SSEFramer(max_json_bytes) if streaming else None
        self._usage: Usage | None = None  # OpenAI stream: latest reported usage
        self._anthropic: dict[str, int] = {}  # Anthropic stream: merged usage counts
        self._anthropic_final = False  # a message_delta reported output_tokens
        self._body = bytearray()  # non-streaming: the body so far (until it overflows)
        self._overflowed = False
        self._tail = bytearray()  # non-streaming, overflowed: the last TAIL_BYTES
        self._parsed: object = None  # non-streaming: the parsed body, cached
        self._parsed_len = -1  # length of the body when _parsed was computed
        self._finished = False

    @property
    def dropped_events(self) -> int:
        """SSE events dropped for exceeding ``max_json_bytes``."""
        return 0 if self._framer is None else self._framer.dropped_events

    @property
    def saw_usage(self) -> bool:
        """True when the server's own final usage has been seen (`finish` will not estimate).

        Streams: as soon as the usage event has passed. Non-streaming: once the body is complete JSON
        with usage (or, for an over-large body, once its tail holds a usage object).
        """
        return self._reported() is not None

    def feed(self, chunk: bytes) -> None:
        """Consume one response body chunk. Ignored after `finish`."""
        if self._finished or not chunk:
            return
        self.bytes_seen += len(chunk)
        if self._framer is not None:
            for event in self._framer.feed(chunk):
                self._on_event(event)
            return
        if self._overflowed:
            self._keep_tail(chunk)
        elif len(self._body) + len(chunk) > self.max_json_bytes:
            self._overflowed = True
            if self.response_model is None:
                self.response_model = _string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
            self._keep_tail(self._body)
            self._keep_tail(chunk)
            self._body = bytearray()
        else:
            self._body += chunk

    def finish(self, prompt_estimate: int) -> Usage:
        """The usage to settle with: reported if seen, else estimated. May be called again."""
        if not self._finished:
            self._finished = True
            if self._framer is not None:
                for event in self._framer.close():
                    self._on_event(event)
        reported = self._reported()
        if reported is not None:
            return reported
        return self._estimate(max(0, prompt_estimate))

    # -- internals -------------------------------------------------------------------------------

    def _keep_tail(self, data: bytes | bytearray) -> None:
        self._tail += data[-TAIL_BYTES:]
        if len(self._tail) > TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]

    def _reported(self) -> Usage | None:
        if self.streaming:
            if self.schema is Schema.OPENAI:
                return self._usage
            return anthropic_usage(self._anthropic) if self._anthropic_final else None
        if self._overflowed or len(self._body) > PARSE_BYTES:
            # Large body: the usage object is at its end; parsing all of it (an embeddings batch is
            # megabytes of floats, ~4 ms per MiB) would stall the event loop for nothing.
            tail = self._tail if self._overflowed else self._body[-TAIL_BYTES:]
            usage = _usage_from_tail(bytes(tail), self.schema)
            if self.response_model is None and not self._overflowed:
                self.response_model = _string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
            if usage is not None or self._overflowed:
                return usage
        obj = self._parse_body()
        if obj is None:
            return None
        if self.schema is Schema.OPENAI:
            return usage_from_openai(obj)
        return usage_from_anthropic(obj)

    def _parse_body(self) -> Mapping[str, object] | None:
        if self._parsed_len != len(self._body):
            self._parsed_len = len(self._body)
            try:
                self._parsed = orjson.loads(self._body) if self._body else None
            except orjson.JSONDecodeError:
                self._parsed = None
            model = self._parsed.get("model") if isinstance(self._parsed, dict) else None
            if isinstance(model, str):
                self.response_model = model
            elif self.response_model is None and self._body:  # malformed: look for it anyway
                self.response_model = _string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
        return self._parsed if isinstance(self._parsed, dict) else None

    def _estimate(self, prompt_estimate: int) -> Usage:
        if not self.streaming:
            self._count_body_text()
        completion = max(estimate_tokens_from_byte_count(self.content_bytes), self.content_pieces)
        counts = self._anthropic
        if "input_tokens" in counts:  # Anthropic stream cut after message_start: its input is known
            base = anthropic_usage({**counts, "output_tokens": counts.get("output_tokens", 0)})
            if base is not None:
                return Usage(
                    prompt_tokens=base.prompt_tokens,
                    completion_tokens=max(completion, base.completion_tokens),
                    cached_tokens=base.cached_tokens,
                    cache_creation_tokens=base.cache_creation_tokens,
                    estimated=True,
                )
        return Usage(
            prompt_tokens=prompt_estimate,
            completion_tokens=max(completion, counts.get("output_tokens", 0)),
            estimated=True,
        )

    def _count_body_text(self) -> None:
        """Output text of a parsed non-streaming body without usage (once)."""
        obj = None if self._overflowed else self._parse_body()
        if obj is None or self.content_bytes or self.content_pieces:
            return
        nbytes = 0
        if self.schema is Schema.ANTHROPIC:
            nbytes = content_text_bytes(obj.get("content"))
        else:
            choices = obj.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    if isinstance(choice, dict):
                        nbytes += message_text_bytes(choice.get("message"))
                        text = choice.get("text")  # completions
                        if isinstance(text, str):
                            nbytes += utf8_len(text)
            output = obj.get("output")  # Responses API
            if isinstance(output, list):
                nbytes += sum(message_text_bytes(item) for item in output)
        self.content_bytes = nbytes
        self.content_pieces = 1 if nbytes else 0

    def _on_event(self, event: SSEEvent) -> None:
        data = event.data
        if data[:1] != b"{":
            return  # "[DONE]" and anything else that is not a JSON object
        if self.schema is Schema.OPENAI:
            self._on_openai_event(event.event, data)
        else:
            self._on_anthropic_event(event.event, data)

    def _add_text(self, nbytes: int) -> None:
        if nbytes:
            self.content_bytes += nbytes
            self.content_pieces += 1

    def _on_openai_event(self, name: str | None, data: bytes) -> None:
        if name is not None and name.startswith("response."):
            # Responses API: output text only in *.delta events, usage only in terminal events.
            if not name.endswith(".delta") and not _may_carry_usage(data):
                return
        obj = _loads(data)
        if obj is None:
            return
        response = obj.get("response")  # Responses API events wrap the response object
        if self.response_model is None:
            model = obj.get("model")
            if model is None and isinstance(response, dict):
                model = response.get("model")
            if isinstance(model, str):
                self.response_model = model
        if obj.get("usage") is not None or response is not None:
            usage = usage_from_openai(obj)
            if usage is not None:
                self._usage = usage  # the latest wins (vLLM continuous_usage_stats: cumulative)
        kind = obj.get("type")
        if isinstance(kind, str):  # a Responses API event
            delta = obj.get("delta")
            if isinstance(delta, str) and kind.endswith(".delta"):
                self._add_text(utf8_len(delta))
            return
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._add_text(_choice_text_bytes(choice))

    def _on_anthropic_event(self, name: str | None, data: bytes) -> None:
        if name is not None:
            if name not in _ANTHROPIC_PARSED:
                return  # ping, content_block_start/stop, message_stop, error
        elif b'"usage"' not in data and b"content_block_delta" not in data:
            return
        obj = _loads(data)
        if obj is None:
            return
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                nbytes = 0
                for key in _ANTHROPIC_DELTA_KEYS:
                    text = delta.get(key)
                    if isinstance(text, str):
                        nbytes += utf8_len(text)
                self._add_text(nbytes)
            return
        if kind == "message_start":
            message = obj.get("message")
            if not isinstance(message, dict):
                return
            model = message.get("model")
            if isinstance(model, str):
                self.response_model = model
            usage = message.get("usage")
        elif kind == "message_delta":
            usage = obj.get("usage")
        else:
            return
        if isinstance(usage, dict):
            counts = anthropic_counts(usage)
            self._anthropic.update(counts)  # message_delta counts are cumulative: latest wins
            if kind == "message_delta" and "output_tokens" in counts:
                self._anthropic_final = True


def _choice_text_bytes(choice: Mapping[str, object]) -> int:
    """Output text bytes of one streamed choice: chat ``delta`` or completions ``text``."""
    text = choice.get("text")
    nbytes = utf8_len(text) if isinstance(text, str) else 0
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return nbytes
    content = delta.get("content")
    if isinstance(content, str):
        nbytes += utf8_len(content)
    # vLLM sends `reasoning` and its deprecated alias `reasoning_content` with the same text.
    reasoning = delta.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = delta.get("reasoning")
    if isinstance(reasoning, str):
        nbytes += utf8_len(reasoning)
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                nbytes += utf8_len(arguments)
    return nbytes


def _loads(data: bytes) -> Mapping[str, object] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
