"""The general rules of a scope, on every backend (in-memory, a real redis-server, a real 3-node Redis
Cluster): input, output and total token limits; windows of any length; rules that share a counter and
rules that do not; model groups; concurrency slots and their lease; calendar quotas in a time zone with
an anchor day, on the caller's (here injected) wall clock; threshold events.

Harness as in test_limiter_conformance.py: sliding windows are scaled (memory: a fake clock, exact;
Redis: real waits); calendar periods follow a fake wall clock given to both backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from extproc.limiter import ScopeLimit
from extproc.limiter.calendar import Calendar
from extproc.limiter.types import Measure, Rule, Threshold
from tests.integration.limiter_harness import BACKENDS, SCALE, WINDOW, FakeClock, Harness, harness

T, IN, OUT, REQ, CONC = (Measure.TOKENS, Measure.INPUT_TOKENS, Measure.OUTPUT_TOKENS, Measure.REQUESTS,
                         Measure.CONCURRENT)
KEY = "key:acme-web"
NY = ZoneInfo("America/New_York")
START = datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp()  # the fake wall clock's first reading
LEASE_S = 32.0  # a concurrency lease before scaling: 0.5 s


@pytest.fixture(params=BACKENDS)
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with harness(request, wall=FakeClock(START), lease_s=LEASE_S) as hh:
        yield hh


@pytest.fixture(params=BACKENDS)
async def h_half(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Windows at half their length: a 1 s window lasts 0.5 s, a day 12 h."""
    async with harness(request, wall=FakeClock(START), scale=0.5) as hh:
        yield hh


def minute(measure: Measure, limit: int, *, group: str = "", enforce: bool = True) -> Rule:
    return Rule(measure, limit, window_s=60.0, group=group, enforce=enforce)


def key(*rules: Rule, enforce: bool = True) -> ScopeLimit:
    return ScopeLimit(KEY, rules, enforce)


def at(h: Harness, when: datetime) -> None:
    """Set the fake wall clock (calendar periods) of both backends."""
    assert h.wall is not None
    h.wall.now = when.timestamp()


# -- input, output and total tokens ----------------------------------------------------------------


async def test_an_output_limit_denies_an_output_heavy_request_while_input_has_room(h: Harness) -> None:
    scope = key(minute(IN, 1000), minute(OUT, 500), minute(T, 1200))
    assert len({r.counter for r in scope.rules}) == 1  # three rules, one counter
    d = await h.reserve(600, scope, output=400)  # 200 in, 400 out
    assert d.allowed
    # the token family reports the rule with the least room: output, 100 left
    assert d.tokens is not None and (d.tokens.limit, d.tokens.remaining) == (500, 100)
    d = await h.reserve(300, scope, output=200)  # input would fit (300 of 1000), output not (600 of 500)
    assert not d.allowed
    assert (d.denied_scope, d.denied_kind, d.denied_rule) == (KEY, "output_tokens", 1)
    h.assert_wait(d.retry_after_seconds, WINDOW)  # the only entry holding output leaves then
    assert d.tokens is not None and (d.tokens.limit, d.tokens.remaining) == (500, 100)
    assert [await h.used(KEY, r) for r in scope.rules] == [200, 400, 600]
    assert (await h.reserve(300, scope, output=100)).allowed  # output exactly at its limit
    d = await h.reserve(900, scope)  # all input: 400 + 900 > 1000
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "input_tokens", 0)
    d = await h.reserve(400, scope)  # input 800 of 1000, output 500 of 500, but total 1300 > 1200
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 2)
    assert (await h.reserve(300, scope)).allowed
    assert [await h.used(KEY, r) for r in scope.rules] == [700, 500, 1200]
    d = await h.reserve(1, scope, output=1)
    assert (d.allowed, d.denied_kind) == (False, "output_tokens")  # input 701 would fit, output not
    # a request larger than one rule's limit on its own can never fit: too large, whatever the others
    d = await h.reserve(600, key(minute(IN, 10_000), minute(OUT, 500)), output=501)
    assert (d.allowed, d.denied_kind, d.denied_rule, d.retry_after_seconds) == (False, "too_large", 1, 0.0)


