"""Load generators on asyncio + uvloop with a minimal HTTP/1.1 keep-alive client.

* `sequential`: one connection, one request at a time (the "low load" latency).
* `open_loop`: requests fired on a fixed timetable (i / rate) regardless of how earlier ones fare,
  over a pool of keep-alive connections; latency is measured from the *scheduled* send time, so a
  stalled server shows as queueing instead of being hidden (no coordinated omission). The
  scheduler's own lateness (timer resolution, client CPU) is reported as ``send_lag``.
* `closed_loop`: a fixed number of requests over C connections (exact request counts for CPU,
  Redis and memory accounting; also the fallback for saturation when wrk is missing).

Streaming requests record, for every SSE event that carries a send-time stamp from
bench/upstream.py, the one-way lag ``receive time - server send time`` (both CLOCK_MONOTONIC).
The client is a hand-written protocol rather than aiohttp so that its own cost stays small and the
same for every target.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import orjson

BENCH_KEY = "tm-bench-key"
PATH = "/v1/chat/completions"
_STAMP = re.compile(rb'"system_fingerprint":"ts(\d+)"')


def chat_body(*, stream: bool, max_tokens: int) -> bytes:
    payload: dict[str, object] = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "hello there, how are you today"}],
        "max_tokens": max_tokens,
    }
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return orjson.dumps(payload)


def http_request(port: int, body: bytes, key: str = BENCH_KEY) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --------------------------------------------------------------------------- the client


@dataclass
class Reply:
    status: int = 0
    first_byte_ns: int = 0
    done_ns: int = 0
    body_bytes: int = 0
    events: int = 0
    # (receive ns, server send ns) of each stamped SSE event, in order
    stamps: list[tuple[int, int]] = field(default_factory=list)


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._fut: asyncio.Future[Reply] | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._state = "head"
        self._remaining = 0
        self._chunked = False
        self._sse = b""
        self._sse_on = False
        self._reply = Reply()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(ConnectionError(f"connection closed mid-response: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        r = self._reply
        if not r.first_byte_ns:
            r.first_byte_ns = now
        self._buf += data
        try:
            self._parse(now)
        except Exception as exc:  # malformed response: fail the request, drop the connection
            if self._fut is not None and not self._fut.done():
                self._fut.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    # -- parsing
    def _parse(self, now: int) -> None:
        while True:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4 :]
                lines = head.split("\r\n")
                self._reply.status = int(lines[0].split(" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self._sse_on = headers.get("content-type", "").startswith("text/event-stream")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self._chunked, self._state = True, "size"
                else:
                    self._remaining = int(headers.get("content-length", "0"))
                    self._state = "body"
            elif self._state == "body":  # content-length body
                take = self._buf[: self._remaining]
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                self._body(take, now)
                if self._remaining:
                    return
                self._finish(now)
                return
            elif self._state == "size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(self._buf[:end].split(b";", 1)[0], 16)
                self._buf = self._buf[end + 2 :]
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining, self._state = size, "chunk"
            elif self._state == "chunk":
                take = self._buf[: self._remaining]
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                self._body(take, now)
                if self._remaining:
                    return
                self._state = "chunk-crlf"
            elif self._state == "chunk-crlf":
                if len(self._buf) < 2:
                    return
                self._buf, self._state = self._buf[2:], "size"
            elif self._state == "trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                trailer, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not trailer:
                    self._finish(now)
                    return

    def _body(self, data: bytes, now: int) -> None:
        r = self._reply
        r.body_bytes += len(data)
        if not self._sse_on or not data:
            return
        self._sse += data
        while True:
            end = self._sse.find(b"\n\n")
            if end < 0:
                return
            event, self._sse = self._sse[:end], self._sse[end + 2 :]
            r.events += 1
            m = _STAMP.search(event)
            if m:
                r.stamps.append((now, int(m.group(1))))

    def _finish(self, now: int) -> None:
        reply = self._reply
        reply.done_ns = now
        fut = self._fut
        self._fut = None
        self._reset()
        if fut is not None and not fut.done():
            fut.set_result(reply)

    # -- API
    async def request(self, raw: bytes) -> Reply:
        assert self.transport is not None and self._fut is None
        self._fut = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, "127.0.0.1", port)
    return proto


class _Pool:
    def __init__(self, port: int, max_conns: int) -> None:
        self.port, self.max_conns = port, max_conns
        self.idle: deque[_Conn] = deque()
        self.waiters: deque[asyncio.Future[_Conn]] = deque()
        self.count = 0
        self.all: list[_Conn] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self) -> _Conn:
        while self.idle:
            conn = self.idle.popleft()
            if not conn.closed:
                return conn
            self.count -= 1
        if self.count < self.max_conns:
            self.count += 1
            try:
                conn = await connect(self.port)
            except BaseException:
                self.count -= 1
                raise
            self.all.append(conn)
            return conn
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def put(self, conn: _Conn) -> None:
        if conn.closed:
            self.count -= 1
            if self.waiters:  # let a waiter open a fresh connection
                w = self.waiters.popleft()
                task = asyncio.ensure_future(self._open_for(w))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        self.idle.append(conn)

    async def _open_for(self, w: asyncio.Future[_Conn]) -> None:
        try:
            conn = await self.get()
        except Exception as exc:
            if not w.done():
                w.set_exception(exc)
            return
        if not w.done():
            w.set_result(conn)
        else:
            self.put(conn)

    def close(self) -> None:
        for c in self.all:
            c.close()


# --------------------------------------------------------------------------- results


@dataclass
class Run:
    """Outcome of one load run. Times in ms."""

    target: str
    mode: str
    sent: int = 0
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latency_ms: list[float] = field(default_factory=list)  # from scheduled (open loop) or send time
    service_ms: list[float] = field(default_factory=list)  # from actual send time
    send_lag_ms: list[float] = field(default_factory=list)  # scheduler lateness (open loop)
    ttfb_ms: list[float] = field(default_factory=list)  # streams: to the first SSE event
    chunk_lag_ms: list[float] = field(default_factory=list)  # streams: per token event, one-way lag
    first_event_lag_ms: list[float] = field(default_factory=list)  # streams: the first (role) event

    def record(self, reply: Reply | None, t_sched: int, t_send: int) -> None:
        if reply is None:
            self.errors += 1
            return
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        # every answered request counts in the latency percentiles, refusals (e.g. 504) included
        self.latency_ms.append((reply.done_ns - t_sched) / 1e6)
        self.service_ms.append((reply.done_ns - t_send) / 1e6)
        if not 200 <= reply.status < 300:
            self.errors += 1
            return
        self.ok += 1
        if reply.stamps:
            self.ttfb_ms.append((reply.stamps[0][0] - t_send) / 1e6)
            self.first_event_lag_ms.append((reply.stamps[0][0] - reply.stamps[0][1]) / 1e6)
            self.chunk_lag_ms.extend((recv - sent) / 1e6 for recv, sent in reply.stamps[1:])

    @property
    def rate(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0


async def _one(conn: _Conn, raw: bytes, reply_timeout_s: float) -> Reply | None:
    try:
        return await asyncio.wait_for(conn.request(raw), reply_timeout_s)
    except (TimeoutError, ConnectionError, OSError, ValueError):
        conn.close()
        return None


async def sequential(port: int, raw: bytes, n: int, *, target: str, reply_timeout_s: float = 10.0) -> Run:
    run = Run(target=target, mode="sequential")
    conn = await connect(port)
    t0 = time.monotonic_ns()
    try:
        for _ in range(n):
            if conn.closed:
                conn = await connect(port)
            t = time.monotonic_ns()
            run.sent += 1
            run.record(await _one(conn, raw, reply_timeout_s), t, t)
    finally:
        conn.close()
    run.wall_s = (time.monotonic_ns() - t0) / 1e9
    return run


async def open_loop(
    port: int,
    raw: bytes,
    *,
    rate: float,
    duration_s: float,
    target: str,
    max_conns: int = 256,
    reply_timeout_s: float = 10.0,
    on_tick: Callable[[], None] | None = None,
) -> Run:
    """Fire ``rate * duration_s`` requests at t0 + i/rate; latency from the scheduled time."""
    run = Run(target=target, mode=f"open {rate:g}/s")
    pool = _Pool(port, max_conns)
    # pre-open a few connections so the first requests do not all pay for a connect
    for _ in range(min(max_conns, max(4, int(rate / 100)))):
        pool.put(await pool.get())
    n = int(rate * duration_s)
    interval_ns = int(1e9 / rate)
    tasks: list[asyncio.Task[None]] = []

    async def fire(t_sched: int) -> None:
        try:
            conn = await pool.get()
        except OSError:
            run.record(None, t_sched, t_sched)
            return
        t_send = time.monotonic_ns()
        reply = await _one(conn, raw, reply_timeout_s)
        pool.put(conn)
        run.record(reply, t_sched, t_send)

    t0 = time.monotonic_ns() + 2_000_000
    i = 0
    while i < n:
        now = time.monotonic_ns()
        while i < n and t0 + i * interval_ns <= now:
            t_sched = t0 + i * interval_ns
            run.send_lag_ms.append((now - t_sched) / 1e6)
            tasks.append(asyncio.create_task(fire(t_sched)))
            run.sent += 1
            i += 1
        if on_tick is not None:
            on_tick()
        if i < n:
            await asyncio.sleep(max(0.0, (t0 + i * interval_ns - time.monotonic_ns()) / 1e9))
    if tasks:
        await asyncio.wait(tasks, timeout=reply_timeout_s + 5)
    run.wall_s = (time.monotonic_ns() - t0) / 1e9
    pool.close()
    return run


async def closed_loop(
    port: int, raw: bytes, *, n: int, concurrency: int, target: str, reply_timeout_s: float = 10.0
) -> Run:
    """Exactly ``n`` requests over ``concurrency`` keep-alive connections, as fast as they go."""
    run = Run(target=target, mode=f"closed c={concurrency}")
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        conn = await connect(port)
        try:
            while remaining > 0:
                remaining -= 1
                if conn.closed:
                    conn = await connect(port)
                t = time.monotonic_ns()
                run.sent += 1
                run.record(await _one(conn, raw, reply_timeout_s), t, t)
        finally:
            conn.close()

    t0 = time.monotonic_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = (time.monotonic_ns() - t0) / 1e9
    return run
