"""The shared limiter: one Lua script per admission on Redis, settlements queued off the request path.

Admission path (``reserve``):
  * one EVALSHA of ``reserve.lua`` (SCRIPT LOAD on first use / on NOSCRIPT, then one retry);
  * the deadline (``deadline_ms``) is one of Redis's *silence*, not of latency (``_Watch``): an admission
    gives up on Redis only when Redis has sent nothing for a whole deadline since the command went out
    (and the check was not itself delayed by a blocked event loop). A busy processor whose event loop
    has not yet read a prompt answer keeps waiting, up to ``max_wait_ms`` after the call began; if even
    that is not enough it refuses (``denied_kind="backend"``, ``busy_refusals``) and never decides
    locally: a healthy Redis never turns into degraded admissions;
  * redis-py (TLS, Cluster) with retries disabled (its retries turned a hung Redis into ~4 s stalls);
  * a circuit breaker opens after ``breaker_threshold`` consecutive failures and sends one probe after
    ``breaker_cooldown_s``; while it is open nothing waits on Redis at all;
  * on failure (refused connection, silent Redis): ``fail_open`` decides with a per-replica
    ``InMemoryLimiter`` (every limit divided by ``replicas_hint``, rounded up; its windows persist for
    the process's life, so a flapping breaker never grants a fresh share) and returns ``degraded=True``;
    ``fail_closed`` refuses with ``denied_kind="backend"``.

Settlement path (``settle``): an in-process bounded queue drained by one background task that pipelines
``settle.lua`` calls in batches on its own connection pool. On failure the batch stays at the head of the
queue and is retried with exponential backoff, so nothing is lost while the process lives (drops are
counted only if the bound is hit). Settling is idempotent, so a batch that reached Redis before a
timeout may safely be sent again.

Redis Cluster (``redis+cluster://host:port``): every key of a tenant's decision carries the hash tag
``{t:<tenant>}``, so the tenant's scopes are one EVALSHA on the tenant's shard. Pools are global keys
(``{pool:<name>}``) on other shards: after the tenant call admits, the pools are tried in preference order,
one EVALSHA each on the pool's shard (usually one: the first pool has room); if none has room the tenant
reservation is cancelled (a third call) and the request is denied with "pool". Between the calls another
request may see the tenant's or a pool's transient reservation: the race can only under-admit, never
over-admit. The pool's reservation has its own record on its shard; the tenant's record names the
candidate pools, so settlement (from any process) settles the tenant's record and then the candidates'
records in a second pipelined call (the pools not chosen have no record: no-ops).

Scope encoding: flat ARGV (per scope its counters, per counter its rules; see reserve.lua's header) and
declared KEYS (one per counter, then the pools'), packed once per (tenant, scopes, pools, calendar periods)
on the pipelined connection: no JSON to build or decode on either side. Calendar periods, and waits until
their end, follow the caller's wall clock (``wall_clock``), sent with each call; sliding windows Redis TIME.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.limiter.memory import InMemoryLimiter
from extproc.limiter.resp import PipelinedRedis, Template, pack
from extproc.limiter.types import (
    CONCURRENCY_LEASE_S,
    KIND_BACKEND,
    KIND_POOL,
    KIND_TOO_LARGE,
    POOL_SCOPE,
    POOL_WINDOW_S,
    RESERVATION_MIN_TTL_S,
    Decision,
    DuplicateReservation,
    Measure,
    PoolCeiling,
    Reservation,
    Rule,
    ScopeLimit,
    Threshold,
    WindowStatus,
)

log = logging.getLogger(__name__)

Client = Redis | RedisCluster
CLUSTER_SCHEME = "redis+cluster://"

_BACKEND_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


# Envoy's ext_proc message_timeout for the admission message is 0.5 s (extproc/envoy/config.py): an
# admission that waits on a Redis that answers, with a busy event loop, gives up at 300 ms so the
# processor still answers (a 503) before Envoy does (a 504), with ~200 ms for the rest of the message.
DEFAULT_MAX_WAIT_MS = 300.0


class RedisStalled(TimeoutError):
    """Redis sent nothing for a whole deadline while an admission waited for it."""


class ProcessorBusy(Exception):
    """The admission's reply was not read by ``max_wait``, and Redis cannot be called stalled: it kept
    answering (``redis_answered``), or the event loop was too blocked to tell."""

    def __init__(self, redis_answered: bool) -> None:
        super().__init__("redis answers" if redis_answered else "event loop too busy to tell")
        self.redis_answered = redis_answered


class _Watch:
    """When one admission call stops waiting for Redis: one timer, first at the deadline, that resolves
    the awaited future (a reply future: with an exception; a task: cancelled) only when

    * Redis has shown no sign of life for a whole deadline — ``heard()`` is the newest evidence that it
      answers, and the command's own send time counts as the start — at three checks in a row, 1 ms
      apart (the later ones run after the event loop has polled its sockets): ``RedisStalled``;
    * or ``max_wait`` has passed since the admission began: ``RedisStalled`` if Redis has been silent
      for the deadline while the loop could have seen it, else ``ProcessorBusy``.

    ``exact``: ``heard()`` sees bytes that wait unread in the socket (the pipelined connection), so a
    blocked event loop cannot hide an answer. Otherwise (redis-py: only answers the loop has processed
    are seen) the loop's own lag is taken out of the deadline: a check that runs late (by more than
    ``max(5 ms, deadline / 10)``) shows the loop was blocked, and the silence counts again from there.
    A saturated loop thus waits until ``max_wait``, where it refuses (``ProcessorBusy``) rather than
    call Redis stalled and decide locally.

    Otherwise (Redis answers and this reply is not read yet) it looks again a deadline after the last
    sign of life. A future already done is never touched: a reply that arrived counts however late
    the loop gets to it (``asyncio.timeout`` threw such replies away when its timer fired in the same
    loop iteration as the reply was read).
    """

    __slots__ = ("_cap_at", "_deadline", "_due", "_fut", "_handle", "_heard", "_lag_limit", "_loop", "_sent",
                 "_silent", "_trusted_from", "verdict")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[Any],
        heard: Callable[[], float],
        sent: float,
        cap_at: float,
        deadline: float,
        exact: bool,
    ) -> None:
        self._loop = loop
        self._fut = fut
        self._heard = heard
        self._sent = sent  # silence counts from here at the earliest
        self._cap_at = cap_at
        self._deadline = deadline
        self._lag_limit = float("inf") if exact else max(0.005, deadline / 10)
        self._trusted_from = sent  # the loop was last seen blocked here (inexact watches)
        self._silent = 0  # consecutive checks that found Redis silent for the deadline
        self.verdict: RedisStalled | ProcessorBusy | None = None
        self._arm(sent + deadline, sent)

    def _arm(self, due: float, now: float) -> None:
        self._due = due = min(due, self._cap_at)
        self._handle = self._loop.call_later(max(0.0, due - now), self._check)

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        fut = self._fut
        if fut.done():
            return
        now = time.monotonic()
        if now - self._due > self._lag_limit:  # the loop was blocked: what came meanwhile may be unread
            self._trusted_from = now
        heard = max(self._heard(), self._sent)
        quiet_since = max(heard, self._trusted_from)
        verdict: RedisStalled | ProcessorBusy
        if now >= self._cap_at - 0.001:  # (uvloop rounds timers to the millisecond)
            if now - heard < self._deadline:
                verdict = ProcessorBusy(redis_answered=True)
            elif now - quiet_since < self._deadline:
                verdict = ProcessorBusy(redis_answered=False)
            else:
                verdict = RedisStalled()
        elif now - quiet_since < self._deadline:
            self._silent = 0
            self._arm(quiet_since + self._deadline, now)
            return
        else:
            self._silent += 1
            if self._silent < 3:
                self._arm(now + 0.001, now)
                return
            verdict = RedisStalled()
        self.verdict = verdict
        if isinstance(fut, asyncio.Task):
            fut.cancel()
        else:
            fut.set_exception(verdict)


class _Waiting:
    """A redis-py admission in progress (TLS, Cluster): the node its current call waits on and when that
    call was sent, the time each node of the admission client last answered (shared by the limiter's
    admissions), and whether the tenant's call was answered (cluster: what to undo if a later one fails)."""

    __slots__ = ("answered", "node", "sent", "tenant_done")

    def __init__(self, answered: dict[str, float]) -> None:
        self.answered = answered
        self.node = ""
        self.sent: float | None = None
        self.tenant_done = False

    def heard(self) -> float:
        """The sign of life of the node this admission waits on: its last answer to any admission, or
        the current call's send (silence counts from there); now while nothing is sent yet (a loop too
        busy to start the task is not Redis's silence)."""
        if self.sent is None:
            return time.monotonic()
        return max(self.answered.get(self.node, self.sent), self.sent)


