"""A minimal pipelined RESP2 client for the admission call: one connection, no pool, no retries.

redis-py's asyncio client costs about as much CPU per EVALSHA as the rest of our admission code
(connection-pool checkout, retry wrapper, command packing through several layers). Admission needs
one command shape on one connection, so this client writes pre-packed commands straight to an
asyncio transport and matches replies to waiting futures in order (pipelining: concurrent callers
share the connection). Replies are parsed by hiredis, as with redis-py.

Failure behaviour, as the limiter expects: a caller's deadline (asyncio.timeout around the call, or
the limiter's own watch resolving the future) ends only its own future; a late reply for it is read
and dropped (or handed to a hook the caller left, `_Protocol.on_late_reply`), so the connection stays
in step. A lost connection fails every waiting call with ConnectionError and the next call reconnects.
Error replies raise redis-py's exceptions (NoScriptError for NOSCRIPT), so the caller's handling
is the same for both clients.

Liveness (`_Protocol.heard_at`): the time the connection last received bytes, or now if bytes are
waiting in the socket that the event loop has not read yet. The limiter uses it to tell a silent
Redis from a busy event loop that has not got round to reading a prompt answer.

Only plain TCP (``redis://``) and Unix sockets (``unix://``) URLs with an optional password and db;
anything else (TLS, cluster, other options) keeps redis-py (`PipelinedRedis.from_url` returns None).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def bulk(arg: Any) -> bytes:
    """One argument as a RESP2 bulk string."""
    b = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join([bulk(a) for a in args])


class Template:
    """A command whose arguments are all fixed but a few, packed once: `fill` packs only those.

    `Template(("EVALSHA", sha, 2), ("k1",), None, ("a", "b"), None)` is a command with five fixed
    arguments and two holes (None); `fill(x, y)` = pack(("EVALSHA", sha, 2, "k1", x, "a", "b", y)).
    """

    __slots__ = ("_parts",)

    def __init__(self, *segments: tuple[Any, ...] | None) -> None:
        count = sum(1 if seg is None else len(seg) for seg in segments)
        parts: list[bytes | None] = []
        fixed = b"*%d\r\n" % count
        for seg in segments:
            if seg is None:
                parts.append(fixed)
                fixed = b""
                parts.append(None)
            else:
                fixed += b"".join([bulk(a) for a in seg])
        parts.append(fixed)
        self._parts = tuple(parts)

    def fill(self, *values: Any) -> bytes:
        it = iter(values)
        return b"".join([bulk(next(it)) if p is None else p for p in self._parts])


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


log = logging.getLogger(__name__)

_POLL_IN = select.POLLIN
_POLL_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _call(hook: Callable[[Any], None], reply: Any) -> None:
    """A late-reply hook must not break the reading of the replies that follow."""
    try:
        hook(reply)
    except Exception:
        log.exception("late-reply hook failed")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # each command written and not answered yet: its caller's future, when it was written
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.last_read = float("-inf")  # time.monotonic() of the last bytes read from the server
        # futures given up by their callers whose late reply (or the connection's loss) someone wants
        self._late: dict[asyncio.Future[Any], Callable[[Any], None]] = {}
        self._poll: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                poll = select.poll()
                poll.register(sock.fileno(), _POLL_IN)
                self._poll = poll
            except (OSError, ValueError):
                self._poll = None

    def heard_at(self) -> float:
        """When the server last showed it answers on this connection: now if bytes are waiting in
        the socket (a busy event loop has not read them yet), else when bytes were last read."""
        poll = self._poll
        if poll is not None and not self.lost:
            try:
                ready = poll.poll(0)
            except OSError:
                ready = []
            if ready and ready[0][1] & _POLL_IN and not ready[0][1] & _POLL_BAD:
                return time.monotonic()
        return self.last_read

    def on_late_reply(self, fut: asyncio.Future[Any], hook: Callable[[Any], None]) -> None:
        """`fut` was given up (it is done); call `hook` with its reply when that arrives (a hiredis
        ReplyError for an error reply), or with the exception if the connection is lost first."""
        if self.lost:
            _call(hook, RedisConnectionError("redis connection lost"))
        else:
            self._late[fut] = hook

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self._reader.feed(data)
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            if not self.pending:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("unexpected reply from redis"))
                if self.transport is not None:
                    self.transport.close()
                return
            fut, _ = self.pending.popleft()
            if fut.done():  # its caller gave up (deadline): drop the late reply, or hand it on
                if self._late:
                    hook = self._late.pop(fut, None)
                    if hook is not None:
                        _call(hook, reply)
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError(f"redis connection lost: {exc!r}" if exc else "redis connection closed"))

    def _fail(self, exc: Exception) -> None:
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        late, self._late = self._late, {}
        for hook in late.values():
            _call(hook, exc)

    def oldest_wait_s(self) -> float:
        return time.monotonic() - self.pending[0][1] if self.pending else 0.0

    def abort(self) -> None:
        """Give up on this connection: fail every waiting call; the next call reconnects."""
        self.lost = True
        self._fail(RedisConnectionError("redis connection stalled: closed"))
        if self.transport is not None:
            self.transport.abort()

    def send_many(self, payloads: list[bytes]) -> list[asyncio.Future[Any]]:
        if self.transport is None or self.lost:
            raise RedisConnectionError("redis connection not open")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in payloads]
        now = time.monotonic()
        self.pending.extend((f, now) for f in futures)
        self.transport.write(b"".join(payloads))
        return futures

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.transport is None or self.lost:
            raise RedisConnectionError("redis connection not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((fut, time.monotonic()))
        self.transport.write(payload)
        return fut


@dataclass(frozen=True)
class Target:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0


def parse_url(url: str) -> Target | None:
    """The connection target of a plain ``redis://`` or ``unix://`` URL; None for anything else."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if set(query) - {"db"}:
        return None
    try:
        db = int(query["db"][0]) if "db" in query else 0
        if parts.scheme == "redis":
            path_db = parts.path.strip("/")
            if path_db:
                db = int(path_db)
            return Target(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                          username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None, db=db)
        if parts.scheme == "unix" and parts.path:
            return Target(path=parts.path, username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None, db=db)
    except ValueError:
        return None
    return None


