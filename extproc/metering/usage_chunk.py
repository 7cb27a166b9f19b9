"""Take back the usage chunk the proxy asked for on the client's behalf.

To meter an OpenAI stream the processor sets ``stream_options.include_usage`` on requests that did
not ask for it (extproc.metering.request.inject_stream_usage). The server then ends the stream with
one extra chunk, ``"choices": []`` plus ``usage``, which the client never asked for and which
breaks client code that reads ``chunk.choices[0]``. Where the processor sees the response body
(envoy/envoy.yaml), `UsageChunkFilter` removes that event from the chunk that carries it, after the
meter has read it. (The server's ``"usage": null`` on the other chunks is an extra field that
clients ignore, and is left alone.)

It works on whole SSE events within one body chunk: an event split across chunks is passed on
unchanged (model servers write one event per write; the usage event is a few hundred bytes).
"""

from __future__ import annotations

import re

import orjson

# `"choices": []`, however spaced: only the usage chunk has no choices (a cheap test per chunk)
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class UsageChunkFilter:
    __slots__ = ("_at_event_start",)

    def __init__(self) -> None:
        self._at_event_start = True  # the next chunk starts a new event

    def filter(self, chunk: bytes) -> bytes | None:
        """The chunk without the usage-only event; None when it is unchanged."""
        starts_clean = self._at_event_start
        self._at_event_start = chunk.endswith((b"\n\n", b"\r\n\r\n"))
        if _EMPTY_CHOICES.search(chunk) is None:
            return None
        events = chunk.replace(b"\r\n", b"\n").split(b"\n\n") if b"\r" in chunk else chunk.split(b"\n\n")
        # events[-1] is what follows the last blank line: empty, or an event still going on
        kept: list[bytes] = []
        dropped = False
        for i, event in enumerate(events):
            whole = (i > 0 or starts_clean) and i < len(events) - 1
            if whole and _is_usage_only(event):
                dropped = True
                continue
            kept.append(event)
        if not dropped:
            return None
        return b"\n\n".join(kept)


def _is_usage_only(event: bytes) -> bool:
    if _EMPTY_CHOICES.search(event) is None:
        return False
    data = b"".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