class _Script:
    """A Lua script run by EVALSHA; loaded with SCRIPT LOAD when the server does not know it."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("extproc.limiter").joinpath(name).read_bytes()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest()


RESERVE = _Script("reserve.lua")
SETTLE = _Script("settle.lua")


# -- key layout (see README.md) --------------------------------------------------------------------


def tenant_tag(tenant: str) -> str:
    """Every key of one tenant's decision shares this prefix (and so one Redis Cluster hash slot)."""
    return f"tm:{{t:{tenant}}}"


def reservation_key(tenant: str, request_id: str) -> str:
    return f"{tenant_tag(tenant)}:res:{request_id}"


def counter_key(tenant: str, scope: str, counter: str) -> str:
    """The key of one counter of a scope (``Rule.counter``: a window, a calendar period, the slots)."""
    return f"{tenant_tag(tenant)}:{scope}:{counter}"


def pool_key(pool: str) -> str:
    """A pool's minute window: a global key, not tied to a tenant."""
    return f"tm:{{pool:{pool}}}:w"


def pool_spill_key(pool: str) -> str:
    """Set while a pool spills (until it drains below its hysteresis line)."""
    return f"tm:{{pool:{pool}}}:spill"


def pool_owner_key(pool: str, owner: str) -> str:
    """The window of one owner's tokens in a pool (fair share)."""
    return f"tm:{{pool:{pool}}}:o:{owner}"


def pool_demand_key(pool: str, owner: str) -> str:
    """Set for a window after an owner was refused by the pool within its guarantee."""
    return f"tm:{{pool:{pool}}}:d:{owner}"


