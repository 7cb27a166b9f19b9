"""The shared limiter: one Lua script per admission on Redis, settlements queued off the request path.

Admission path (``reserve``):
  * one EVALSHA of ``reserve.lua`` (SCRIPT LOAD on first use / on NOSCRIPT, then one retry);
  * redis-py with retries disabled and socket timeouts = the deadline; the whole call is wrapped in
    ``asyncio.timeout(deadline_ms)``, so a hung Redis costs one deadline, not redis-py's ~4 s of retries;
  * a circuit breaker opens after ``breaker_threshold`` consecutive failures and sends one probe after
    ``breaker_cooldown_s``; while it is open nothing waits on Redis at all;
  * on failure: ``fail_open`` decides with a per-replica ``InMemoryLimiter`` (every limit divided by
    ``replicas_hint``, rounded up) and returns ``degraded=True``; ``fail_closed`` refuses with
    ``denied_kind="backend"``.

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

Scope encoding: flat ARGV (8 strings per scope, 2 per pool) and declared KEYS (3 per scope, 1 per pool),
cached per (tenant, scope): no JSON to build or decode on either side.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    KIND_BACKEND,
    KIND_POOL,
    KIND_TOO_LARGE,
    POOL_SCOPE,
    REQUESTS_HOUR_WINDOW_S,
    REQUESTS_MINUTE_WINDOW_S,
    RESERVATION_MIN_TTL_S,
    TOKENS_WINDOW_S,
    Decision,
    DuplicateReservation,
    PoolCeiling,
    Reservation,
    ScopeLimit,
    WindowStatus,
)

log = logging.getLogger(__name__)

Client = Redis | RedisCluster
CLUSTER_SCHEME = "redis+cluster://"

_BACKEND_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

# tokens/min and requests/min share one window (one ZSET per scope), so their lengths must match
assert TOKENS_WINDOW_S == REQUESTS_MINUTE_WINDOW_S


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


def scope_keys(tenant: str, scope: str) -> tuple[str, str, str]:
    """(minute window zset: tokens/min and requests/min, hour window zset: requests/hour, quota hash)."""
    w = f"{tenant_tag(tenant)}:w:{scope}:"
    return w + "1m", w + "1h", f"{tenant_tag(tenant)}:q:{scope}"


def pool_key(pool: str) -> str:
    """A pool's minute window: a global key, not tied to a tenant."""
    return f"tm:{{pool:{pool}}}:1m"


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


def _period_code(period: str) -> str:
    if period == "month":
        return "m"
    if period == "day":
        return "d"
    raise ValueError(f"quota_period must be 'day' or 'month', not {period!r}")


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
        self._failures = 0
        self._probe_since = None

    def failure(self) -> None:
        self._failures += 1
        self._probe_since = None
        if self._failures >= self.threshold:
            if self._failures == self.threshold:
                self.opened += 1
                log.warning("redis limiter: circuit open after %d consecutive failures", self._failures)
            self._open_until = self._clock() + self.cooldown