async def test_settlement_with_the_reported_output_moves_each_counter(h: Harness) -> None:
    day = Calendar("day")
    scope = key(minute(IN, 10_000), minute(OUT, 10_000), minute(T, 20_000),
                Rule(IN, 100_000, calendar=day), Rule(OUT, 100_000, calendar=day))
    assert (await h.reserve(1000, scope, output=800, request_id="a")).allowed
    assert (await h.reserve(300, scope, output=100, request_id="b")).allowed
    assert [await h.used(KEY, r) for r in scope.rules] == [400, 900, 1300, 400, 900]
    assert await h.limiter.settle_now("acme", "a", 500, output_tokens=450)  # refunds: 150 in, 350 out
    assert [await h.used(KEY, r) for r in scope.rules] == [250, 550, 800, 250, 550]
    h.limiter.settle("acme", "b", 900, output_tokens=850)  # queued; debt on output, refund on input
    await h.limiter.flush()
    assert [await h.used(KEY, r) for r in scope.rules] == [100, 1300, 1400, 100, 1300]
    # an output larger than the total is capped at the total
    assert (await h.reserve(100, scope, output=50, request_id="c")).allowed
    assert await h.limiter.settle_now("acme", "c", 40, output_tokens=99)
    assert [await h.used(KEY, r) for r in scope.rules] == [100, 1340, 1440, 100, 1340]


async def test_settlement_without_the_output_splits_by_the_reserved_input(h: Harness) -> None:
    day = Calendar("day")
    scope = key(minute(IN, 10_000), minute(OUT, 10_000), Rule(IN, 100_000, calendar=day),
                Rule(OUT, 100_000, calendar=day))
    assert (await h.reserve(1000, scope, output=800, request_id="a")).allowed  # 200 in, 800 out
    assert await h.limiter.settle_now("acme", "a", 500)  # input as estimated (200), the rest output
    assert [await h.used(KEY, r) for r in scope.rules] == [200, 300, 200, 300]
    assert (await h.reserve(1000, scope, output=800, request_id="b")).allowed
    h.limiter.settle("acme", "b", 150)  # less than the input estimate: all of it input
    await h.limiter.flush()
    assert [await h.used(KEY, r) for r in scope.rules] == [350, 300, 350, 300]
    assert (await h.reserve(100, scope, request_id="c")).allowed  # no output part reserved
    assert await h.limiter.settle_now("acme", "c", 1000)  # 100 in, 900 out
    assert [await h.used(KEY, r) for r in scope.rules] == [450, 1200, 450, 1200]


# -- windows of any length, counters shared or not ---------------------------------------------------


async def test_a_one_second_and_a_one_day_window_side_by_side(h_half: Harness) -> None:
    h = h_half
    second, day = Rule(T, 1000, window_s=1.0), Rule(T, 2500, window_s=86_400.0)
    scope = key(second, day)
    assert second.counter != day.counter
    assert (await h.reserve(1000, scope)).allowed
    d = await h.reserve(1, scope)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 0)
    h.assert_wait(d.retry_after_seconds, 0.5)  # a second, at half scale
    await h.advance(h.after(d.retry_after_seconds))
    assert (await h.used(KEY, second), await h.used(KEY, day)) == (0, 1000)
    assert (await h.reserve(1000, scope)).allowed
    # both windows refuse the next 1000: the day's wait binds (waiting out the second is not enough)
    d = await h.reserve(1000, scope)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 1)
    assert d.retry_after_seconds > 40_000  # the first entry leaves the day window 43,200 s after it came
    await h.advance(h.after(0.5))
    d = await h.reserve(1000, scope)  # the second has room again; the day has not
    assert (d.allowed, d.denied_rule) == (False, 1)
    assert (await h.reserve(500, scope)).allowed
    assert (await h.used(KEY, second), await h.used(KEY, day)) == (500, 2500)
    assert await h.counters(KEY) == {"w1000", "w86400000"}