def pool_reservation_key(pool: str, tenant: str, request_id: str) -> str:
    """Cluster mode: the record of a pool reservation, on the pool's shard."""
    return f"tm:{{pool:{pool}}}:res:{tenant}:{request_id}"


# -- clients ------------------------------------------------------------------------------------------


def redis_client(url: str, *, timeout_s: float, **kw: Any) -> Client:
    """A redis-py asyncio client without retries (``redis://``, ``rediss://``, ``unix://`` or
    ``redis+cluster://host:port``). Hiredis parses replies when installed."""
    common: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),  # redis-py's default retries turn a hung Redis into 4 s stalls
        "decode_responses": False,
        "driver_info": None,  # no CLIENT SETINFO round trips on connect
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        **kw,
    }
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME), **common)
    return Redis.from_url(url, **common)


async def _command(client: Client, *args: Any) -> Any:
    """``execute_command`` (untyped in redis-py) in one typed place."""
    return await client.execute_command(*args)


def _opt(v: int | None) -> str:
    return "" if v is None else str(int(v))


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures -> one probe after ``cooldown`` seconds.

    A probe that neither succeeds nor fails (its caller was cancelled) is given up after another
    cooldown, so the breaker cannot stay stuck half-open.
    """

    def __init__(
        self, threshold: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probe_since: float | None = None
        self.opened = 0  # times it opened (a counter for telemetry)
        # told when the circuit opens or closes (the audit trail: extproc.service.server wires it)
        self.on_change: Callable[[str, str], None] | None = None

    def _notify(self, state: str, reason: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(state, reason)
            except Exception:  # an observer never changes what the breaker decides
                log.exception("circuit breaker observer failed")

    @property
    def state(self) -> str:
        if self._failures < self.threshold:
            return "closed"
        return "half_open" if self._probe_since is not None else "open"

    def allow(self) -> bool:
        if self._failures < self.threshold:
            return True
        now = self._clock()
        if now < self._open_until:
            return False
        if self._probe_since is not None and now - self._probe_since < self.cooldown:
            return False
        self._probe_since = now
        return True

    def success(self) -> None:
        if self._failures >= self.threshold:
            log.warning("redis limiter: circuit closed, Redis answers again")
            self._notify("closed", "Redis answers again")
        self._failures = 0
        self._probe_since = None

    def failure(self) -> None:
        self._failures += 1
        self._probe_since = None
        if self._failures >= self.threshold:
            if self._failures == self.threshold:
                self.opened += 1
                log.warning("redis limiter: circuit open after %d consecutive failures", self._failures)
                self._notify("open", f"{self._failures} consecutive failures")
            self._open_until = self._clock() + self.cooldown


# (tenant, request id, actual tokens, "s" settle | "c" cancel)
# tenant, request id, actual tokens, mode ("s" settle | "c" cancel), actual output ('' unknown)
_Settlement = tuple[str, str, int, str, str]


class RedisLimiter:
    """The ``Limiter`` on a shared Redis (standalone or cluster). Build it with :meth:`from_url`.

    ``window_scale`` multiplies every window length; it exists for tests only (production: 1.0).
    """

    def __init__(
        self,
        admission: Client,
        background: Client,
        *,
        deadline_ms: float = 50,
        on_failure: str = "fail_open",
        replicas_hint: int = 1,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        window_scale: float = 1.0,
        breaker_threshold: int = 3,
        breaker_cooldown_s: float = 1.0,
        settle_queue_max: int = 100_000,
        settle_batch: int = 16,
        settle_timeout_s: float = 2.0,
        flush_timeout_s: float = 10.0,
        fast: PipelinedRedis | None = None,
        fast_background: PipelinedRedis | None = None,
        lease_s: float = CONCURRENCY_LEASE_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if on_failure not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_failure must be 'fail_open' or 'fail_closed', not {on_failure!r}")
        if replicas_hint < 1:
            raise ValueError("replicas_hint must be >= 1")
        if window_scale <= 0:
            raise ValueError("window_scale must be > 0")
        self._adm = admission
        self._bg = background
        # admission EVALSHAs go over this pipelined connection when given (single node only)
        self._fast = None if isinstance(admission, RedisCluster) else fast
        self._fast_bg = None if isinstance(background, RedisCluster) else fast_background
        self.cluster = isinstance(admission, RedisCluster)
        self._deadline_s = deadline_ms / 1000.0
        self._max_wait_s = max(max_wait_ms, deadline_ms) / 1000.0
        self.on_failure: str = on_failure
        self.replicas_hint = replicas_hint
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        # The fail-open limiter: made once, so its windows (what this replica admitted without Redis)
        # persist across every opening of the breaker; a flapping breaker never grants a fresh share.
        self.local = InMemoryLimiter(limit_divisor=replicas_hint, window_scale=window_scale, lease_s=lease_s,
                                    wall_clock=wall_clock)
        # redis-py admissions (TLS, Cluster): when each node last answered the admission client
        self._answered: dict[str, float] = {}
        self._scale = window_scale
        self._pool_w_s = max(1, round(POOL_WINDOW_S * 1000 * window_scale)) / 1000.0
        self._ttl_args = (
            str(round(RESERVATION_MIN_TTL_S * 1000)), str(max(1, round(lease_s * 1000 * window_scale)))
        )
        self._pool_w_arg = str(round(self._pool_w_s * 1000))
        # reserve.lua's EVALSHA for a (tenant, scopes, pools, calendar periods), packed but for the request
        # id and the costs
        self._reserve_templates: dict[
            tuple[str, tuple[ScopeLimit, ...], tuple[PoolCeiling, ...], tuple[tuple[float, float], ...]], Template
        ] = {}
        self._settle_template = Template(("EVALSHA", SETTLE.sha, 1), None, None, None, None)
        # epoch seconds: which calendar period a request falls in (tests inject a clock)
        self._wall = wall_clock

        # counters
        self.fail_open_decisions = 0
        self.fail_closed_decisions = 0
        self.round_trips = 0  # admission round trips (EVALSHA, SCRIPT LOAD)
        self.backend_errors = 0  # admission calls that failed (refused, lost, Redis silent for the deadline)
        self.late_answers = 0  # admissions answered by Redis after the deadline (a busy processor waited)
        self.busy_refusals = 0  # refused at max_wait although Redis was answering (never decided locally)
        self.settled = 0  # settlements delivered to Redis (found or not)
        self.settle_dropped = 0  # refused because the queue was full
        self.settle_errors = 0  # rejected by Redis with a script/data error (not retried)
        self.settle_retries = 0  # failed batch attempts (retried later)

        self._queue: deque[_Settlement] = deque()
        self._queue_max = settle_queue_max
        # Settlements per pipeline. Redis runs a client's pipeline as one block, and settle.lua takes
        # ~40 us of its time each; admissions wait behind the block. 16 keep the wait under ~1 ms.
        self._batch = settle_batch
        self._settle_timeout_s = settle_timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # degraded by a timeout: the script may have run anyway, so settle on Redis as well as locally
        self._maybe_on_redis: dict[tuple[str, str], None] = {}
        # cluster mode: redis-py's lazy topology discovery misbehaves under a burst of first calls (some
        # fail with "connection closed"), so each client is initialized once, before its first command
        self._ready: set[int] = set()
        self._ready_lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        deadline_ms: float = 50,
        on_failure: str = "fail_open",
        replicas_hint: int = 1,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        **kw: Any,
    ) -> RedisLimiter:
        """``redis://host:port/db`` (or ``rediss://``, ``unix://``), or ``redis+cluster://host:port`` for a
        Redis Cluster (any node). No I/O happens here. Two connection pools: admission (socket timeouts =
        ``max_wait_ms``; the deadline itself is the limiter's own, see ``_Watch``) and settlement (timeouts
        >= 1 s); on a single node (plain ``redis://`` or ``unix://``) the admission EVALSHA itself goes
        over one pipelined connection (extproc.limiter.resp; ``fast=False`` keeps redis-py for it)."""
        deadline_s = deadline_ms / 1000.0
        admission = redis_client(url, timeout_s=max(max_wait_ms, deadline_ms) / 1000.0)
        background = redis_client(url, timeout_s=max(1.0, deadline_s))
        fast = fast_bg = None
        use_fast = kw.pop("fast", True)
        if use_fast and not url.startswith(CLUSTER_SCHEME):
            # connecting is bounded by max_wait too: a busy loop may take longer than a deadline to see
            # even a prompt handshake (a refused connection fails at once either way)
            fast = PipelinedRedis.from_url(url, connect_timeout_s=max(max_wait_ms, deadline_ms) / 1000.0)
            fast_bg = PipelinedRedis.from_url(url, connect_timeout_s=max(1.0, deadline_s))
        return cls(
            admission,
            background,
            fast=fast,
            fast_background=fast_bg,
            deadline_ms=deadline_ms,
            on_failure=on_failure,
            replicas_hint=replicas_hint,
            max_wait_ms=max_wait_ms,
            **kw,
        )

    # -- scripts -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and SCRIPT LOAD both scripts now (optional: the first call loads them on NOSCRIPT)."""
        await self._initialized(self._adm)
        for script in (RESERVE, SETTLE):
            if self._fast is not None:  # also opens the admission connection before the first request
                await self._fast.call("SCRIPT", "LOAD", script.source)
            else:
                await _command(self._adm, "SCRIPT LOAD", script.source)

    async def _initialized(self, client: Client) -> None:
        if not isinstance(client, RedisCluster) or id(client) in self._ready:
            return
        async with self._ready_lock:
            if id(client) not in self._ready:
                await client.initialize()
                self._ready.add(id(client))

    async def _evalsha(
        self,
        client: Client,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[str | int],
        count: bool,
        waiting: _Waiting | None = None,
    ) -> Any:
        await self._initialized(client)
        fast = self._fast if client is self._adm else self._fast_bg if client is self._bg else None
        if fast is not None:
            return await self._evalsha_packed(fast, script, pack(("EVALSHA", script.sha, len(keys), *keys, *args)),
                                              count)
        if waiting is not None:
            waiting.node = self._node_of(client, keys[0])
        try:
            if count:
                self.round_trips += 1
            return await self._command(client, waiting, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            if count:
                self.round_trips += 2
            await self._command(client, waiting, "SCRIPT LOAD", script.source)
            return await self._command(client, waiting, "EVALSHA", script.sha, len(keys), *keys, *args)

    @staticmethod
    def _node_of(client: Client, key: str) -> str:
        """The node a key's command goes to ("" on a single node, or when the topology does not say)."""
        if not isinstance(client, RedisCluster):
            return ""
        try:
            node = client.get_node_from_key(key)
        except RedisError:
            return ""
        return "" if node is None else str(node.name)

    async def _command(self, client: Client, waiting: _Waiting | None, *args: Any) -> Any:
        """A redis-py command. For an admission, any answer (a reply or an error reply) is a sign of life
        of its node, which the watch of every admission waiting on that node looks for."""
        if waiting is not None:
            waiting.sent = time.monotonic()
        try:
            reply = await _command(client, *args)
        except ResponseError:
            if waiting is not None:
                self._answered[waiting.node] = time.monotonic()
            raise
        if waiting is not None:
            self._answered[waiting.node] = time.monotonic()
        return reply

    async def _evalsha_packed(self, fast: PipelinedRedis, script: _Script, payload: bytes, count: bool) -> Any:
        """An EVALSHA already packed (pack, Template.fill) over a pipelined connection."""
        if count:
            self.round_trips += 1
        try:
            return await fast.call_packed(payload)
        except NoScriptError:
            if count:
                self.round_trips += 2
            await fast.call("SCRIPT", "LOAD", script.source)
            return await fast.call_packed(payload)

    # -- admission ---------------------------------------------------------------------------------

    def _scope_parts(self, tenant: str, s: ScopeLimit, wall: float) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of one scope (see reserve.lua's header): its rules grouped by counter."""
        groups: dict[str, list[tuple[int, Rule]]] = {}
        for i, rule in enumerate(s.rules):
            groups.setdefault(rule.counter, []).append((i, rule))
        keys: list[str] = []
        args = [s.scope, "1" if s.enforce else "0", str(len(groups))]
        for counter, rules in groups.items():
            first = rules[0][1]
            keys.append(counter_key(tenant, s.scope, counter))
            if first.measure is Measure.CONCURRENT:
                args += ("c", "", "")
            elif first.window_s is not None:
                args += ("w", str(max(1, round(first.window_s * 1000 * self._scale))), "")
            else:
                assert first.calendar is not None
                start, end = first.calendar.bounds(wall)
                args += ("q", str(round(start * 1000)), str(round(end * 1000)))
            args.append(str(len(rules)))
            for i, rule in rules:
                args += (str(i), rule.measure.code, str(int(rule.limit)), "1" if rule.enforce else "0",
                         ",".join(str(p) for p in rule.alert_at))
        return keys, args

    @staticmethod
    def _pool_parts(p: PoolCeiling) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of one pool (reserve.lua, Phase 2)."""
        if not p.name or "\n" in p.name:
            raise ValueError(f"pool names must be non-empty and on one line: {p.name!r}")
        ceiling = p.tokens_per_minute
        keys = [pool_key(p.name), pool_spill_key(p.name), pool_owner_key(p.name, p.owner),
                pool_demand_key(p.name, p.owner)]
        args = [p.name, _opt(ceiling), _opt(p.low), p.owner, str(p.guaranteed),
                _opt(p.maximum if p.maximum is not None else ceiling), str(len(p.others))]
        for owner, guaranteed in p.others:
            keys += (pool_owner_key(p.name, owner), pool_demand_key(p.name, owner))
            args += (owner, str(guaranteed))
        return keys, args

    def encode(self, r: Reservation, *, pools: bool = True, wall: float | None = None) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of reserve.lua for a reservation (see the script's header). ``pools=False``
        (cluster mode): the pools are reserved by later calls and only named in the record."""
        if not r.request_id:
            raise ValueError("request_id must not be empty")
        now = self._wall() if wall is None else wall
        pool_parts = [self._pool_parts(p) for p in r.pools]  # validates the names
        keys = [reservation_key(r.tenant, r.request_id)]
        args = [r.request_id, str(r.input_tokens), str(r.output_part), str(round(now * 1000)), *self._ttl_args]
        later = "" if pools else "\n".join(p.name for p in r.pools if p.tokens_per_minute is not None)
        args += (str(len(r.scopes)), str(len(r.pools) if pools else 0), later, self._pool_w_arg)
        for s in r.scopes:
            k, a = self._scope_parts(r.tenant, s, now)
            keys += k
            args += a
        if pools:
            for k2, a2 in pool_parts:
                keys += k2
                args += a2
        return keys, args

    async def reserve(self, r: Reservation) -> Decision:
        started = time.monotonic()
        fast = self._fast
        wall = self._wall()
        if fast is not None:
            payload = self._reserve_template(r, wall).fill(
                reservation_key(r.tenant, r.request_id), r.request_id, r.input_tokens, r.output_part,
                round(wall * 1000))
        else:
            keys, args = self.encode(r, pools=not self.cluster, wall=wall)
        if not self.breaker.allow():
            return self._degraded(r)
        waiting = None if fast is not None else _Waiting(self._answered)
        try:
            if fast is not None:
                decision = decode_decision(await self._admit_fast(fast, payload, r, started), r.request_id)
            else:
                assert waiting is not None
                decision = await self._admit_redis_py(r, keys, args, waiting, started)
        except ProcessorBusy as busy:
            # Redis answers (or a blocked loop cannot tell); this processor could not read the answer in
            # time. Never a Redis failure and never a local decision: refuse, like fail_closed.
            self.busy_refusals += 1
            if busy.redis_answered:
                self.breaker.success()
            if waiting is not None:  # redis-py: the script may have run; undo it (fast: done on its reply)
                self._enqueue((r.tenant, r.request_id, 0, "c", ""))
            return Decision(allowed=False, retry_after_seconds=1.0, denied_kind=KIND_BACKEND, degraded=True)
        except _BACKEND_ERRORS as exc:
            self.backend_errors += 1
            self.breaker.failure()
            log.debug("redis limiter: admission failed (%r); deciding %s", exc, self.on_failure)
            # A hung server executes what it was sent once it resumes: after a timeout the script may
            # still run, so what Redis may hold must be undone (cluster) or settled there too.
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            if self.cluster and waiting is not None and (waiting.tenant_done or timed_out):
                # the tenant's shard (and maybe a pool's) reserved before a later call failed
                self._enqueue((r.tenant, r.request_id, 0, "c", ""))
            decision = self._degraded(r)
            if decision.allowed and timed_out and not self.cluster:
                self._maybe_on_redis[(r.tenant, r.request_id)] = None
                if len(self._maybe_on_redis) > self._queue_max:
                    del self._maybe_on_redis[next(iter(self._maybe_on_redis))]
            return decision
        self.breaker.success()
        if time.monotonic() - started > self._deadline_s:
            self.late_answers += 1
        return decision

    async def _admit_fast(self, fast: PipelinedRedis, payload: bytes, r: Reservation, started: float) -> Any:
        """reserve.lua over the pipelined connection, each round trip under a ``_Watch``."""
        self.round_trips += 1
        try:
            return await self._watched(fast, payload, r, started)
        except NoScriptError:
            self.round_trips += 2
            await self._watched(fast, pack(("SCRIPT", "LOAD", RESERVE.source)), None, started)
            return await self._watched(fast, payload, r, started)

    async def _watched(self, fast: PipelinedRedis, payload: bytes, r: Reservation | None, started: float) -> Any:
        proto = fast.live() or await fast.connection()
        since = time.monotonic()
        fut = proto.send(payload)
        watch = _Watch(asyncio.get_running_loop(), fut, proto.heard_at, since, started + self._max_wait_s,
                       self._deadline_s, exact=True)
        try:
            return await fut
        except ProcessorBusy:
            if r is not None:  # the script will run (Redis answers): take back what it reserves
                proto.on_late_reply(fut, functools.partial(self._undo_late, r.tenant, r.request_id))
            raise
        except (RedisStalled, asyncio.CancelledError):
            fast.gave_up(proto)
            raise
        finally:
            watch.cancel()

    def _undo_late(self, tenant: str, request_id: str, reply: Any) -> None:
        """The late reply of an admission refused at max_wait (or the loss of its connection)."""
        if isinstance(reply, BaseException) or (isinstance(reply, list) and reply and int(reply[0]) == 1):
            self._enqueue((tenant, request_id, 0, "c", ""))

    async def _admit_redis_py(
        self, r: Reservation, keys: list[str], args: list[str], waiting: _Waiting, started: float
    ) -> Decision:
        """redis-py (TLS, Cluster): the whole admission in one task under one ``_Watch``. redis-py's
        connections do not show their unread bytes, so the sign of life is the latest answer of the node
        the admission waits on, to any admission of this limiter."""
        task = asyncio.ensure_future(self._admit_calls(r, keys, args, waiting))
        watch = _Watch(asyncio.get_running_loop(), task, waiting.heard, started, started + self._max_wait_s,
                       self._deadline_s, exact=False)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if watch.verdict is None or (current is not None and current.cancelling()):
                raise
            raise watch.verdict from None
        finally:
            watch.cancel()

    async def _admit_calls(self, r: Reservation, keys: list[str], args: list[str], waiting: _Waiting) -> Decision:
        decision = decode_decision(await self._evalsha(self._adm, RESERVE, keys, args, True, waiting), r.request_id)
        waiting.tenant_done = True
        if self.cluster and decision.allowed and r.pools:
            decision = await self._choose_pool_on_cluster(r, decision, waiting)
        return decision

    def _reserve_template(self, r: Reservation, wall: float) -> Template:
        """reserve.lua's EVALSHA for this caller's scopes and pools, packed once per calendar period
        (encode validates): only the reservation key, the request id, the costs and the wall clock
        change between a caller's requests."""
        if not r.request_id:
            raise ValueError("request_id must not be empty")
        periods = tuple(rule.calendar.bounds(wall) for s in r.scopes for rule in s.rules if rule.calendar is not None)
        ck = (r.tenant, r.scopes, r.pools, periods)
        template = self._reserve_templates.get(ck)
        if template is None:
            keys, args = self.encode(r, wall=wall)
            if len(self._reserve_templates) >= 65536:
                self._reserve_templates.clear()
            template = self._reserve_templates[ck] = Template(
                ("EVALSHA", RESERVE.sha, len(keys)), None, tuple(keys[1:]), None, None, None, None, tuple(args[4:])
            )
        return template

    async def _choose_pool_on_cluster(self, r: Reservation, admitted: Decision, waiting: _Waiting) -> Decision:
        """Cluster mode, after the tenant's shard admitted: the first pool with room, one call each."""
        cin, cout = str(r.input_tokens), str(r.output_part)
        wait = -1.0
        for p in r.pools:
            if p.tokens_per_minute is None:
                return dataclasses.replace(admitted, pool=p.name)
            pool_keys, pool_args = self._pool_parts(p)
            keys = [pool_reservation_key(p.name, r.tenant, r.request_id), *pool_keys]
            # (no calendar period on a pool: no wall clock)
            args = [r.request_id, cin, cout, "0", *self._ttl_args, "0", "1", "", self._pool_w_arg, *pool_args]
            d = decode_decision(await self._evalsha(self._adm, RESERVE, keys, args, True, waiting), r.request_id)
            if d.allowed:
                return dataclasses.replace(admitted, pool=p.name)
            if d.denied_kind == KIND_POOL and (wait < 0 or d.retry_after_seconds < wait):
                wait = d.retry_after_seconds
        # no pool has room: give the tenant's reservation back, as if it had never been made
        await self._evalsha(self._adm, SETTLE, [reservation_key(r.tenant, r.request_id)], [0, "c", ""], True,
                            waiting)
        return Decision(
            allowed=False,
            retry_after_seconds=max(0.0, wait),
            denied_scope=POOL_SCOPE,
            denied_kind=KIND_POOL if wait >= 0 else KIND_TOO_LARGE,
            tokens=_give_back(admitted.tokens, r.input_tokens + r.output_part),
            requests=_give_back(admitted.requests, 1),
            quota=_give_back(admitted.quota, r.input_tokens + r.output_part),
            alerts=admitted.alerts,
            over=admitted.over,
        )

    def _degraded(self, r: Reservation) -> Decision:
        if self.on_failure == "fail_closed":
            self.fail_closed_decisions += 1
            return Decision(allowed=False, retry_after_seconds=1.0, denied_kind=KIND_BACKEND, degraded=True)
        self.fail_open_decisions += 1
        return dataclasses.replace(self.local.reserve_sync(r), degraded=True)

    # -- settlement --------------------------------------------------------------------------------

    @property
    def settle_queue_depth(self) -> int:
        return len(self._queue)

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        """Enqueue; the background task applies it. Needs a running event loop."""
        # a reservation decided while degraded lives in the local limiter: settle it there at once, and
        # only there unless its admission timed out (then Redis may hold it too)
        if self.local.settle_sync(tenant, request_id, actual_tokens, output_tokens):
            if (tenant, request_id) not in self._maybe_on_redis:
                return
            del self._maybe_on_redis[(tenant, request_id)]
        self._enqueue((tenant, request_id, max(0, int(actual_tokens)), "s", _out(output_tokens)))

    def _enqueue(self, item: _Settlement) -> None:
        if len(self._queue) >= self._queue_max:
            self.settle_dropped += 1
            if self.settle_dropped == 1 or self.settle_dropped % 10_000 == 0:
                log.error("redis limiter: settlement queue full (%d); %d dropped", self._queue_max,
                          self.settle_dropped)
            return
        self._queue.append(item)
        self._drained.clear()
        self._wake.set()
        self._ensure_worker()

    async def _apply_now(self, item: _Settlement) -> bool:
        tenant, rid, actual, mode, out = item
        args: list[str | int] = [actual, mode, out]
        found, later = await self._evalsha(self._bg, SETTLE, [reservation_key(tenant, rid)], args, False)
        for pool in _names(later):
            await self._evalsha(self._bg, SETTLE, [pool_reservation_key(pool, tenant, rid)], args, False)
        return bool(found)

    async def settle_now(
        self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None
    ) -> bool:
        """Apply at once; True if a reservation was found and settled (locally or on Redis)."""
        local = self.local.settle_sync(tenant, request_id, actual_tokens, output_tokens)
        item = (tenant, request_id, max(0, int(actual_tokens)), "s", _out(output_tokens))
        return await self._apply_now(item) or local

    async def cancel_now(self, tenant: str, request_id: str) -> bool:
        """Undo a reservation entirely, as if it had never been admitted."""
        local = self.local.cancel_sync(tenant, request_id)
        return await self._apply_now((tenant, request_id, 0, "c", "")) or local

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            if self._closed:
                return
            self._worker = asyncio.get_running_loop().create_task(self._settle_loop(), name="limiter-settle")

    async def _settle_loop(self) -> None:
        backoff_min, backoff_max = 0.05, 2.0
        backoff = backoff_min
        failing = False
        while True:
            if not self._queue:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(itertools.islice(self._queue, self._batch))
            try:
                async with asyncio.timeout(self._settle_timeout_s):
                    await self._apply_batch(batch)
            except _BACKEND_ERRORS as exc:
                self.settle_retries += 1
                if not failing:
                    log.warning(
                        "redis limiter: settlements held (%d queued), retrying: %r", len(self._queue), exc
                    )
                failing = True
                self._retry_now.clear()
                try:
                    async with asyncio.timeout(backoff):
                        await self._retry_now.wait()
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, backoff_max)
                continue
            for _ in batch:
                self._queue.popleft()
            self.settled += len(batch)
            if failing:
                log.warning("redis limiter: settlements flowing again (%d queued)", len(self._queue))
            failing = False
            backoff = backoff_min

    async def _apply_batch(self, batch: list[_Settlement]) -> None:
        """One pipeline of settle.lua calls on the tenants' records; in cluster mode a second one on the
        records of the pools those name (on other shards; the pool not chosen has none: a no-op)."""
        await self._initialized(self._bg)
        calls = [(reservation_key(tenant, rid), actual, mode, out) for tenant, rid, actual, mode, out in batch]
        results = await self._pipelined(calls)
        pool_calls = [
            (pool_reservation_key(pool, tenant, rid), actual, mode, out)
            for (tenant, rid, actual, mode, out), result in zip(batch, results, strict=True)
            if isinstance(result, list)
            for pool in _names(result[1])
        ]
        if pool_calls:
            await self._pipelined(pool_calls)

    async def _pipelined(self, calls: list[tuple[str, int, str, str]]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            replies = await self._send_settles([calls[i] for i in pending])
            again = []
            for i, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    again.append(i)
                elif isinstance(reply, ResponseError):
                    self.settle_errors += 1
                    log.error("redis limiter: settlement of %s rejected: %s", calls[i][0], reply)
                elif isinstance(reply, BaseException):
                    raise reply
                else:
                    results[i] = reply
            if not again:
                break
            if self._fast_bg is not None:
                await self._fast_bg.call("SCRIPT", "LOAD", SETTLE.source)
            else:
                await _command(self._bg, "SCRIPT LOAD", SETTLE.source)
            pending = again
        return results

    async def _send_settles(self, calls: list[tuple[str, int, str, str]]) -> list[Any]:
        """settle.lua for each call in one round trip: replies or error-reply exceptions, in order."""
        if self._fast_bg is not None:
            fill = self._settle_template.fill
            return await self._fast_bg.call_many_packed([fill(k, a, m, o) for k, a, m, o in calls])
        pipe = self._bg.pipeline(transaction=False)
        for key, actual, mode, out in calls:
            pipe.execute_command("EVALSHA", SETTLE.sha, 1, key, actual, mode, out)
        return list(await pipe.execute(raise_on_error=False))

    async def flush(self) -> None:
        """Wait until every queued settlement reached Redis (at most ``flush_timeout_s``)."""
        if not self._queue:
            return
        self._ensure_worker()
        self._retry_now.set()
        try:
            async with asyncio.timeout(self._flush_timeout_s):
                while self._queue:
                    await self._drained.wait()
        except TimeoutError:
            log.warning("redis limiter: flush gave up after %.1fs with %d settlements queued",
                        self._flush_timeout_s, len(self._queue))

    async def aclose(self) -> None:
        await self.flush()
        self._closed = True
        if self._queue:
            log.error("redis limiter: closing with %d settlements not applied", len(self._queue))
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        await self._adm.aclose()
        await self._bg.aclose()
        for fast in (self._fast, self._fast_bg):
            if fast is not None:
                await fast.aclose()


def _names(raw: Any) -> list[str]:
    """The newline-separated pool names settle.lua returns."""
    text = _text(raw)
    return text.split("\n") if text else []


def _out(output_tokens: int | None) -> str:
    return "" if output_tokens is None else str(max(0, int(output_tokens)))


def _give_back(status: WindowStatus | None, amount: int) -> WindowStatus | None:
    """A header status of an admission that was then undone (cluster mode, no pool had room)."""
    if status is None:
        return None
    return WindowStatus(status.limit, min(status.limit, status.remaining + amount), status.reset_seconds)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _status(raw: Sequence[Any], at: int) -> WindowStatus | None:
    if int(raw[at]) < 0:
        return None
    return WindowStatus(limit=int(raw[at]), remaining=int(raw[at + 1]), reset_seconds=int(raw[at + 2]) / 1000.0)


def decode_decision(raw: Sequence[Any], request_id: str) -> Decision:
    """reserve.lua's reply -> Decision."""
    status = int(raw[0])
    if status == 2:
        raise DuplicateReservation(f"request id {request_id!r} already has a live reservation")
    n_over = int(raw[15])
    over = tuple((_text(raw[i]), int(raw[i + 1]), int(raw[i + 2])) for i in range(16, 16 + 3 * n_over, 3))
    rest = raw[16 + 3 * n_over:]
    thresholds = tuple(
        Threshold(scope=_text(rest[i]), rule=int(rest[i + 1]), percent=int(rest[i + 2]), used=int(rest[i + 3]),
                  limit=int(rest[i + 4]), period_end=int(rest[i + 5]) / 1000.0)
        for i in range(0, len(rest) - 5, 6)
    )
    alerts: list[str] = []
    for scope, _, _ in over:
        if scope not in alerts:
            alerts.append(scope)
    denied_rule = int(raw[5])
    return Decision(
        allowed=status == 1,
        pool=_text(raw[1]) or None,
        retry_after_seconds=int(raw[2]) / 1000.0,
        denied_scope=_text(raw[3]) or None,
        denied_kind=_text(raw[4]) or None,
        denied_rule=denied_rule if denied_rule >= 0 else None,
        tokens=_status(raw, 6),
        requests=_status(raw, 9),
        quota=_status(raw, 12),
        alerts=tuple(alerts),
        over=over,
        thresholds=thresholds,
    )