# (tenant, request id, actual tokens, "s" settle | "c" cancel)
_Settlement = tuple[str, str, int, str]


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
        window_scale: float = 1.0,
        breaker_threshold: int = 3,
        breaker_cooldown_s: float = 1.0,
        settle_queue_max: int = 100_000,
        settle_batch: int = 16,
        settle_timeout_s: float = 2.0,
        flush_timeout_s: float = 10.0,
        fast: PipelinedRedis | None = None,
        fast_background: PipelinedRedis | None = None,
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
        self.on_failure: str = on_failure
        self.replicas_hint = replicas_hint
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        self.local = InMemoryLimiter(limit_divisor=replicas_hint, window_scale=window_scale)
        self._w_min_s = max(1, round(TOKENS_WINDOW_S * 1000 * window_scale)) / 1000.0
        w_hour = max(1, round(REQUESTS_HOUR_WINDOW_S * 1000 * window_scale))
        self._header_args = (
            str(round(self._w_min_s * 1000)), str(w_hour), str(round(RESERVATION_MIN_TTL_S * 1000))
        )
        self._scope_cache: dict[tuple[str, ScopeLimit], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # reserve.lua's EVALSHA for a (tenant, scopes, pools), packed but for the request id and cost
        self._reserve_templates: dict[tuple[str, tuple[ScopeLimit, ...], tuple[PoolCeiling, ...]], Template] = {}
        self._settle_template = Template(("EVALSHA", SETTLE.sha, 1), None, None, None)
        self._pool_cache: dict[PoolCeiling, tuple[tuple[str, ...], tuple[str, ...]]] = {}

        # counters
        self.fail_open_decisions = 0
        self.fail_closed_decisions = 0
        self.round_trips = 0  # admission round trips (EVALSHA, SCRIPT LOAD)
        self.backend_errors = 0  # admission calls that failed or missed the deadline
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
        **kw: Any,
    ) -> RedisLimiter:
        """``redis://host:port/db`` (or ``rediss://``, ``unix://``), or ``redis+cluster://host:port`` for a
        Redis Cluster (any node). No I/O happens here. Two connection pools: admission (timeouts = the
        deadline) and settlement (timeouts >= 1 s); on a single node (plain ``redis://`` or ``unix://``)
        the admission EVALSHA itself goes over one pipelined connection (extproc.limiter.resp;
        ``fast=False`` keeps redis-py for it)."""
        deadline_s = deadline_ms / 1000.0
        admission = redis_client(url, timeout_s=deadline_s)
        background = redis_client(url, timeout_s=max(1.0, deadline_s))
        fast = fast_bg = None
        if not url.startswith(CLUSTER_SCHEME) and kw.pop("fast", True):
            fast = PipelinedRedis.from_url(url, connect_timeout_s=deadline_s)
            fast_bg = PipelinedRedis.from_url(url, connect_timeout_s=max(1.0, deadline_s))
        return cls(
            admission,
            background,
            fast=fast,
            fast_background=fast_bg,
            deadline_ms=deadline_ms,
            on_failure=on_failure,
            replicas_hint=replicas_hint,
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
        self, client: Client, script: _Script, keys: Sequence[str], args: Sequence[str | int], count: bool
    ) -> Any:
        await self._initialized(client)
        fast = self._fast if client is self._adm else self._fast_bg if client is self._bg else None
        if fast is not None:
            return await self._evalsha_packed(fast, script, pack(("EVALSHA", script.sha, len(keys), *keys, *args)),
                                              count)
        try:
            if count:
                self.round_trips += 1
            return await _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            if count:
                self.round_trips += 2
            await _command(client, "SCRIPT LOAD", script.source)
            return await _command(client, "EVALSHA", script.sha, len(keys), *keys, *args)

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

    def _scope_parts(self, tenant: str, s: ScopeLimit) -> tuple[tuple[str, ...], tuple[str, ...]]:
        ck = (tenant, s)
        parts = self._scope_cache.get(ck)
        if parts is None:
            args = (
                s.scope,
                "1" if s.enforce else "0",
                _opt(s.tokens_per_minute),
                _opt(s.requests_per_minute),
                _opt(s.requests_per_hour),
                _opt(s.quota_tokens),
                _opt(s.quota_requests),
                _period_code(s.quota_period),
            )
            if len(self._scope_cache) >= 65536:
                self._scope_cache.clear()
            parts = self._scope_cache[ck] = (scope_keys(tenant, s.scope), args)
        return parts

    def _pool_parts(self, p: PoolCeiling) -> tuple[tuple[str, ...], tuple[str, ...]]:
        parts = self._pool_cache.get(p)
        if parts is None:
            if not p.name or "\n" in p.name:
                raise ValueError(f"pool names must be non-empty and on one line: {p.name!r}")
            if len(self._pool_cache) >= 4096:
                self._pool_cache.clear()
            parts = self._pool_cache[p] = ((pool_key(p.name),), (p.name, _opt(p.tokens_per_minute)))
        return parts

    def encode(self, r: Reservation, *, pools: bool = True) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of reserve.lua for a reservation (see the script's header). ``pools=False``
        (cluster mode): the pools are reserved by later calls and only named in the record."""
        if not r.request_id:
            raise ValueError("request_id must not be empty")
        for p in r.pools:
            self._pool_parts(p)  # validates the name (cached)
        keys = [reservation_key(r.tenant, r.request_id)]
        args = [r.request_id, str(max(0, int(r.tokens))), *self._header_args]
        later = "" if pools else "\n".join(p.name for p in r.pools if p.tokens_per_minute is not None)
        args += (str(len(r.scopes)), str(len(r.pools) if pools else 0), later)
        for s in r.scopes:
            k, a = self._scope_parts(r.tenant, s)
            keys += k
            args += a
        if pools:
            for p in r.pools:
                k, a = self._pool_parts(p)
                keys += k
                args += a
        return keys, args

    async def reserve(self, r: Reservation) -> Decision:
        fast = self._fast
        if fast is not None:
            payload = self._reserve_template(r).fill(
                reservation_key(r.tenant, r.request_id), r.request_id, max(0, int(r.tokens)))
        else:
            keys, args = self.encode(r, pools=not self.cluster)
        if not self.breaker.allow():
            return self._degraded(r)
        tenant_done = False
        try:
            async with asyncio.timeout(self._deadline_s):
                if fast is not None:
                    raw = await self._evalsha_packed(fast, RESERVE, payload, True)
                else:
                    raw = await self._evalsha(self._adm, RESERVE, keys, args, True)
                decision = decode_decision(raw, r.request_id)
                tenant_done = True
                if self.cluster and decision.allowed and r.pools:
                    decision = await self._choose_pool_on_cluster(r, decision)
        except _BACKEND_ERRORS as exc:
            self.backend_errors += 1
            self.breaker.failure()
            log.debug("redis limiter: admission failed (%r); deciding %s", exc, self.on_failure)
            # A hung server executes what it was sent once it resumes: after a timeout the script may
            # still run, so what Redis may hold must be undone (cluster) or settled there too.
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            if self.cluster and (tenant_done or timed_out):
                # the tenant's shard (and maybe a pool's) reserved before a later call failed
                self._enqueue((r.tenant, r.request_id, 0, "c"))
            decision = self._degraded(r)
            if decision.allowed and timed_out and not self.cluster:
                self._maybe_on_redis[(r.tenant, r.request_id)] = None
                if len(self._maybe_on_redis) > self._queue_max:
                    del self._maybe_on_redis[next(iter(self._maybe_on_redis))]
            return decision
        self.breaker.success()
        return decision

    def _reserve_template(self, r: Reservation) -> Template:
        """reserve.lua's EVALSHA for this caller's scopes and pools, packed once (encode validates):
        only the reservation key, the request id and the cost change between a caller's requests."""
        if not r.request_id:
            raise ValueError("request_id must not be empty")
        ck = (r.tenant, r.scopes, r.pools)
        template = self._reserve_templates.get(ck)
        if template is None:
            keys, args = self.encode(r)
            if len(self._reserve_templates) >= 65536:
                self._reserve_templates.clear()
            template = self._reserve_templates[ck] = Template(
                ("EVALSHA", RESERVE.sha, len(keys)), None, tuple(keys[1:]), None, None, tuple(args[2:])
            )
        return template

    async def _choose_pool_on_cluster(self, r: Reservation, admitted: Decision) -> Decision:
        """Cluster mode, after the tenant's shard admitted: the first pool with room, one call each."""
        cost = str(max(0, int(r.tokens)))
        wait = -1.0
        for p in r.pools:
            if p.tokens_per_minute is None:
                return dataclasses.replace(admitted, pool=p.name)
            keys = [pool_reservation_key(p.name, r.tenant, r.request_id), pool_key(p.name)]
            args = [r.request_id, cost, *self._header_args, "0", "1", "", p.name, str(p.tokens_per_minute)]
            d = decode_decision(await self._evalsha(self._adm, RESERVE, keys, args, True), r.request_id)
            if d.allowed:
                return dataclasses.replace(admitted, pool=p.name)
            if d.denied_kind == KIND_POOL and (wait < 0 or d.retry_after_seconds < wait):
                wait = d.retry_after_seconds
        # no pool has room: give the tenant's reservation back, as if it had never been made
        await self._evalsha(self._adm, SETTLE, [reservation_key(r.tenant, r.request_id)], [0, "c"], True)
        return Decision(
            allowed=False,
            retry_after_seconds=max(0.0, wait),
            denied_scope=POOL_SCOPE,
            denied_kind=KIND_POOL if wait >= 0 else KIND_TOO_LARGE,
            tokens=_give_back(admitted.tokens, int(cost), self._w_min_s),
            requests=_give_back(admitted.requests, 1, self._w_min_s),
            alerts=admitted.alerts,
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

    def settle(self, tenant: str, request_id: str, actual_tokens: int) -> None:
        """Enqueue; the background task applies it. Needs a running event loop."""
        # a reservation decided while degraded lives in the local limiter: settle it there at once, and
        # only there unless its admission timed out (then Redis may hold it too)
        if self.local.settle_sync(tenant, request_id, actual_tokens):
            if (tenant, request_id) not in self._maybe_on_redis:
                return
            del self._maybe_on_redis[(tenant, request_id)]
        self._enqueue((tenant, request_id, max(0, int(actual_tokens)), "s"))

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
        tenant, rid, actual, mode = item
        args: list[str | int] = [actual, mode]
        found, later = await self._evalsha(self._bg, SETTLE, [reservation_key(tenant, rid)], args, False)
        for pool in _names(later):
            await self._evalsha(self._bg, SETTLE, [pool_reservation_key(pool, tenant, rid)], args, False)
        return bool(found)

    async def settle_now(self, tenant: str, request_id: str, actual_tokens: int) -> bool:
        """Apply at once; True if a reservation was found and settled (locally or on Redis)."""
        local = self.local.settle_sync(tenant, request_id, actual_tokens)
        return await self._apply_now((tenant, request_id, max(0, int(actual_tokens)), "s")) or local

    async def cancel_now(self, tenant: str, request_id: str) -> bool:
        """Undo a reservation entirely, as if it had never been admitted."""
        local = self.local.cancel_sync(tenant, request_id)
        return await self._apply_now((tenant, request_id, 0, "c")) or local

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
        calls = [(reservation_key(tenant, rid), actual, mode) for tenant, rid, actual, mode in batch]
        results = await self._pipelined(calls)
        pool_calls = [
            (pool_reservation_key(pool, tenant, rid), actual, mode)
            for (tenant, rid, actual, mode), result in zip(batch, results, strict=True)
            if isinstance(result, list)
            for pool in _names(result[1])
        ]
        if pool_calls:
            await self._pipelined(pool_calls)

    async def _pipelined(self, calls: list[tuple[str, int, str]]) -> list[Any]:
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

    async def _send_settles(self, calls: list[tuple[str, int, str]]) -> list[Any]:
        """settle.lua for each call in one round trip: replies or error-reply exceptions, in order."""
        if self._fast_bg is not None:
            fill = self._settle_template.fill
            return await self._fast_bg.call_many_packed([fill(k, a, m) for k, a, m in calls])
        pipe = self._bg.pipeline(transaction=False)
        for key, actual, mode in calls:
            pipe.execute_command("EVALSHA", SETTLE.sha, 1, key, actual, mode)
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


def _give_back(status: WindowStatus | None, amount: int, window_s: float) -> WindowStatus | None:
    """A header status of an admission that was then undone (cluster mode, no pool had room)."""
    if status is None:
        return None
    return WindowStatus(status.limit, min(status.limit, status.remaining + amount), window_s)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_decision(raw: Sequence[Any], request_id: str) -> Decision:
    """reserve.lua's reply -> Decision."""
    status = int(raw[0])
    if status == 2:
        raise DuplicateReservation(f"request id {request_id!r} already has a live reservation")
    tokens = None
    if int(raw[5]) >= 0:
        tokens = WindowStatus(limit=int(raw[5]), remaining=int(raw[6]), reset_seconds=int(raw[7]) / 1000.0)
    requests = None
    if int(raw[8]) >= 0:
        requests = WindowStatus(limit=int(raw[8]), remaining=int(raw[9]), reset_seconds=int(raw[10]) / 1000.0)
    return Decision(
        allowed=status == 1,
        pool=_text(raw[1]) or None,
        retry_after_seconds=int(raw[2]) / 1000.0,
        denied_scope=_text(raw[3]) or None,
        denied_kind=_text(raw[4]) or None,
        tokens=tokens,
        requests=requests,
        alerts=tuple(_text(a) for a in raw[11:]),
    )