async def test_two_rules_on_one_counter_and_a_rule_on_another(h: Harness) -> None:
    tpm, rpm, rph = minute(T, 1000), minute(REQ, 3), Rule(REQ, 4, window_s=3600.0)
    scope = key(tpm, rpm, rph)
    for _ in range(3):
        assert (await h.reserve(300, scope)).allowed
    assert await h.counters(KEY) == {"w60000", "w3600000"}  # tokens/min and requests/min share storage
    d = await h.reserve(300, scope)
    # both minute rules refuse, with the same wait (the first entry leaving): the first rule is reported
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 0)
    h.assert_wait(d.retry_after_seconds, WINDOW)
    d = await h.reserve(100, scope)  # the tokens fit (1000), the requests do not
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "requests", 1)
    assert d.requests is not None and (d.requests.limit, d.requests.remaining) == (3, 0)
    await h.advance(h.after(WINDOW))
    assert [await h.used(KEY, r) for r in scope.rules] == [0, 0, 3]
    assert (await h.reserve(300, scope)).allowed  # the minute drained; the hour holds 4 of 4 now
    d = await h.reserve(1, scope)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "requests", 2)
    assert d.retry_after_seconds > WINDOW  # the hour's first entry leaves 56 s after it came
    assert d.requests is not None and (d.requests.limit, d.requests.remaining) == (4, 0)  # least room
    assert [await h.used(KEY, r) for r in scope.rules] == [300, 1, 4]


async def test_rules_are_checked_counter_by_counter(h: Harness) -> None:
    """Both backends check a scope's rules counter by counter, in the order each counter first appears
    (reserve.lua reads a counter, then checks its rules): violations are listed, and ties broken, alike."""
    day = Rule(T, 100, calendar=Calendar("day"))
    d = await h.reserve(200, ScopeLimit(KEY, (minute(T, 150), day, minute(REQ, 0)), enforce=False))
    assert d.allowed and d.over == ((KEY, 0, 200), (KEY, 2, 1), (KEY, 1, 200))
    # two rules can never be met: the first checked is reported
    d = await h.reserve(200, ScopeLimit(KEY, (minute(T, 1000), day, minute(REQ, 0))))
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "too_large", 2)


async def test_model_groups_are_separate_counters(h: Harness) -> None:
    every = minute(T, 2000)
    gpt, claude = minute(T, 1000, group="gpt"), minute(T, 1500, group="claude")
    assert len({every.counter, gpt.counter, claude.counter}) == 3
    # the caller narrows a scope's rules to the request's model
    for_gpt, for_claude = key(every, gpt), key(every, claude)
    assert (await h.reserve(800, for_gpt)).allowed
    assert (await h.reserve(800, for_claude)).allowed
    d = await h.reserve(300, for_gpt)  # gpt's group is full (1100 of 1000)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 1)
    assert (await h.reserve(300, for_claude)).allowed  # another group: its own room (1100 of 1500)
    d = await h.reserve(200, for_gpt)  # the group has room (1000 of 1000), every model not (2100 of 2000)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "tokens", 0)
    assert (await h.used(KEY, every), await h.used(KEY, gpt), await h.used(KEY, claude)) == (1900, 800, 1100)
    assert await h.counters(KEY) == {"w60000", "w60000~gpt", "w60000~claude"}


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrency_slots_are_taken_and_settling_or_cancelling_frees_them(h: Harness) -> None:
    slots = Rule(CONC, 2)
    scope = key(slots, minute(T, 100_000))
    assert (await h.reserve(10, scope, request_id="a")).allowed
    assert (await h.reserve(10, scope, request_id="b")).allowed
    d = await h.reserve(10, scope)
    assert (d.allowed, d.denied_scope, d.denied_kind, d.denied_rule) == (False, KEY, "concurrent", 0)
    assert d.retry_after_seconds == 1.0
    assert await h.used(KEY, slots) == 2
    assert await h.limiter.settle_now("acme", "a", 5)  # the request ended: its slot is free
    assert await h.used(KEY, slots) == 1
    assert (await h.reserve(10, scope, request_id="c")).allowed
    assert not (await h.reserve(10, scope)).allowed
    assert await h.limiter.cancel_now("acme", "b")
    assert await h.used(KEY, slots) == 1
    assert (await h.reserve(10, scope, request_id="d")).allowed
    h.limiter.settle("acme", "c", 5)  # a queued settlement frees it too
    await h.limiter.flush()
    assert await h.used(KEY, slots) == 1
    assert (await h.reserve(10, scope, request_id="e")).allowed
    assert await h.used(KEY, slots) == 2
    # the refused requests took no slot and wrote nothing: 5 admitted, 10 tokens each, "a" and "c" settled
    assert await h.used(KEY, scope.rules[1]) == 5 + 5 + 10 + 10
    # a concurrency limit of 0 can never be met
    d = await h.reserve(1, key(Rule(CONC, 0)))
    assert (d.allowed, d.denied_kind, d.retry_after_seconds) == (False, "too_large", 0.0)


