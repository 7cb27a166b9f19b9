"""The harness of the limiter conformance suites (test_limiter_conformance.py, test_limiter_rules.py): one
backend (in-memory, a real redis-server, a real 3-node Redis Cluster) plus the ways a test reads its
counters and moves its time.

Sliding windows are scaled down (``window_scale``) so that a minute lasts WINDOW seconds: the memory
backend travels in time on a fake clock (exact assertions), the Redis backends really wait (assertions
allow for scheduling delays, never in the direction that would hide an over-admission). Calendar periods
follow the wall clock given to the limiter: a fake one (``FakeClock``) for both backends when a test
asks for it, or the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

import pytest
from redis.asyncio import RedisCluster

from extproc.limiter import Decision, InMemoryLimiter, PoolCeiling, RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.memory import counted
from extproc.limiter.redis_backend import Client, counter_key, pool_key, pool_owner_key, redis_client
from extproc.limiter.types import CONCURRENCY_LEASE_S, POOL_WINDOW_S, Measure, Rule

SCALE = 1 / 64  # a power of two keeps the fake clock's arithmetic exact
WINDOW = 60 * SCALE  # a scaled minute: 0.9375 s
HOUR_WINDOW = 3600 * SCALE  # a scaled hour: 56.25 s
TENANT = "acme"
BACKENDS = ["memory", "redis", "cluster"]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Harness:
    """A backend plus the ways a test reads its state and moves its time."""

    def __init__(self, name: str, limiter: InMemoryLimiter | RedisLimiter, clock: FakeClock | None,
                 wall: FakeClock | None, client: Client | None, scale: float = SCALE) -> None:
        self.name = name
        self.limiter = limiter
        self.clock = clock  # the memory backend's monotonic clock (sliding windows, leases)
        self.wall = wall  # the calendar clock of both backends, when faked
        self.client = client
        self.scale = scale
        self.exact = clock is not None
        self._ids = 0

    def rid(self) -> str:
        self._ids += 1
        return f"req-{self._ids}"

    async def advance(self, seconds: float) -> None:
        """Let time pass: the fake clock jumps (memory), or the test really waits (Redis: its TIME).
        A fake wall clock moves along either way."""
        if self.wall is not None:
            self.wall.now += seconds
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def reserve(
        self,
        tokens: int,
        *scopes: ScopeLimit,
        pools: tuple[PoolCeiling, ...] = (),
        request_id: str | None = None,
        tenant: str = TENANT,
        output: int = 0,
    ) -> Decision:
        d = await self.limiter.reserve(
            Reservation(request_id or self.rid(), tenant, tuple(scopes), tokens, pools, output_tokens=output)
        )
        assert not d.degraded, "the shared backend must answer in these tests"
        return d

    async def _redis_now_ms(self) -> int:
        assert self.client is not None
        sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def _window(self, key: str, width_s: float, measure: Measure) -> int:
        """What the entries of a sliding window ZSET count now (its running totals are not entries)."""
        assert self.client is not None
        now_ms = await self._redis_now_ms()
        oldest = f"({now_ms - max(1, round(width_s * 1000))}"  # exclusive: the window is (now - W, now]
        members = cast(list[bytes], await self.client.zrangebyscore(key, oldest, "+inf"))
        total = 0
        for m in members:
            inp, out, _ = m.split(b"|", 2)
            total += counted(measure, int(inp), int(out), 1)
        return total

    async def used(self, scope: str, rule: Rule, tenant: str = TENANT) -> int:
        """What one rule of a scope counts now, read from the backend's own storage."""
        if isinstance(self.limiter, InMemoryLimiter):
            return self.limiter.used(tenant, scope, rule)
        assert self.client is not None
        key = counter_key(tenant, scope, rule.counter)
        if rule.measure is Measure.CONCURRENT:
            return int(await self.client.zcount(key, f"({await self._redis_now_ms()}", "+inf"))
        if rule.window_s is not None:
            return await self._window(key, rule.window_s * self.scale, rule.measure)
        assert rule.calendar is not None
        start, _ = rule.calendar.bounds(self.wall() if self.wall is not None else time.time())
        p, i, o, r = cast(list[bytes | None], await self.client.hmget(key, ["p", "i", "o", "r"]))
        if p is None or int(p) < round(start * 1000):
            return 0
        counts = {Measure.TOKENS: int(i or 0) + int(o or 0), Measure.INPUT_TOKENS: int(i or 0),
                  Measure.OUTPUT_TOKENS: int(o or 0), Measure.REQUESTS: int(r or 0)}
        return counts[rule.measure]

    async def counters(self, scope: str, tenant: str = TENANT) -> set[str]:
        """The ids of the counters a scope stores something in (``Rule.counter``)."""
        if isinstance(self.limiter, InMemoryLimiter):
            stores = (self.limiter._logs, self.limiter._periods, self.limiter._slots)
            return {k[2] for store in stores for k in store if k[:2] == (tenant, scope)}
        assert self.client is not None
        prefix = counter_key(tenant, scope, "")
        if isinstance(self.client, RedisCluster):  # a tenant's keys are all in one slot
            await self.client.initialize()  # (once: the topology, for the key's node)
            node = self.client.get_node_from_key(prefix)
            keys = cast(list[bytes], await self.client.execute_command("KEYS", prefix + "*", target_nodes=node))
        else:
            keys = cast(list[bytes], await self.client.keys(prefix + "*"))
        return {k.decode().removeprefix(prefix) for k in keys}

    async def pool_tokens(self, pool: str, owner: str = "") -> int:
        """The tokens in a pool's window now, or (``owner``) in that owner's share of it."""
        if isinstance(self.limiter, InMemoryLimiter):
            return self.limiter.pool_total(pool, owner)
        key = pool_owner_key(pool, owner) if owner else pool_key(pool)
        return await self._window(key, POOL_WINDOW_S * self.scale, Measure.TOKENS)

    def assert_wait(self, actual: float, expected: float) -> None:
        """A retry-after equals the expected wait; on real time it may be smaller by the time that passed."""
        if self.exact:
            assert actual == pytest.approx(expected, abs=1e-6)
        else:
            assert expected - 0.4 <= actual <= expected + 0.01, (actual, expected)

    def before(self, wait: float) -> float:
        """How long to travel so that we are still inside a wait (exactly to the edge on the fake clock)."""
        return wait - 2**-20 if self.exact else wait * 0.4

    def after(self, wait: float) -> float:
        return wait if self.exact else wait + 0.02


@asynccontextmanager
async def harness(request: pytest.FixtureRequest, *, wall: FakeClock | None = None,
                  lease_s: float | None = None, scale: float = SCALE) -> AsyncIterator[Harness]:
    """The backend named by ``request.param``; ``wall``: the calendar clock (default: the real one);
    ``lease_s``: the concurrency lease before scaling (default: the limiter's); ``scale``: what sliding
    windows and the lease are multiplied by."""
    wall_clock: Callable[[], float] = time.time if wall is None else wall
    lease = CONCURRENCY_LEASE_S if lease_s is None else lease_s
    if request.param == "memory":
        clock = FakeClock()
        limiter = InMemoryLimiter(clock=clock, wall_clock=wall_clock, window_scale=scale, lease_s=lease)
        yield Harness("memory", limiter, clock, wall, None, scale)
        return
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    rlimiter = RedisLimiter.from_url(url, deadline_ms=2000, window_scale=scale, wall_clock=wall_clock,
                                     lease_s=lease)
    client = redis_client(url, timeout_s=5.0)
    try:
        yield Harness(str(request.param), rlimiter, None, wall, client, scale)
    finally:
        await rlimiter.aclose()
        await client.aclose()