class PipelinedRedis:
    """`await client.call("EVALSHA", ...)` over one pipelined connection (see the module doc)."""

    def __init__(self, target: Target, *, connect_timeout_s: float, stall_s: float = 1.0) -> None:
        self.target = target
        self._connect_timeout_s = connect_timeout_s
        self._stall_s = stall_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout_s: float, stall_s: float = 1.0) -> PipelinedRedis | None:
        target = parse_url(url)
        return None if target is None else cls(target, connect_timeout_s=connect_timeout_s, stall_s=stall_s)

    async def call(self, *args: Any) -> Any:
        return await self.call_packed(pack(args))

    async def call_packed(self, payload: bytes) -> Any:
        """One command already in RESP2 (pack, Template.fill)."""
        proto = await self._connection()
        try:
            return await proto.send(payload)
        except asyncio.CancelledError:
            self.gave_up(proto)
            raise

    def live(self) -> _Protocol | None:
        """The open connection, if there is one (no await on the hot path)."""
        proto = self._proto
        return None if proto is None or proto.lost else proto

    async def connection(self) -> _Protocol:
        """The open connection (connecting if needed, within `connect_timeout_s`): a caller that
        waits on `_Protocol.send`'s future itself must call `gave_up` when it stops waiting early."""
        return await self._connection()

    def gave_up(self, proto: _Protocol) -> None:
        """A caller gave up (its deadline). If the oldest command on the connection has waited
        longer than `stall_s`, the connection is dead without having said so (a silently dropped
        NAT/LB flow, a vanished host): drop it rather than queue behind it until TCP gives up."""
        if not proto.lost and proto.oldest_wait_s() > self._stall_s:
            proto.abort()

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one write; each reply, or the exception of an error reply, in order.
        A lost connection raises (every command of the batch may or may not have run)."""
        return await self.call_many_packed([pack(c) for c in commands])

    async def call_many_packed(self, payloads: list[bytes]) -> list[Any]:
        proto = await self._connection()
        futures = proto.send_many(payloads)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            self.gave_up(proto)
            raise
        for r in results:
            if isinstance(r, RedisConnectionError | OSError | asyncio.CancelledError):
                raise r
        return results

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        return proto

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one connection attempt; a caller's deadline does not cancel it.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        t = self.target
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if t.path is not None:
                    transport, proto = await loop.create_unix_connection(_Protocol, t.path)
                else:
                    transport, proto = await loop.create_connection(_Protocol, t.host, t.port)
                    sock = transport.get_extra_info("socket")
                    if sock is not None:  # notice a peer that vanished while the connection idles
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                proto.transport = transport
                setup = []
                if t.password is not None:
                    auth = ("AUTH", t.username, t.password) if t.username else ("AUTH", t.password)
                    setup.append(proto.send(pack(auth)))
                if t.db:
                    setup.append(proto.send(pack(("SELECT", t.db))))
                for fut in setup:
                    await fut
        except BaseException:
            if transport is not None:  # AUTH/SELECT refused or timed out: never leak the socket
                transport.close()
            raise
        self._proto = proto
        return proto

    async def aclose(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
