"""One behaviour suite for every limiter backend: in-memory, a real redis-server, a real 3-node Redis Cluster.

Windows are scaled down (``window_scale``) so that a token/minute window lasts WINDOW seconds: the memory
backend travels in time on a fake clock (exact assertions), the Redis backend really waits (assertions
allow for scheduling delays, never in the direction that would hide an over-admission).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from extproc.limiter import (
    DuplicateReservation,
    InMemoryLimiter,
    PoolCeiling,
    RedisLimiter,
    Reservation,
    ScopeLimit,
)
from extproc.limiter.calendar import Calendar
from extproc.limiter.redis_backend import counter_key, pool_key, reservation_key
from extproc.limiter.types import (
    REQUESTS_HOUR_WINDOW_S,
    REQUESTS_MINUTE_WINDOW_S,
    TOKENS_WINDOW_S,
    Measure,
    Rule,
)
from tests.integration.limiter_harness import (
    BACKENDS,
    HOUR_WINDOW,
    TENANT,
    WINDOW,
    FakeClock,
    Harness,
    harness,
)

# The counters the tests read (a rule's limit plays no part in what it counts)
TPM = Rule(Measure.TOKENS, 0, window_s=TOKENS_WINDOW_S)
RPM = Rule(Measure.REQUESTS, 0, window_s=REQUESTS_MINUTE_WINDOW_S)
RPH = Rule(Measure.REQUESTS, 0, window_s=REQUESTS_HOUR_WINDOW_S)


@pytest.fixture(params=BACKENDS)
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with harness(request) as hh:
        yield hh


def tenant_scope(**kw: Any) -> ScopeLimit:
    return ScopeLimit.of("tenant:acme", **kw)


def key_scope(**kw: Any) -> ScopeLimit:
    return ScopeLimit.of("key:acme-web", **kw)


# -- admission under and over the limit ----------------------------------------------------------


async def test_admits_under_the_limit_and_reports_the_remaining_tokens(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000, requests_per_minute=10)
    d1 = await h.reserve(300, scope)
    assert d1.allowed and d1.denied_kind is None
    assert d1.tokens is not None and (d1.tokens.limit, d1.tokens.remaining) == (1000, 700)
    assert d1.requests is not None and (d1.requests.limit, d1.requests.remaining) == (10, 9)
    assert d1.tokens.reset_seconds == pytest.approx(WINDOW, abs=0.002)
    d2 = await h.reserve(700, scope)
    assert d2.allowed and d2.tokens is not None and d2.tokens.remaining == 0
    assert await h.used("key:acme-web", TPM) == 1000


async def test_denies_over_the_token_limit_with_a_positive_retry_after(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(900, scope)).allowed
    d = await h.reserve(200, scope)
    assert not d.allowed
    assert (d.denied_scope, d.denied_kind) == ("key:acme-web", "tokens")
    assert 0 < d.retry_after_seconds <= WINDOW + 0.001  # Redis works in whole milliseconds
    h.assert_wait(d.retry_after_seconds, WINDOW)
    assert d.tokens is not None and d.tokens.remaining == 100
    assert await h.used("key:acme-web", TPM) == 900


async def test_a_denial_on_the_key_writes_nothing_on_the_tenant(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=10_000, requests_per_minute=100, quota_tokens=50_000)
    key = key_scope(tokens_per_minute=500)
    assert (await h.reserve(400, tenant, key)).allowed
    d = await h.reserve(200, tenant, key)
    assert not d.allowed and d.denied_scope == "key:acme-web"
    assert await h.used("tenant:acme", TPM) == 400
    assert await h.used("tenant:acme", RPM) == 1
    # the tenant's quota was not charged either: another key of the tenant sees all but the 400
    other = ScopeLimit.of("key:acme-batch", tokens_per_minute=100_000)
    d2 = await h.reserve(9_600, tenant, other)
    assert d2.allowed
    assert await h.used("tenant:acme", TPM) == 10_000
    assert await h.used("key:acme-web", TPM) == 400


async def test_the_tightest_enforcing_window_is_reported(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=10_000, requests_per_minute=5)
    key = key_scope(tokens_per_minute=1_000, requests_per_minute=100)
    d = await h.reserve(100, tenant, key)
    assert d.tokens is not None and (d.tokens.limit, d.tokens.remaining) == (1_000, 900)
    assert d.requests is not None and (d.requests.limit, d.requests.remaining) == (5, 4)


async def test_a_denied_decision_reports_the_window_as_it_is(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    await h.reserve(600, scope)
    await h.advance(WINDOW / 4)
    d = await h.reserve(600, scope)
    assert not d.allowed and d.tokens is not None
    assert (d.tokens.limit, d.tokens.remaining) == (1000, 400)
    # reset = until the window has fully drained: its newest entry is a quarter window old
    h.assert_wait(d.tokens.reset_seconds, WINDOW * 3 / 4)


# -- exact sliding windows -------------------------------------------------------------------------


async def test_the_sliding_window_never_admits_more_than_the_limit(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(600, scope)).allowed
    await h.advance(WINDOW / 2)
    assert (await h.reserve(400, scope)).allowed
    denied = await h.reserve(1, scope)
    assert not denied.allowed
    # the oldest entry (600) leaves the window a full window after it was admitted
    h.assert_wait(denied.retry_after_seconds, WINDOW / 2)
    await h.advance(h.before(denied.retry_after_seconds))
    assert not (await h.reserve(1, scope)).allowed  # a fixed window would have reset by now
    await h.advance(h.after(denied.retry_after_seconds - h.before(denied.retry_after_seconds)))
    assert (await h.reserve(600, scope)).allowed  # exactly the 600 that left
    assert not (await h.reserve(1, scope)).allowed
    assert await h.used("key:acme-web", TPM) == 1000


async def test_a_denial_that_evicts_entries_keeps_the_window_total_exact(h: Harness) -> None:
    # (reserve.lua kept its stored running totals when a refused request evicted entries: the window then
    # counted tokens that had left it, and refused requests that fit)
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(600, scope)).allowed
    await h.advance(WINDOW / 2)
    assert (await h.reserve(400, scope)).allowed
    await h.advance(h.after(WINDOW / 2))  # the 600 has left the window; nobody has looked yet
    d = await h.reserve(700, scope)  # evicts the 600, and is refused: 400 + 700 > 1000
    assert not d.allowed and d.tokens is not None and d.tokens.remaining == 600
    assert await h.used("key:acme-web", TPM) == 400
    assert (await h.reserve(600, scope)).allowed  # exactly what is left
    assert not (await h.reserve(1, scope)).allowed
    assert await h.used("key:acme-web", TPM) == 1000


async def test_retry_after_waits_for_enough_of_the_oldest_entries(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    step = WINDOW / 8
    for _ in range(3):
        assert (await h.reserve(300, scope)).allowed
        await h.advance(step)
    # 900 in the window, admitted at 0, step, 2*step; now = 3*step. 500 more needs 400 freed: two entries.
    d = await h.reserve(500, scope)
    assert not d.allowed and d.denied_kind == "tokens"
    h.assert_wait(d.retry_after_seconds, WINDOW - 2 * step)
    await h.advance(h.after(d.retry_after_seconds))
    assert (await h.reserve(500, scope)).allowed


async def test_a_request_larger_than_the_limit_is_too_large_and_writes_nothing(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=100_000)
    key = key_scope(tokens_per_minute=1000)
    d = await h.reserve(1001, tenant, key)
    assert not d.allowed
    assert (d.denied_scope, d.denied_kind, d.retry_after_seconds) == ("key:acme-web", "too_large", 0.0)
    assert await h.used("tenant:acme", TPM) == 0
    quota = key_scope(quota_tokens=5000)
    d2 = await h.reserve(5001, quota)
    assert (d2.allowed, d2.denied_kind, d2.retry_after_seconds) == (False, "too_large", 0.0)


async def test_a_reused_request_id_is_refused_without_writing(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(100, scope, request_id="same")).allowed
    with pytest.raises(DuplicateReservation):
        await h.reserve(100, scope, request_id="same")
    assert await h.used("key:acme-web", TPM) == 100


# -- settlement --------------------------------------------------------------------------------------


async def test_settling_below_the_estimate_refunds_the_difference(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000, quota_tokens=1500)
    assert (await h.reserve(800, scope, request_id="a")).allowed
    assert not (await h.reserve(800, scope)).allowed
    assert await h.limiter.settle_now(TENANT, "a", 100)
    assert await h.used("key:acme-web", TPM) == 100
    d = await h.reserve(800, scope)
    assert d.allowed and d.tokens is not None and d.tokens.remaining == 100
    # the quota got the refund too: 100 + 800 used of 1500
    assert not (await h.reserve(601, key_scope(quota_tokens=1500))).allowed
    assert (await h.reserve(600, key_scope(quota_tokens=1500))).allowed


async def test_settling_above_the_estimate_is_debt_that_later_requests_wait_out(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(500, scope, request_id="a")).allowed
    assert await h.limiter.settle_now(TENANT, "a", 1500)
    assert await h.used("key:acme-web", TPM) == 1500
    d = await h.reserve(1, scope)
    assert not d.allowed and d.denied_kind == "tokens"
    assert d.tokens is not None and d.tokens.remaining == 0
    h.assert_wait(d.retry_after_seconds, WINDOW)  # the debt leaves with its entry
    await h.advance(h.after(d.retry_after_seconds))
    assert (await h.reserve(1000, scope)).allowed


async def test_settling_twice_is_a_no_op(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(500, scope, request_id="a")).allowed
    assert await h.limiter.settle_now(TENANT, "a", 200) is True
    assert await h.limiter.settle_now(TENANT, "a", 900) is False
    assert await h.used("key:acme-web", TPM) == 200
    assert await h.limiter.settle_now(TENANT, "never-reserved", 10) is False


async def test_queued_settlements_are_applied_by_flush(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=10_000)
    for i in range(20):
        assert (await h.reserve(400, scope, request_id=f"q{i}")).allowed
    for i in range(20):
        h.limiter.settle(TENANT, f"q{i}", i)
    await h.limiter.flush()
    assert await h.used("key:acme-web", TPM) == sum(range(20))
    if isinstance(h.limiter, RedisLimiter):
        assert h.limiter.settle_queue_depth == 0 and h.limiter.settled == 20


async def test_settling_after_the_entry_left_the_window_changes_nothing_there(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000)
    assert (await h.reserve(800, scope, request_id="a")).allowed
    await h.advance(h.after(WINDOW))
    assert (await h.reserve(300, scope)).allowed
    assert await h.limiter.settle_now(TENANT, "a", 5000)  # found, but its window entry is gone
    assert await h.used("key:acme-web", TPM) == 300


# -- pools ------------------------------------------------------------------------------------------


async def test_the_first_pool_with_room_serves_and_overflow_goes_to_the_next(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=100_000)
    pools = (PoolCeiling("h100", 1000), PoolCeiling("a10", 1000))
    d1 = await h.reserve(800, scope, pools=pools, request_id="r1")
    d2 = await h.reserve(800, scope, pools=pools, request_id="r2")
    assert (d1.pool, d2.pool) == ("h100", "a10")
    d3 = await h.reserve(800, scope, pools=pools)
    assert not d3.allowed and (d3.denied_scope, d3.denied_kind) == ("pool", "pool")
    h.assert_wait(d3.retry_after_seconds, WINDOW)
    assert await h.used("key:acme-web", TPM) == 1600  # the pool denial wrote nothing
    assert await h.limiter.settle_now(TENANT, "r1", 100)  # settlement reaches the pool window too
    assert await h.pool_tokens("h100") == 100
    d4 = await h.reserve(800, scope, pools=pools)
    assert d4.allowed and d4.pool == "h100"
    assert (await h.pool_tokens("h100"), await h.pool_tokens("a10")) == (900, 800)


async def test_a_pool_without_a_ceiling_always_has_room(h: Harness) -> None:
    pools = (PoolCeiling("h100", 500), PoolCeiling("overflow", None))
    assert (await h.reserve(400, pools=pools)).pool == "h100"
    for _ in range(5):
        assert (await h.reserve(400, pools=pools)).pool == "overflow"
    d = await h.reserve(600, pools=(PoolCeiling("h100", 500),))
    assert not d.allowed and (d.denied_scope, d.denied_kind) == ("pool", "too_large")


async def test_pools_are_shared_by_tenants(h: Harness) -> None:
    pools = (PoolCeiling("h100", 1000), PoolCeiling("a10", 1000))
    assert (await h.reserve(700, pools=pools, tenant="acme")).pool == "h100"
    assert (await h.reserve(700, pools=pools, tenant="globex")).pool == "a10"


# -- enforcement flags -------------------------------------------------------------------------------


async def test_an_alert_scope_over_its_limit_does_not_block_but_is_reported(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=10_000)
    key = key_scope(tokens_per_minute=500, requests_per_minute=1, enforce=False)
    d1 = await h.reserve(400, tenant, key)
    assert d1.allowed and d1.alerts == ()
    d2 = await h.reserve(400, tenant, key)
    assert d2.allowed and d2.alerts == ("key:acme-web",)
    assert await h.used("key:acme-web", TPM) == 800  # admitted and written
    assert d2.tokens is not None and d2.tokens.limit == 10_000  # headers come from enforcing scopes only
    d3 = await h.reserve(5000, tenant, key)  # larger than the alert scope's limit itself
    assert d3.allowed and d3.alerts == ("key:acme-web",)


async def test_shadow_mode_admits_everything_and_lists_every_scope_over_its_limit(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=100, enforce=False)
    key = key_scope(requests_per_minute=1, enforce=False)
    assert (await h.reserve(50, tenant, key)).alerts == ()
    d = await h.reserve(200, tenant, key)
    assert d.allowed and d.alerts == ("tenant:acme", "key:acme-web")
    assert d.tokens is None and d.requests is None


async def test_an_enforcing_denial_still_lists_the_alerts(h: Harness) -> None:
    tenant = tenant_scope(tokens_per_minute=100, enforce=False)
    key = key_scope(tokens_per_minute=100)
    d = await h.reserve(150, tenant, key)
    assert not d.allowed and d.denied_kind == "too_large" and d.alerts == ("tenant:acme",)


# -- request limits and quotas --------------------------------------------------------------------


async def test_requests_per_minute_denies_the_next_request(h: Harness) -> None:
    scope = key_scope(requests_per_minute=3)
    for _ in range(3):
        assert (await h.reserve(0, scope)).allowed
    d = await h.reserve(0, scope)
    assert not d.allowed and (d.denied_scope, d.denied_kind) == ("key:acme-web", "requests")
    assert d.requests is not None and d.requests.remaining == 0
    h.assert_wait(d.retry_after_seconds, WINDOW)
    assert await h.used("key:acme-web", RPM) == 3


async def test_requests_per_hour_denies_with_the_hour_window_wait(h: Harness) -> None:
    scope = key_scope(requests_per_hour=2)
    assert (await h.reserve(10, scope)).allowed
    await h.advance(WINDOW / 2)
    assert (await h.reserve(10, scope)).allowed
    d = await h.reserve(10, scope)
    assert not d.allowed and d.denied_kind == "requests"
    h.assert_wait(d.retry_after_seconds, HOUR_WINDOW - WINDOW / 2)
    # every enforced sliding request window is reported (the one with the least room): here the hour's,
    # full until its newest entry, admitted a moment ago, leaves it
    assert d.requests is not None and (d.requests.limit, d.requests.remaining) == (2, 0)
    h.assert_wait(d.requests.reset_seconds, HOUR_WINDOW)
    assert await h.used("key:acme-web", RPH) == 2


async def test_a_zero_request_limit_is_too_large(h: Harness) -> None:
    d = await h.reserve(1, key_scope(requests_per_minute=0))
    assert (d.allowed, d.denied_kind, d.retry_after_seconds) == (False, "too_large", 0.0)


def _until_period_end(period: str) -> float:
    now = time.time()
    return Calendar(period).bounds(now)[1] - now


async def test_a_spent_monthly_token_quota_denies_until_the_month_ends(h: Harness) -> None:
    scope = key_scope(quota_tokens=1000)
    assert (await h.reserve(600, scope)).allowed
    d = await h.reserve(600, scope)
    assert not d.allowed and (d.denied_scope, d.denied_kind) == ("key:acme-web", "quota_tokens")
    assert d.retry_after_seconds == pytest.approx(_until_period_end("month"), abs=5)
    assert (await h.reserve(400, scope)).allowed


async def test_a_spent_daily_request_quota_denies_until_midnight_utc(h: Harness) -> None:
    scope = key_scope(quota_requests=2, quota_period="day")
    assert (await h.reserve(1, scope)).allowed
    assert (await h.reserve(1, scope)).allowed
    d = await h.reserve(1, scope)
    assert not d.allowed and d.denied_kind == "quota_requests"
    assert d.retry_after_seconds == pytest.approx(_until_period_end("day"), abs=5)
    assert 0 < d.retry_after_seconds <= 86400


async def test_the_binding_constraint_is_the_longest_wait(h: Harness) -> None:
    scope = key_scope(tokens_per_minute=1000, quota_tokens=1000)
    assert (await h.reserve(1000, scope)).allowed
    d = await h.reserve(10, scope)
    assert not d.allowed and d.denied_kind == "quota_tokens"  # waiting out the window is not enough
    assert d.retry_after_seconds > WINDOW


# -- calendar periods (the Lua script and memory.py compute them the same way) --------------------


@pytest.mark.parametrize(
    "moment",
    ["2024-02-29T23:59:59", "2024-12-31T12:00:00", "2025-01-01T00:00:00", "2100-03-01T00:00:00"],
)
def test_quota_periods_are_utc_days_and_months(moment: str) -> None:
    t = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    day_start, day_end = Calendar("day").bounds(t.timestamp())
    midnight = datetime(t.year, t.month, t.day, tzinfo=UTC)
    assert datetime.fromtimestamp(day_start, UTC) == midnight
    assert datetime.fromtimestamp(day_end, UTC) == midnight + timedelta(1)
    month_start, month_end = Calendar("month").bounds(t.timestamp())
    nxt = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month_start, UTC) == datetime(t.year, t.month, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month_end, UTC) == nxt


# -- backend specifics: the Redis key layout and expiry; the in-memory record expiry --------------


async def test_redis_keys_share_the_tenant_hash_tag_and_expire(redis_url: str) -> None:
    limiter = RedisLimiter.from_url(redis_url, deadline_ms=2000)
    client = Redis.from_url(redis_url)
    try:
        scope = ScopeLimit.of("key:acme-web", tokens_per_minute=1000, requests_per_minute=10,
                              requests_per_hour=100, quota_tokens=10_000, quota_period="day")
        # tokens/min and requests/min share one counter: four rules, three counters
        assert [r.counter for r in scope.rules] == ["w60000", "w60000", "w3600000", "qday"]
        d = await limiter.reserve(Reservation("r1", "acme", (scope,), 100, (PoolCeiling("h100", 5000),),
                                              output_tokens=30))
        assert d.allowed and d.pool == "h100"
        keys = sorted(k.decode() for k in cast(list[bytes], await client.keys("*")))
        assert keys == sorted([
            "tm:{t:acme}:res:r1",
            "tm:{t:acme}:key:acme-web:w60000",
            "tm:{t:acme}:key:acme-web:w3600000",
            "tm:{t:acme}:key:acme-web:qday",
            "tm:{pool:h100}:w",
        ])
        minute, hour, quota = (counter_key("acme", "key:acme-web", c) for c in ("w60000", "w3600000", "qday"))
        for key, longest in ((minute, 61_000), (pool_key("h100"), 61_000), (hour, 3_601_000)):
            assert longest - 1000 < await client.pttl(key) <= longest
        # a period's counts are kept a day past its end
        day_ms = 86_400_000
        assert day_ms < await client.pttl(quota) <= _until_period_end("day") * 1000 + day_ms + 1000
        assert 2 * 3_600_000 - 5000 < await client.pttl(reservation_key("acme", "r1")) <= 2 * 3_600_000
        # a window keeps its running input and output totals as the members "#i" and "#o", score -1 - total
        assert (await client.zscore(minute, "#i"), await client.zscore(minute, "#o")) == (-71, -31)
        assert await client.zrangebyscore(minute, 0, "+inf") == [b"70|30|r1"]
        assert await client.hmget(quota, ["i", "o", "r"]) == [b"70", b"30", b"1"]
        assert await limiter.settle_now("acme", "r1", 50)
        assert await client.exists(reservation_key("acme", "r1")) == 0
    finally:
        await limiter.aclose()
        await client.aclose()


async def test_an_unsettled_memory_reservation_expires_and_idle_windows_are_forgotten() -> None:
    clock = FakeClock()
    limiter = InMemoryLimiter(clock=clock)
    scope = ScopeLimit.of("key:k", tokens_per_minute=1000)
    assert (await limiter.reserve(Reservation("r1", "acme", (scope,), 100))).allowed
    assert ("acme", "key:k", "w60000") in limiter._logs
    clock.now += 601  # reservation records live max(2 x longest window, 600 s)
    assert await limiter.settle_now("acme", "r1", 10) is False
    assert (await limiter.reserve(Reservation("r2", "acme", (ScopeLimit("key:other"),), 1))).allowed
    assert ("acme", "key:k", "w60000") not in limiter._logs
    assert ("acme", "r1") not in limiter._reservations
