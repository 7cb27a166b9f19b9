"""The limiter when its real redis-server is stopped, hung (SIGSTOP) or restarted."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from redis.asyncio import Redis

from extproc.devstack.redis_proc import RedisProcess
from extproc.limiter import RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.redis_backend import counter_key

TENANT = "acme"
SCOPE = ScopeLimit.of("key:acme-web", tokens_per_minute=1000)


def reservation(rid: str, tokens: int, scope: ScopeLimit = SCOPE) -> Reservation:
    return Reservation(rid, TENANT, (scope,), tokens)


async def tokens_in_window(url: str) -> int:
    client = Redis.from_url(url)
    try:
        key = counter_key(TENANT, SCOPE.scope, SCOPE.rules[0].counter)
        members = cast(list[bytes], await client.zrange(key, 0, -1))
        return sum(int(m.split(b"|")[0]) + int(m.split(b"|")[1]) for m in members if not m.startswith(b"#"))
    finally:
        await client.aclose()


def limiter(url: str, **kw: Any) -> RedisLimiter:
    kw.setdefault("breaker_cooldown_s", 0.2)
    return RedisLimiter.from_url(url, **kw)


async def test_a_stopped_redis_fails_open_on_each_replicas_share_of_the_limits(
    own_redis: RedisProcess,
) -> None:
    lim = limiter(own_redis.url, on_failure="fail_open", replicas_hint=2)
    try:
        own_redis.stop()
        d1 = await lim.reserve(reservation("a", 400))
        assert d1.allowed and d1.degraded
        assert d1.tokens is not None and d1.tokens.limit == 500  # 1000 / 2 replicas
        d2 = await lim.reserve(reservation("b", 400))
        assert not d2.allowed and d2.degraded and d2.denied_kind == "tokens"
        assert lim.fail_open_decisions == 2 and lim.fail_closed_decisions == 0
        # a reservation decided locally is settled locally at once
        lim.settle(TENANT, "a", 50)
        assert lim.settle_queue_depth == 0  # refused connections: Redis cannot hold that reservation
        assert (await lim.reserve(reservation("c", 400))).allowed
        assert lim.fail_open_decisions == 3
    finally:
        await lim.aclose()


async def test_a_stopped_redis_fails_closed_with_a_backend_denial(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, on_failure="fail_closed")
    try:
        own_redis.stop()
        d = await lim.reserve(reservation("a", 1))
        assert (d.allowed, d.degraded, d.denied_kind, d.retry_after_seconds) == (False, True, "backend", 1.0)
        assert lim.fail_closed_decisions == 1 and lim.fail_open_decisions == 0
    finally:
        await lim.aclose()


async def test_a_hung_redis_costs_one_deadline_then_the_circuit_opens(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, deadline_ms=150, breaker_threshold=3)
    try:
        assert not (await lim.reserve(reservation("warm", 1))).degraded
        own_redis.pause()
        for i in range(3):
            started = time.monotonic()
            d = await lim.reserve(reservation(f"hung{i}", 1))
            assert time.monotonic() - started < 0.5
            assert d.allowed and d.degraded
        assert lim.breaker.state == "open"
        trips = lim.round_trips
        started = time.monotonic()
        for i in range(50):  # the open circuit does not wait on Redis at all
            assert (await lim.reserve(reservation(f"open{i}", 1))).degraded
        assert time.monotonic() - started < 0.5
        assert lim.round_trips == trips
        own_redis.resume()
        await asyncio.sleep(0.3)  # past the cooldown: the next call is the probe
        d = await lim.reserve(reservation("back", 1))
        assert not d.degraded and lim.breaker.state == "closed"
        assert lim.fail_open_decisions == 53
    finally:
        own_redis.resume()
        await lim.aclose()


async def test_a_probe_into_a_still_hung_redis_reopens_the_circuit(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, deadline_ms=150, breaker_threshold=1)
    try:
        own_redis.pause()
        assert (await lim.reserve(reservation("a", 1))).degraded
        assert lim.breaker.state == "open"
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert (await lim.reserve(reservation("probe", 1))).degraded
        assert time.monotonic() - started < 0.5
        assert lim.breaker.state == "open"
    finally:
        own_redis.resume()
        await lim.aclose()


async def test_a_settlement_made_while_redis_hangs_is_applied_after_it_resumes(
    own_redis: RedisProcess,
) -> None:
    lim = limiter(own_redis.url, settle_timeout_s=0.2)
    try:
        assert (await lim.reserve(reservation("a", 800))).allowed
        own_redis.pause()
        lim.settle(TENANT, "a", 100)
        await asyncio.sleep(0.5)  # the worker's batch times out against the hung server, and is kept
        assert lim.settle_queue_depth == 1 and lim.settle_retries >= 1
        own_redis.resume()
        await lim.flush()
        assert lim.settle_queue_depth == 0
        assert await tokens_in_window(own_redis.url) == 100
        d = await lim.reserve(reservation("b", 800))  # the refund made room
        assert d.allowed and not d.degraded
    finally:
        own_redis.resume()
        await lim.aclose()


async def test_a_reservation_that_timed_out_is_settled_on_redis_too(own_redis: RedisProcess) -> None:
    """A hung server executes what it was sent once it resumes: the fail-open reservation exists on
    Redis as well, so its settlement goes to both places (a refused connection needs no such thing)."""
    lim = limiter(own_redis.url, deadline_ms=150)
    try:
        assert not (await lim.reserve(reservation("warm", 1))).degraded
        own_redis.pause()
        assert (await lim.reserve(reservation("hung", 500))).degraded
        own_redis.resume()
        await asyncio.sleep(0.3)
        assert await tokens_in_window(own_redis.url) == 501  # the script ran after all
        lim.settle(TENANT, "hung", 20)
        assert lim.settle_queue_depth == 1
        await lim.flush()
        assert await tokens_in_window(own_redis.url) == 21
    finally:
        own_redis.resume()
        await lim.aclose()


async def test_queued_settlements_survive_a_redis_restart(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, settle_timeout_s=0.2)
    try:
        for i in range(5):
            assert not (await lim.reserve(reservation(f"r{i}", 100))).degraded
        own_redis.stop()
        for i in range(5):
            lim.settle(TENANT, f"r{i}", 10)
        await asyncio.sleep(0.4)  # several failed attempts: refused connections
        assert lim.settle_queue_depth == 5 and lim.settle_retries >= 2
        assert lim._worker is not None and not lim._worker.done()
        assert (await lim.reserve(reservation("down", 100))).degraded
        own_redis.restart()
        await lim.flush()
        assert lim.settle_queue_depth == 0 and lim.settled == 5 and lim.settle_dropped == 0
        # the restarted server lost its data and its script cache: reserve reloads the script
        await asyncio.sleep(0.3)  # past the breaker's cooldown
        d = await lim.reserve(reservation("after", 100))
        assert d.allowed and not d.degraded
        assert await tokens_in_window(own_redis.url) == 100
    finally:
        await lim.aclose()


async def test_a_full_settlement_queue_counts_what_it_drops(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, settle_queue_max=3, settle_timeout_s=0.2)
    try:
        own_redis.stop()
        for i in range(5):
            lim.settle(TENANT, f"r{i}", 10)
        assert lim.settle_queue_depth == 3 and lim.settle_dropped == 2
    finally:
        own_redis.restart()
        await lim.aclose()
        assert lim.settle_queue_depth == 0


async def test_closing_with_redis_down_gives_up_after_the_flush_timeout(own_redis: RedisProcess) -> None:
    lim = limiter(own_redis.url, settle_timeout_s=0.1, flush_timeout_s=0.5)
    own_redis.stop()
    lim.settle(TENANT, "x", 1)
    started = time.monotonic()
    await lim.aclose()
    assert time.monotonic() - started < 2.0
    assert lim.settle_queue_depth == 1


async def test_a_flushed_script_cache_is_reloaded_on_the_next_admission(own_redis: RedisProcess) -> None:
    # The second admission of the same caller goes out from its packed template: after SCRIPT FLUSH
    # (a Redis restart without persistence, a failover) it gets NOSCRIPT and must load and retry.
    lim = limiter(own_redis.url)
    client = Redis.from_url(own_redis.url)
    try:
        assert (await lim.reserve(reservation("r1", 100))).allowed
        await client.script_flush()
        d = await lim.reserve(reservation("r2", 200))
        assert d.allowed and not d.degraded
        assert lim.backend_errors == 0
        assert await tokens_in_window(own_redis.url) == 300
    finally:
        await lim.aclose()
        await client.aclose()


async def test_fail_open_admits_at_most_one_limit_per_window_on_top_of_redis_however_often_the_breaker_opens(
    own_redis: RedisProcess,
) -> None:
    """The bound of extproc/limiter/README.md ("Failure behaviour"): each replica's fail-open limiter
    admits at most ceil(L / replicas_hint) per window, and keeps that window across breaker openings,
    so N = replicas_hint replicas add at most N * ceil(L / N) (= L here) to what Redis holds, even
    when the breaker opens and closes again and again inside one window."""
    n, limit = 3, 900
    tight = ScopeLimit.of("key:tight", tokens_per_minute=limit)
    replicas = [limiter(own_redis.url, replicas_hint=n, breaker_threshold=1, breaker_cooldown_s=0.1)
                for _ in range(n)]
    degraded = [0] * n
    try:
        # Redis holds a full window first
        assert (await replicas[0].reserve(reservation("full", limit, tight))).allowed
        for rnd in range(3):
            own_redis.stop()
            for i, lim in enumerate(replicas):
                for j in range(40):  # 400 tokens asked per replica per round; its share is 300
                    d = await lim.reserve(reservation(f"{rnd}-{i}-{j}", 10, tight))
                    assert d.degraded
                    degraded[i] += 10 if d.allowed else 0
                assert lim.breaker.state == "open"
            own_redis.restart()
            await asyncio.sleep(0.15)  # past the cooldown: the next call is the probe, and closes it
            for i, lim in enumerate(replicas):
                assert not (await lim.reserve(reservation(f"probe-{rnd}-{i}", 1, tight))).degraded
                assert lim.breaker.state == "closed"
        assert [lim.breaker.opened for lim in replicas] == [3] * n
        share = -(-limit // n)
        assert degraded == [share] * n  # the first opening used the share, the later ones got nothing
        assert sum(degraded) == limit
    finally:
        for lim in replicas:
            await lim.aclose()
