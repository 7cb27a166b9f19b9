"""Incremental metering of one model-server response, chunk by chunk, off nothing but its bytes.

`ResponseMeter` is schema-independent: what a response of its API looks like (where the usage is,
which events carry output text) is the `ApiSchema`'s (extproc.apis), which it drives.
`ResponseMeter.feed` sees every response body chunk as it passes through the proxy;
`ResponseMeter.finish` gives the usage to settle with. Reported usage always wins; without it the
meter returns an estimate (``estimated=True``): the caller's prompt estimate plus the output text
seen, via `estimate_tokens_from_byte_count` (i.e. ``estimate_tokens_from_text`` of the concatenated
output, computed without building the string), never less than the number of non-empty output
pieces, since a streamed delta carries at least one token; corrected by any partial counts the
stream reported (`StreamUsage.estimate`).

Streams (the caller says so: Content-Type ``text/event-stream``) are framed with `SSEFramer`; each
event whose data is a JSON object goes to the API's `StreamUsage` (`ApiSchema.new_stream_usage`),
which skips the events that can carry neither usage nor output text without parsing them, and
parses the rest once.

Non-streaming bodies: the JSON body, buffered up to ``max_json_bytes`` and parsed at the end
(`ApiSchema.usage_from_json`, `ApiSchema.output_text_bytes`). Every supported server writes the
top-level ``usage`` object last (or nearly), so for a body above ``PARSE_BYTES`` the usage object
is first recovered from the body's last ``TAIL_BYTES`` without parsing the rest (an embeddings
batch is megabytes of floats: ~17 ms to parse 4 MiB); only if that fails is the whole body parsed.
A body above ``max_json_bytes`` stops being buffered: only a bounded tail window is kept (and
``model`` is taken from its first bytes), the usage is recovered from the tail, and if that fails it
is estimated with no output text (such bodies are not scanned for text).

The body must be identity-encoded (not gzip).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from extproc.apis.base import ApiSchema, StreamUsage
from extproc.metering.estimate import estimate_tokens_from_byte_count
from extproc.metering.jsonscan import object_end, skip_ws, string_value
from extproc.metering.sse import SSEEvent, SSEFramer
from extproc.metering.usage import Usage

__all__ = ["DEFAULT_MAX_JSON_BYTES", "PARSE_BYTES", "TAIL_BYTES", "ResponseMeter"]

DEFAULT_MAX_JSON_BYTES = 4 * 1024 * 1024
PARSE_BYTES = 256 * 1024  # a larger non-streaming body is parsed only if its tail lacks usage
TAIL_BYTES = 64 * 1024  # kept from the end of an over-large non-streaming body
_HEAD_SCAN_BYTES = 64 * 1024  # searched for "model" in an over-large non-streaming body
_USAGE_SCAN_BYTES = 16 * 1024  # longest usage object we recover from a tail


def _usage_from_tail(tail: bytes, api: ApiSchema) -> Usage | None:
    """The usage object nearest the end of ``tail`` (the top-level one in every supported format)."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        value = skip_ws(tail, at + 7)
        if value < len(tail) and tail[value] == 0x3A:
            value = skip_ws(tail, value + 1)
            if value < len(tail) and tail[value] == 0x7B:
                end = object_end(tail, value, _USAGE_SCAN_BYTES)
                if end > 0:
                    try:
                        obj = orjson.loads(tail[value:end])
                    except orjson.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict):
                        return api.usage_from_json({"usage": obj})
        at = tail.rfind(b'"usage"', 0, at)
    return None


