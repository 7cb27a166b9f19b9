"""Hold thousands of streaming responses open through Envoy, multiplexed over a few HTTP/2 connections.

Why HTTP/2 downstream: each open HTTP/1.1 stream costs Envoy two file descriptors (downstream and
upstream) and the client one; with a 20,000 descriptor limit per process 10,000 HTTP/1.1 streams
do not fit in Envoy. Over h2c (prior knowledge; the shipped listener's codec is AUTO) the client
needs a handful of sockets and Envoy one upstream connection per stream.

This is a deliberately minimal HTTP/2 client: request headers are HPACK literals without
indexing (no encoder state), response header blocks are never decoded beyond checking for the
one-byte ``:status: 200`` (static table index 8, 0x88, which Envoy emits as the first field), and
SSE data is only counted. A stream counts as *open* once its first DATA byte (the first SSE event,
sent by the fake server right after the headers) has arrived; the fake server then sleeps for its
chunk delay, which the benchmark sets longer than the test, so the stream stays open in Envoy, the
processor and the upstream until the client closes the connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
RECV_WINDOW = 1 << 24


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n)) + n + _hpack_int(len(v)) + v


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(_hpack_literal(k, v) for k, v in headers)


@dataclass
class HoldStats:
    sent: int = 0
    open: int = 0  # first DATA received, not ended
    refused: int = 0  # non-200 status
    ended: int = 0  # END_STREAM received (should stay 0 while holding)
    reset: int = 0
    goaway: bool = False
    # (connection number, stream id) -> sent | headers | open | refused | ended | reset
    stream_state: dict[tuple[int, int], str] = field(default_factory=dict)


class _H2Conn(asyncio.Protocol):
    def __init__(self, stats: HoldStats, number: int) -> None:
        self.stats, self.number = stats, number
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.next_stream = 1
        self.send_window = 65_535
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, RECV_WINDOW)  # no push; window
        self.transport.write(
            PREFACE + _frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 30)))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.window_open.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            ftype, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            self._frame_in(ftype, flags, stream, payload)

    def _frame_in(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        st, state, stream = self.stats, self.stats.stream_state, (self.number, sid)
        if ftype == SETTINGS and not flags & ACK:
            assert self.transport is not None
            self.transport.write(_frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK:
            assert self.transport is not None
            self.transport.write(_frame(PING, ACK, 0, payload))
        elif ftype == WINDOW_UPDATE and sid == 0:
            self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self.window_open.set()
        elif ftype == HEADERS and state.get(stream) == "sent":
            block = payload
            if flags & 0x8:  # PADDED
                block = block[1 : len(block) - block[0]]
            if flags & 0x20:  # PRIORITY
                block = block[5:]
            if block[:1] == b"\x88":
                state[stream] = "headers"
            else:
                state[stream] = "refused"
                st.refused += 1
        elif ftype == DATA and payload and state.get(stream) == "headers":
            state[stream] = "open"
            st.open += 1
        prev = state.get(stream)
        if ftype in (DATA, HEADERS) and flags & END_STREAM and prev in ("sent", "headers", "open"):
            if prev == "open":
                st.open -= 1
            state[stream] = "ended"
            st.ended += 1
        elif ftype == RST_STREAM and prev in ("sent", "headers", "open"):
            if prev == "open":
                st.open -= 1
            state[stream] = "reset"
            st.reset += 1
        elif ftype == GOAWAY:
            st.goaway = True

    async def send_request(self, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        while self.send_window < len(body) and not self.closed:
            self.window_open.clear()
            await self.window_open.wait()
        if self.closed or self.transport is None:
            raise ConnectionError("h2 connection closed")
        sid = self.next_stream
        self.next_stream += 2
        self.send_window -= len(body)
        block = header_block([*headers, ("content-length", str(len(body)))])
        self.transport.write(_frame(HEADERS, END_HEADERS, sid, block) + _frame(DATA, END_STREAM, sid, body))
        self.stats.stream_state[(self.number, sid)] = "sent"
        self.stats.sent += 1

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.next_stream - 2, 0)))
            self.transport.close()


async def hold_streams(
    port: int,
    body: bytes,
    key: str,
    *,
    checkpoints: Sequence[int],
    on_checkpoint: Callable[[int, HoldStats], Awaitable[None]],
    connections: int = 10,
    max_pending: int = 64,
    step_timeout_s: float = 60.0,
    path: str = "/v1/chat/completions",
) -> HoldStats:
    """Open streams up to each checkpoint count in turn (at most ``max_pending`` awaiting their first
    byte, so the ramp follows the processor's pace), call ``on_checkpoint`` while they are all open,
    then close every connection (Envoy resets the streams) and return the counters."""
    stats = HoldStats()
    loop = asyncio.get_running_loop()
    conns: list[_H2Conn] = []
    for number in range(connections):
        _, proto = await loop.create_connection(partial(_H2Conn, stats, number), "127.0.0.1", port)
        conns.append(proto)
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/json"),
        ("authorization", f"Bearer {key}"),
    ]
    try:
        await asyncio.sleep(0.2)  # settings exchange
        i = 0
        for target in sorted(checkpoints):
            deadline = loop.time() + step_timeout_s
            while stats.open < target and loop.time() < deadline:
                pending = stats.sent - stats.open - stats.refused - stats.ended - stats.reset
                if stats.sent < target + stats.refused + stats.reset + stats.ended and pending < max_pending:
                    await conns[i % len(conns)].send_request(headers, body)
                    i += 1
                    if i % 50 == 0:
                        await asyncio.sleep(0)
                else:
                    await asyncio.sleep(0.005)
            await on_checkpoint(target, stats)
    finally:
        for c in conns:
            c.close()
    return stats
