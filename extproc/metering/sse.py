"""Incremental Server-Sent Events framing over raw network chunks.

`SSEFramer.feed` takes body chunks exactly as they come off the wire (split anywhere: inside a line,
between ``\\r`` and ``\\n``, inside a multi-byte UTF-8 character) and returns the events completed by
that chunk as `SSEEvent` values. It works on bytes: every delimiter is ASCII and UTF-8 continuation
bytes are never ASCII, so a split character is simply carried over with the rest of its line. Data is
returned as bytes (ready for ``orjson.loads``); only the ``event:`` name is decoded.

Framing follows the WHATWG EventSource parsing rules:

* lines end with ``\\r\\n``, ``\\n`` or ``\\r``; a blank line ends an event;
* ``:`` starts a comment; ``field:value`` drops one space after the colon; a line without a colon is
  a field with an empty value;
* ``data`` lines are joined with ``\\n``; ``event`` sets the event name; ``id``/``retry``/unknown
  fields are ignored; an event without any ``data`` line is not dispatched;
* a leading UTF-8 BOM is ignored.

Deviation from the spec, on purpose: `SSEFramer.close` dispatches a final event that lacks the
closing blank line (some servers end the body right after the last ``data:`` line).

Memory is bounded: an event whose lines (field names, values and comments, without line endings)
exceed ``max_event_bytes`` is dropped as soon as that is known, counted in ``dropped_events``, and
the rest of it is skipped without buffering. Keep-alive comments count toward the event they
precede until a blank line. The decision depends only on the byte stream, never on how it was split.

Per chunk the work is one ``bytes.splitlines`` (C speed) plus a few operations per line; bytes
already seen are never rescanned.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: its ``event:`` name (None when absent) and its joined ``data`` lines.

    Treat as immutable. Not ``frozen``: a frozen dataclass costs twice as much to construct, once
    per event on the hot path.
    """

    event: str | None
    data: bytes


class SSEFramer:
    """Turns a byte stream into SSE events, incrementally. One instance per response stream."""

    _data: list[bytes]
    _has_data: bool
    _event: str | None
    _size: int
    _discarding: bool

    __slots__ = (
        "_data",
        "_discarding",
        "_event",
        "_first_line",
        "_has_data",
        "_line_ignored",
        "_partial",
        "_size",
        "_skip_lf",
        "dropped_events",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.dropped_events = 0
        self._partial = bytearray()  # the current line, not yet terminated
        self._line_ignored = False  # the current (non-empty) line belongs to a dropped event
        self._skip_lf = False  # the last chunk ended with \r: a leading \n is its \r\n partner
        self._first_line = True
        self._reset_event()

    def _reset_event(self) -> None:
        self._data = []
        self._has_data = False
        self._event = None
        self._size = 0  # bytes of the current event's lines so far
        self._discarding = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume one chunk; return the events it completed (often none, sometimes several)."""
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if not chunk:
            return []
        # Lines never contain \r or \n, so splitlines() gives exactly the terminated lines, plus
        # the unterminated rest of the chunk as the last item when the chunk does not end a line.
        lines = chunk.splitlines()
        last = chunk[-1]
        if last == _LF or last == _CR:
            tail = b""
            self._skip_lf = last == _CR  # a \n at the start of the next chunk completes this \r\n
        else:
            tail = lines.pop()
        out: list[SSEEvent] = []
        rest = 0
        if lines and (self._line_ignored or self._partial or self._first_line):
            rest = 1  # the first line continues a partial one, or is the stream's first
            if self._line_ignored:
                self._line_ignored = False  # the end of a line of a dropped event
                self._first_line = False
            else:
                line = lines[0]
                if self._partial:
                    self._partial += line
                    line = bytes(self._partial)
                    self._partial.clear()
                event = self._line(line)
                if event is not None:
                    out.append(event)
        for i in range(rest, len(lines)):
            line = lines[i]
            if line:
                self._line(line)  # a field line never completes an event
            elif self._has_data and not self._discarding:
                data = self._data
                out.append(SSEEvent(self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                self._reset_event()
            else:
                self._reset_event()
        if tail:
            self._feed_partial(tail)
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch a last event that lacks its closing blank line; reset the framer."""
        out: list[SSEEvent] = []
        if self._partial and not self._line_ignored:
            event = self._line(bytes(self._partial))
            if event is not None:
                out.append(event)
        event = self._line(b"")
        if event is not None:
            out.append(event)
        self._partial.clear()
        self._line_ignored = False
        self._skip_lf = False
        self._first_line = True
        return out

    def _feed_partial(self, tail: bytes) -> None:
        if self._discarding:
            self._line_ignored = True  # a non-empty line of a dropped event: no need to keep it
            return
        if self._size + len(self._partial) + len(tail) > self.max_event_bytes:
            self._drop()
            self._partial.clear()
            self._line_ignored = True
            return
        self._partial += tail

    def _drop(self) -> None:
        self.dropped_events += 1
        self._data = []
        self._has_data = False
        self._discarding = True

    def _line(self, line: bytes) -> SSEEvent | None:
        size = len(line)
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[3:]
        if not line:
            event = None
            if self._has_data and not self._discarding:
                data = self._data
                event = SSEEvent(self._event, data[0] if len(data) == 1 else b"\n".join(data))
            self._reset_event()
            return event
        if self._discarding:
            return None
        self._size += size
        if self._size > self.max_event_bytes:
            self._drop()
            return None
        if line[0] == 0x3A:  # ':' comment
            return None
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None