class ResponseMeter:
    """Meters one response of ``api``. Not thread-safe; one instance per response. Never raises on
    bad input."""

    __slots__ = (
        "_body",
        "_body_text_bytes",
        "_finished",
        "_framer",
        "_model",
        "_overflowed",
        "_parsed",
        "_parsed_len",
        "_stream",
        "_tail",
        "api",
        "bytes_seen",
        "max_json_bytes",
        "streaming",
    )

    def __init__(self, api: ApiSchema, streaming: bool, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        self.api = api
        self.streaming = streaming
        self.max_json_bytes = max_json_bytes
        self.bytes_seen = 0
        self._framer: SSEFramer | None = None
        self._stream: StreamUsage | None = None
        if streaming:
            self._framer = SSEFramer(max_json_bytes)
            self._stream = self.api.new_stream_usage()
        self._model: str | None = None  # non-streaming: the body's model
        self._body_text_bytes = 0  # non-streaming: output text of a body without usage (counted once)
        self._body = bytearray()  # non-streaming: the body so far (until it overflows)
        self._overflowed = False
        self._tail = bytearray()  # non-streaming, overflowed: the last TAIL_BYTES
        self._parsed: object = None  # non-streaming: the parsed body, cached
        self._parsed_len = -1  # length of the body when _parsed was computed
        self._finished = False

    @property
    def response_model(self) -> str | None:
        """The model the server named in its response (None until seen)."""
        return self._stream.model if self._stream is not None else self._model

    @property
    def content_bytes(self) -> int:
        """UTF-8 bytes of output text seen (for the estimate). Non-streaming: counted by `finish`
        when the body has no usage."""
        return self._stream.text_bytes if self._stream is not None else self._body_text_bytes

    @property
    def content_pieces(self) -> int:
        """Non-empty output text pieces seen (a streamed piece is at least one token)."""
        if self._stream is not None:
            return self._stream.text_pieces
        return 1 if self._body_text_bytes else 0

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
            self._on_events(self._framer.feed(chunk))
            return
        if self._overflowed:
            self._keep_tail(chunk)
        elif len(self._body) + len(chunk) > self.max_json_bytes:
            self._overflowed = True
            if self._model is None:
                self._model = string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
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
                self._on_events(self._framer.close())
        reported = self._reported()
        if reported is not None:
            return reported
        return self._estimate(max(0, prompt_estimate))

    # -- internals -------------------------------------------------------------------------------

    def _on_events(self, events: list[SSEEvent]) -> None:
        stream = self._stream
        assert stream is not None
        for event in events:
            data = event.data
            if data[:1] == b"{":  # not "[DONE]", nor anything else that is not a JSON object
                stream.feed(event.event, data)

    def _keep_tail(self, data: bytes | bytearray) -> None:
        self._tail += data[-TAIL_BYTES:]
        if len(self._tail) > TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]

    def _reported(self) -> Usage | None:
        if self._stream is not None:
            return self._stream.usage()
        if self._overflowed or len(self._body) > PARSE_BYTES:
            # Large body: the usage object is at its end; parsing all of it (an embeddings batch is
            # megabytes of floats, ~4 ms per MiB) would stall the event loop for nothing.
            tail = self._tail if self._overflowed else self._body[-TAIL_BYTES:]
            usage = _usage_from_tail(bytes(tail), self.api)
            if self._model is None and not self._overflowed:
                self._model = string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
            if usage is not None or self._overflowed:
                return usage
        obj = self._parse_body()
        return None if obj is None else self.api.usage_from_json(obj)

    def _parse_body(self) -> Mapping[str, object] | None:
        if self._parsed_len != len(self._body):
            self._parsed_len = len(self._body)
            try:
                self._parsed = orjson.loads(self._body) if self._body else None
            except orjson.JSONDecodeError:
                self._parsed = None
            model = self._parsed.get("model") if isinstance(self._parsed, dict) else None
            if isinstance(model, str):
                self._model = model
            elif self._model is None and self._body:  # malformed: look for it anyway
                self._model = string_value(bytes(self._body[:_HEAD_SCAN_BYTES]), b'"model":')
        return self._parsed if isinstance(self._parsed, dict) else None

    def _estimate(self, prompt_estimate: int) -> Usage:
        if self._stream is None and not self._body_text_bytes:
            obj = None if self._overflowed else self._parse_body()
            if obj is not None:
                self._body_text_bytes = self.api.output_text_bytes(obj)
        completion = max(estimate_tokens_from_byte_count(self.content_bytes), self.content_pieces)
        if self._stream is not None:
            return self._stream.estimate(prompt_estimate, completion)
        return Usage(prompt_estimate, completion, estimated=True)