async def test_an_unsettled_slot_expires_after_the_lease(h: Harness) -> None:
    """A replica admits two requests and crashes: nobody settles them. Their slots free themselves when
    the lease ends (LEASE_S, scaled like the windows)."""
    lease = LEASE_S * SCALE
    slots = Rule(CONC, 2)
    scope = key(slots)
    assert (await h.reserve(10, scope, request_id="crashed-1")).allowed
    assert (await h.reserve(10, scope, request_id="crashed-2")).allowed
    await h.advance(h.before(lease))
    assert not (await h.reserve(10, scope)).allowed
    assert await h.used(KEY, slots) == 2
    await h.advance(h.after(lease - h.before(lease)))
    assert await h.used(KEY, slots) == 0
    assert (await h.reserve(10, scope, request_id="next")).allowed
    assert (await h.reserve(10, scope)).allowed
    # a late settlement of a lapsed reservation frees nothing it no longer holds
    assert await h.limiter.settle_now("acme", "crashed-1", 10)
    assert await h.used(KEY, slots) == 2
    assert not (await h.reserve(10, scope)).allowed


async def test_concurrency_in_a_scope_or_rule_that_does_not_enforce_is_reported_not_refused(h: Harness) -> None:
    shadow = ScopeLimit("team:acme/a/b", (Rule(CONC, 1),), enforce=False)
    alert = key(minute(T, 10_000), Rule(CONC, 1, enforce=False))
    d = await h.reserve(10, shadow, alert)
    assert d.allowed and d.over == () and d.alerts == ()
    d = await h.reserve(10, shadow, alert)
    assert d.allowed
    assert d.over == (("team:acme/a/b", 0, 2), (KEY, 1, 2))  # (scope, rule, its count with this request)
    assert d.alerts == ("team:acme/a/b", KEY)
    assert (await h.used("team:acme/a/b", shadow.rules[0]), await h.used(KEY, alert.rules[1])) == (2, 2)


# -- calendar quotas (an injected wall clock) -------------------------------------------------------


async def test_a_month_anchored_on_the_15th_in_new_york_resets_at_local_midnight(h: Harness) -> None:
    month = Rule(T, 1000, calendar=Calendar("month", "America/New_York", 15))
    scope = key(month)
    boundary = datetime(2025, 3, 15, tzinfo=NY)
    assert boundary.astimezone(UTC).hour == 4  # local midnight, daylight time (UTC-4)
    at(h, boundary - timedelta(days=20))  # 23 February: the period began on 15 February
    assert (await h.reserve(900, scope)).allowed
    at(h, boundary - timedelta(seconds=1))
    d = await h.reserve(200, scope)
    assert (d.allowed, d.denied_kind, d.denied_rule) == (False, "quota_tokens", 0)
    assert d.retry_after_seconds == pytest.approx(1.0, abs=1e-3)
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (1000, 100)
    assert d.quota.reset_seconds == pytest.approx(1.0, abs=1e-3)
    at(h, boundary - timedelta(milliseconds=1))
    assert not (await h.reserve(200, scope)).allowed
    assert await h.used(KEY, month) == 900
    at(h, boundary)
    d = await h.reserve(200, scope)
    assert d.allowed
    next_end = datetime(2025, 4, 15, tzinfo=NY).timestamp()
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (1000, 800)
    assert d.quota.reset_seconds == pytest.approx(next_end - boundary.timestamp(), abs=1e-3)
    assert await h.used(KEY, month) == 200


async def test_a_week_in_berlin_and_a_day_in_tokyo(h: Harness) -> None:
    week = Rule(REQ, 2, calendar=Calendar("week", "Europe/Berlin", 1))  # from Monday 00:00 Berlin time
    day = Rule(REQ, 3, calendar=Calendar("day", "Asia/Tokyo"))
    monday = datetime(2025, 6, 16, tzinfo=ZoneInfo("Europe/Berlin"))  # 2025-06-15 22:00 UTC
    at(h, monday - timedelta(days=3))
    assert (await h.reserve(1, key(week))).allowed
    at(h, monday - timedelta(seconds=0.5))
    assert (await h.reserve(1, key(week))).allowed
    d = await h.reserve(1, key(week))
    assert (d.allowed, d.denied_kind) == (False, "quota_requests")
    assert d.retry_after_seconds == pytest.approx(0.5, abs=1e-3)
    assert d.quota is None  # request quotas are not a token status
    at(h, monday)
    assert (await h.reserve(1, key(week))).allowed
    assert await h.used(KEY, week) == 1

    tokyo_midnight = datetime(2025, 6, 20, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert tokyo_midnight.astimezone(UTC).hour == 15
    at(h, tokyo_midnight - timedelta(hours=23))
    for _ in range(3):
        assert (await h.reserve(1, key(day))).allowed
    at(h, tokyo_midnight - timedelta(seconds=2))
    d = await h.reserve(1, key(day))
    assert (d.allowed, d.denied_kind) == (False, "quota_requests")
    assert d.retry_after_seconds == pytest.approx(2.0, abs=1e-3)
    at(h, tokyo_midnight)
    assert (await h.reserve(1, key(day))).allowed
    assert await h.used(KEY, day) == 1


async def test_the_quota_status_is_the_enforced_token_quota_with_the_least_room(h: Harness) -> None:
    tenant = ScopeLimit("tenant:acme", (Rule(T, 10_000, calendar=Calendar("month")),
                                        Rule(REQ, 5, calendar=Calendar("day"))))
    shadow = ScopeLimit("project:acme/p", (Rule(T, 100, calendar=Calendar("day")),), enforce=False)
    scope = key(Rule(IN, 2000, calendar=Calendar("day")), minute(T, 100_000))
    at(h, datetime(2025, 3, 10, 18, tzinfo=UTC))
    d = await h.reserve(1500, tenant, shadow, scope)
    assert d.allowed and d.over == (("project:acme/p", 0, 1500),)
    # the key's daily input quota has 500 left, the tenant's month 8,500; the shadow scope is not reported
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (2000, 500)
    assert d.quota.reset_seconds == pytest.approx(6 * 3600, abs=1e-3)
    d = await h.reserve(600, tenant, shadow, scope)
    assert (d.allowed, d.denied_scope, d.denied_kind) == (False, KEY, "quota_input_tokens")
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (2000, 500)  # as it is
    assert d.retry_after_seconds == pytest.approx(6 * 3600, abs=1e-3)
    d = await h.reserve(400, tenant, shadow, scope, output=300)  # 100 input
    assert d.allowed and d.quota is not None and (d.quota.limit, d.quota.remaining) == (2000, 400)
    assert d.tokens is not None and d.tokens.limit == 100_000  # the sliding windows' own status
    assert [await h.used(KEY, r) for r in scope.rules] == [1600, 1900]
    assert await h.used("tenant:acme", tenant.rules[0]) == 1900


async def test_a_clock_behind_the_stored_period_does_not_reset_it(h: Harness) -> None:
    """Replicas' clocks differ: one already in the new period stored it; one still in the old period
    counts against it (never resets it to its own, older period), and waits until it ends."""
    month = Rule(T, 1000, calendar=Calendar("month", "America/New_York", 15))
    scope = key(month)
    boundary = datetime(2025, 3, 15, tzinfo=NY)
    at(h, boundary - timedelta(days=1))
    assert (await h.reserve(900, scope, request_id="old")).allowed  # the February 15 period
    at(h, boundary + timedelta(seconds=2))
    assert (await h.reserve(300, scope, request_id="new")).allowed  # the March 15 period: a fresh count
    at(h, boundary - timedelta(seconds=3))  # a replica 5 s behind: still in the February period
    assert await h.used(KEY, month) == 300
    d = await h.reserve(800, scope)
    assert (d.allowed, d.denied_kind) == (False, "quota_tokens")
    next_end = datetime(2025, 4, 15, tzinfo=NY).timestamp()
    # it waits for the stored period's end, on its own clock
    behind = (boundary - timedelta(seconds=3)).timestamp()
    assert d.retry_after_seconds == pytest.approx(next_end - behind, abs=1e-3)
    assert (await h.reserve(700, scope, request_id="behind")).allowed  # counted in the March period
    assert await h.used(KEY, month) == 1000
    # settling the February reservation does not touch the March period
    assert await h.limiter.settle_now("acme", "old", 0)
    assert await h.limiter.settle_now("acme", "behind", 100)
    at(h, boundary + timedelta(seconds=10))
    assert await h.used(KEY, month) == 400


async def test_a_refused_request_does_not_start_a_new_period(h: Harness) -> None:
    # (the in-memory limiter stored the new, empty period while it checked a request that was then
    # refused: a clock that stepped back found it, and the old period's count was gone)
    day = Rule(T, 1000, calendar=Calendar("day"))
    tenant = ScopeLimit("tenant:acme", (day,))
    midnight = datetime(2025, 3, 11, tzinfo=UTC)
    at(h, midnight - timedelta(seconds=10))
    assert (await h.reserve(900, tenant)).allowed
    at(h, midnight + timedelta(seconds=5))
    d = await h.reserve(500, tenant, key(minute(T, 100)))  # the new day has room; the key refuses
    assert (d.allowed, d.denied_scope, d.denied_kind) == (False, KEY, "too_large")
    at(h, midnight - timedelta(seconds=5))  # the clock steps back into the old day
    assert await h.used("tenant:acme", day) == 900
    assert not (await h.reserve(200, tenant)).allowed
    assert (await h.reserve(100, tenant)).allowed


async def test_a_period_that_ended_is_kept_for_a_clock_that_steps_back(h: Harness) -> None:
    # (the in-memory limiter forgot a period as soon as it ended; Redis keeps its key a day longer)
    day = Rule(T, 1000, calendar=Calendar("day"))
    tenant = ScopeLimit("tenant:acme", (day,))
    midnight = datetime(2025, 3, 11, tzinfo=UTC)
    at(h, midnight - timedelta(seconds=10))
    assert (await h.reserve(900, tenant)).allowed
    await h.advance(h.after(WINDOW))  # past the in-memory limiter's housekeeping interval (a minute)
    at(h, midnight + timedelta(hours=1))
    assert (await h.reserve(1, ScopeLimit("key:other", ()))).allowed  # housekeeping runs now
    at(h, midnight - timedelta(seconds=5))
    assert await h.used("tenant:acme", day) == 900
    assert not (await h.reserve(200, tenant)).allowed


# -- thresholds --------------------------------------------------------------------------------------


async def test_thresholds_fire_once_per_period_and_again_in_the_next(h: Harness) -> None:
    day = Calendar("day", "UTC")
    rule = Rule(T, 1000, calendar=day, alert_at=(80, 100))
    scope = key(minute(T, 100_000), rule)
    noon = datetime(2025, 3, 10, 12, tzinfo=UTC)
    end = datetime(2025, 3, 11, tzinfo=UTC).timestamp()
    at(h, noon)
    assert (await h.reserve(500, scope)).thresholds == ()
    d = await h.reserve(300, scope)
    assert d.thresholds == (Threshold(KEY, 1, 80, 800, 1000, end),)
    assert (await h.reserve(100, scope)).thresholds == ()  # 90 %: 80 % already fired this period
    d = await h.reserve(100, scope)
    assert d.thresholds == (Threshold(KEY, 1, 100, 1000, 1000, end),)
    d = await h.reserve(1, scope)
    assert not d.allowed and d.thresholds == ()  # the 100 % one fired already
    at(h, noon + timedelta(days=1))
    d = await h.reserve(1000, scope)  # both at once, in order
    assert d.thresholds == (Threshold(KEY, 1, 80, 1000, 1000, end + 86400),
                            Threshold(KEY, 1, 100, 1000, 1000, end + 86400))


async def test_a_refusal_by_a_quota_fires_its_100_percent_threshold(h: Harness) -> None:
    rule = Rule(T, 1000, calendar=Calendar("day"), alert_at=(100,))
    scope = key(rule)
    noon = datetime(2025, 3, 10, 12, tzinfo=UTC)
    end = datetime(2025, 3, 11, tzinfo=UTC).timestamp()
    at(h, noon)
    assert (await h.reserve(900, scope, request_id="a")).thresholds == ()
    d = await h.reserve(200, scope)
    assert not d.allowed and d.thresholds == (Threshold(KEY, 0, 100, 900, 1000, end),)
    assert (await h.reserve(200, scope)).thresholds == ()  # once per period
    # once per period, even when a refund brought the count back below the line
    assert await h.limiter.settle_now("acme", "a", 100)
    assert (await h.reserve(900, scope)).thresholds == ()
    at(h, noon + timedelta(days=1))
    assert (await h.reserve(900, scope)).thresholds == ()
    d = await h.reserve(200, scope)
    assert not d.allowed and d.thresholds == (Threshold(KEY, 0, 100, 900, 1000, end + 86400),)


async def test_thresholds_on_a_rule_that_does_not_enforce(h: Harness) -> None:
    rule = Rule(OUT, 1000, calendar=Calendar("day"), enforce=False, alert_at=(50, 100))
    scope = key(rule)
    at(h, datetime(2025, 3, 10, 12, tzinfo=UTC))
    end = datetime(2025, 3, 11, tzinfo=UTC).timestamp()
    d = await h.reserve(700, scope, output=600)
    assert d.allowed and d.over == () and d.thresholds == (Threshold(KEY, 0, 50, 600, 1000, end),)
    d = await h.reserve(700, scope, output=600)  # over its limit: let through, reported
    assert d.allowed and d.over == ((KEY, 0, 1200),) and d.alerts == (KEY,)
    assert d.thresholds == (Threshold(KEY, 0, 100, 1200, 1000, end),)
    d = await h.reserve(700, scope, output=600)
    assert d.allowed and d.over == ((KEY, 0, 1800),) and d.thresholds == ()
    # a shadow scope likewise; and a changed limit is a new line: its thresholds fire again
    shadow = ScopeLimit(KEY, (Rule(OUT, 1500, calendar=Calendar("day"), alert_at=(50, 100)),), enforce=False)
    d = await h.reserve(10, shadow, output=10)
    assert d.allowed and d.over == ((KEY, 0, 1810),)
    assert d.thresholds == (Threshold(KEY, 0, 50, 1810, 1500, end), Threshold(KEY, 0, 100, 1810, 1500, end))
    assert await h.used(KEY, rule) == 1810
