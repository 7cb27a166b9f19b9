"""The hierarchy arithmetic of the limiter against a small pure reference model written here.

Random sequences of reserve / settle / cancel / time steps over tenant -> project -> team -> key paths,
with random rules on every scope (total, input, output tokens and requests over sliding windows, calendar
quotas with thresholds, concurrency slots; some rules and scopes not enforced). After every step the
limiter's decision and every counter (``used``) equal the model's, and:

* no enforced sliding window or calendar period ever holds more than its limit in reserved costs (a
  settled request counts for no more than it reserved: debts may exceed a limit, admissions never do);
  no enforced concurrency rule holds more slots than its limit;
* what a team counts is counted in its project and its tenant (and a key's in its team).

On ``InMemoryLimiter`` with a fake clock (every window boundary exact), then, with fewer examples and
without the passage of time (Redis windows follow Redis TIME), on a real redis-server (``RedisLimiter``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from extproc.devstack.redis_proc import RedisProcess
from extproc.limiter import Decision, InMemoryLimiter, RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.calendar import Calendar
from extproc.limiter.redis_backend import counter_key
from extproc.limiter.types import Measure, Rule, Threshold
from tests.integration.limiter_harness import FakeClock

T, IN, OUT, REQ, CONC = (Measure.TOKENS, Measure.INPUT_TOKENS, Measure.OUTPUT_TOKENS, Measure.REQUESTS,
                         Measure.CONCURRENT)
TENANT_SCOPE = "tenant:acme"
PROJECTS = {"project:acme/p1": TENANT_SCOPE, "project:acme/p2": TENANT_SCOPE}
TEAMS = {"team:acme/p1/a": "project:acme/p1", "team:acme/p1/b": "project:acme/p1", "team:acme/p2/c": "project:acme/p2"}
KEYS = {"key:k1": "team:acme/p1/a", "key:k2": "team:acme/p1/b", "key:k3": "team:acme/p2/c", "key:k4": "team:acme/p1/a"}
LEVELS = [[TENANT_SCOPE], list(PROJECTS), list(TEAMS), list(KEYS)]
PATHS = [(TENANT_SCOPE, TEAMS[KEYS[k]], KEYS[k], k) for k in KEYS]
SCOPES = [s for level in LEVELS for s in level]

CALENDARS = [Calendar("day"), Calendar("day", "America/New_York"), Calendar("month", "UTC", 15),
             Calendar("week", "Asia/Tokyo", 3)]
DAY_UTC = Calendar("day")
# Every scope also meters tokens and requests over a minute and a UTC day (limits that never bind), so
# the hierarchy can be compared level by level; these read them, for each measure.
METERS = [Rule(T, 10**9, window_s=60.0), Rule(REQ, 10**9, calendar=DAY_UTC)]
PROBES = [Rule(m, 0, window_s=60.0) for m in (T, IN, OUT, REQ)] + [
    Rule(m, 0, calendar=DAY_UTC) for m in (T, IN, OUT, REQ)]
MONO_START = 1000.0
WALL_START = datetime(2025, 3, 8, 23, 59, tzinfo=UTC).timestamp()  # a minute before a UTC day ends
LEASE_S = 30.0


# -- the reference model ------------------------------------------------------------------------------


def cost(m: Measure, inp: int, out: int) -> int:
    return {T: inp + out, IN: inp, OUT: out}.get(m, 1)


def counter(rule: Rule) -> tuple[Any, ...]:
    """Rules of a scope with the same window, the same calendar, or both concurrency, share a counter."""
    if rule.measure is CONC:
        return ("c",)
    if rule.window_s is not None:
        return ("w", rule.window_s)
    return ("q", rule.calendar)


@dataclass
class Entry:
    """One admitted request in one sliding window: its current (in, out) and what it reserved."""

    t: float
    seq: int
    inp: int
    out: int
    res_in: int
    res_out: int


@dataclass
class Period:
    start: float
    end: float
    members: dict[str, Entry] = field(default_factory=dict)  # request id -> its counts here
    marks: set[tuple[Measure, int, int]] = field(default_factory=set)

    def used(self, m: Measure) -> int:
        return sum(cost(m, e.inp, e.out) for e in self.members.values())


@dataclass
class Record:
    inp: int
    out: int
    expires: float
    entries: list[tuple[tuple[Any, ...], Entry]]  # (window key, its entry)
    periods: list[tuple[tuple[Any, ...], float]]  # (period key, the period's start)
    slots: list[tuple[Any, ...]]


@dataclass
class Verdict:
    """What the model decides: the decision's fields the test compares, and the enforced violations
    (scope, rule, wait) a binding denial could be chosen from."""

    allowed: bool
    denied: tuple[str, str, int, float] | None  # scope, kind, rule, wait
    over: list[tuple[str, int, int]]
    alerts: list[str]
    thresholds: list[Threshold]
    waits: list[tuple[str, int, float]]


class Model:
    """The limiter's semantics as a spec: plain lists, everything recomputed, no running totals."""

    def __init__(self, lease: float) -> None:
        self.now = MONO_START
        self.wall = WALL_START
        self.lease = lease
        self.windows: dict[tuple[Any, ...], list[Entry]] = {}
        self.periods: dict[tuple[Any, ...], Period] = {}
        self.slots: dict[tuple[Any, ...], dict[str, float]] = {}
        self.records: dict[str, Record] = {}
        self._seq = itertools.count()

    def in_window(self, key: tuple[Any, ...], width: float) -> list[Entry]:
        """The entries admitted less than ``width`` ago, oldest first (lists are kept in admission order)."""
        return [e for e in self.windows.get(key, []) if e.t > self.now - width]

    def period(self, key: tuple[Any, ...], cal: Calendar) -> Period:
        """The period a request now falls in: the stored one if it is this one or a later one (a clock
        behind never resets it), else a new, empty one (not stored until a request is admitted)."""
        start, end = cal.bounds(self.wall)
        p = self.periods.get(key)
        return p if p is not None and p.start >= start else Period(start, end)

    def live_slots(self, key: tuple[Any, ...]) -> int:
        return sum(1 for until in self.slots.get(key, {}).values() if until > self.now)

    def used(self, scope: str, rule: Rule) -> int:
        key = (scope, *counter(rule))
        if rule.measure is CONC:
            return self.live_slots(key)
        if rule.window_s is not None:
            return sum(cost(rule.measure, e.inp, e.out) for e in self.in_window(key, rule.window_s))
        assert rule.calendar is not None
        p = self.periods.get(key)
        return p.used(rule.measure) if p is not None and p.start >= rule.calendar.bounds(self.wall)[0] else 0

    def wait(self, entries: list[Entry], rule: Rule, c: int, used: int) -> float:
        """Until enough of the oldest entries leave for this request to fit."""
        assert rule.window_s is not None
        if rule.measure is REQ:
            return entries[len(entries) - rule.limit].t + rule.window_s - self.now
        freed = 0
        for e in entries:
            freed += cost(rule.measure, e.inp, e.out)
            if freed >= used + c - rule.limit:
                return e.t + rule.window_s - self.now
        return rule.window_s

    def reserve(self, rid: str, scopes: list[ScopeLimit], tokens: int, output: int,
                pick: Callable[[list[tuple[str, int, float]]], tuple[str, int] | None]) -> Verdict:
        out = min(output, tokens)
        inp = tokens - out
        over: list[tuple[str, int, int]] = []
        alerts: list[str] = []
        too_large: tuple[str, int] | None = None
        violations: list[tuple[str, int, str, float, Period | None, Rule]] = []
        views: dict[tuple[Any, ...], Period] = {}
        watch: list[tuple[str, int, Rule, tuple[Any, ...]]] = []
        for s in scopes:
            first: dict[tuple[Any, ...], int] = {}
            for i, rule in enumerate(s.rules):
                first.setdefault(counter(rule), i)
            ordered = sorted(enumerate(s.rules), key=lambda ir: (first[counter(ir[1])], ir[0]))
            scope_over = False
            for idx, rule in ordered:
                key = (s.scope, *counter(rule))
                c = cost(rule.measure, inp, out)
                wait: float | None = None
                view: Period | None = None
                if rule.measure is CONC:
                    used = self.live_slots(key)
                    large = rule.limit < 1
                    if not large and used + 1 > rule.limit:
                        wait = 1.0
                elif rule.window_s is not None:
                    entries = self.in_window(key, rule.window_s)
                    used = sum(cost(rule.measure, e.inp, e.out) for e in entries)
                    large = c > rule.limit or rule.limit < 1
                    if not large and used + c > rule.limit:
                        wait = self.wait(entries, rule, c, used)
                else:
                    assert rule.calendar is not None
                    view = views.setdefault(key, self.period(key, rule.calendar))
                    used = view.used(rule.measure)
                    large = c > rule.limit or rule.limit < 1
                    if not large and used + c > rule.limit:
                        wait = max(0.0, view.end - self.wall)
                    if rule.alert_at:
                        watch.append((s.scope, idx, rule, key))
                if not large and wait is None:
                    continue
                if not (s.enforce and rule.enforce):
                    scope_over = True
                    over.append((s.scope, idx, used + c))
                elif large:
                    too_large = too_large or (s.scope, idx)
                else:
                    assert wait is not None
                    violations.append((s.scope, idx, rule.kind, wait, view, rule))
            if scope_over:
                alerts.append(s.scope)
        waits = [(v[0], v[1], v[3]) for v in violations]
        if too_large is not None:
            return Verdict(False, (too_large[0], "too_large", too_large[1], 0.0), over, alerts, [], waits)
        if violations:
            binding = violations[0]
            for v in violations[1:]:
                if v[3] > binding[3]:
                    binding = v
            chosen = pick(waits)
            if chosen is not None:  # (Redis: equal waits are only nearly equal; see the Redis test)
                binding = next(v for v in violations if (v[0], v[1]) == chosen)
            scope, idx, kind, wait, view, rule = binding
            crossed: list[Threshold] = []
            mark = (rule.measure, rule.limit, 100)
            if view is not None and 100 in rule.alert_at and mark not in view.marks:
                view.marks.add(mark)
                crossed.append(Threshold(scope, idx, 100, view.used(rule.measure), rule.limit, view.end))
            return Verdict(False, (scope, kind, idx, wait), over, alerts, crossed, waits)

        # admitted: one entry per window counter, the request in each period, a slot per concurrency counter
        rec = Record(inp, out, self.now + max(600.0, self.lease), [], [], [])
        seq = next(self._seq)
        for s in scopes:
            for rule in s.rules:
                key = (s.scope, *counter(rule))
                if rule.measure is CONC:
                    if key not in rec.slots:
                        self.slots.setdefault(key, {})[rid] = self.now + self.lease
                        rec.slots.append(key)
                elif rule.window_s is not None:
                    if all(k != key for k, _ in rec.entries):
                        e = Entry(self.now, seq, inp, out, inp, out)
                        self.windows.setdefault(key, []).append(e)
                        rec.entries.append((key, e))
                        rec.expires = max(rec.expires, self.now + 2 * rule.window_s)
                elif all(k != key for k, _ in rec.periods):
                    p = self.periods[key] = views[key]
                    p.members[rid] = Entry(self.now, seq, inp, out, inp, out)
                    rec.periods.append((key, p.start))
        self.records[rid] = rec
        thresholds: list[Threshold] = []
        for scope, idx, rule, key in watch:
            p = self.periods[key]
            used = p.used(rule.measure)
            for pct in rule.alert_at:
                if used * 100 >= pct * rule.limit and (rule.measure, rule.limit, pct) not in p.marks:
                    p.marks.add((rule.measure, rule.limit, pct))
                    thresholds.append(Threshold(scope, idx, pct, used, rule.limit, p.end))
        return Verdict(True, None, over, alerts, thresholds, [])

    def settle(self, rid: str, actual: int, output: int | None) -> bool:
        rec = self.records.pop(rid, None)
        if rec is None or rec.expires <= self.now:
            return False
        total = max(0, actual)
        if output is None:
            ain = min(total, rec.inp)
            aout = total - ain
        else:
            aout = min(total, max(0, output))
            ain = total - aout
        for _, e in rec.entries:
            e.inp, e.out = ain, aout
        for key, start in rec.periods:
            p = self.periods.get(key)
            if p is not None and p.start == start:
                p.members[rid].inp, p.members[rid].out = ain, aout
        for key in rec.slots:
            self.slots[key].pop(rid, None)
        return True

    def cancel(self, rid: str) -> bool:
        rec = self.records.pop(rid, None)
        if rec is None or rec.expires <= self.now:
            return False
        for key, e in rec.entries:
            self.windows[key].remove(e)
        for key, start in rec.periods:
            p = self.periods.get(key)
            if p is not None and p.start == start:
                del p.members[rid]
        for key in rec.slots:
            self.slots[key].pop(rid, None)
        return True

    def check_invariants(self, world: dict[str, ScopeLimit]) -> None:
        for s in world.values():
            for rule in s.rules:
                if not (s.enforce and rule.enforce):
                    continue
                key = (s.scope, *counter(rule))
                if rule.measure is CONC:
                    assert self.live_slots(key) <= rule.limit
                    continue
                if rule.window_s is not None:
                    held = self.in_window(key, rule.window_s)
                else:
                    assert rule.calendar is not None
                    p = self.periods.get(key)
                    if p is None or p.start < rule.calendar.bounds(self.wall)[0]:
                        continue
                    held = list(p.members.values())
                reserved = sum(min(cost(rule.measure, e.inp, e.out), cost(rule.measure, e.res_in, e.res_out))
                               for e in held)
                assert reserved <= rule.limit, (s.scope, rule, reserved)


# -- random worlds and steps --------------------------------------------------------------------------


def rules(windows: list[float]) -> st.SearchStrategy[Rule]:
    measures = st.sampled_from([T, IN, OUT, REQ])
    enforce = st.sampled_from([True, True, True, False])

    def limit_for(m: Measure) -> st.SearchStrategy[int]:
        # mostly room for a few requests; now and then none at all
        if m is REQ:
            return st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2))
        return st.one_of(st.integers(1000, 6000), st.integers(1000, 6000), st.integers(0, 1500))

    window = measures.flatmap(lambda m: st.builds(
        Rule, st.just(m), limit_for(m), window_s=st.sampled_from(windows), enforce=enforce))
    quota = measures.flatmap(lambda m: st.builds(
        Rule, st.just(m), limit_for(m), calendar=st.sampled_from(CALENDARS), enforce=enforce,
        alert_at=st.sampled_from([(), (80,), (100,), (50, 100), (80, 100)])))
    slots = st.builds(Rule, st.just(CONC), st.one_of(st.integers(1, 6), st.integers(0, 2)), enforce=enforce)
    return st.one_of(window, window, quota, slots)


def worlds(windows: list[float]) -> st.SearchStrategy[dict[str, ScopeLimit]]:
    def scope(name: str) -> st.SearchStrategy[ScopeLimit]:
        # the meters first: a later rule on a meter's counter is checked before the rules between them
        return st.builds(lambda rs, enforce: ScopeLimit(name, (*METERS, *rs), enforce),
                         st.lists(rules(windows), max_size=2), st.sampled_from([True, True, True, True, False]))

    return st.fixed_dictionaries({name: scope(name) for name in SCOPES})


reserve_op = st.tuples(st.just("reserve"), st.integers(0, len(PATHS) - 1), st.integers(0, 1200),
                       st.integers(0, 1200))
settle_op = st.tuples(st.just("settle"), st.integers(0, 63), st.integers(0, 2000),
                      st.one_of(st.none(), st.integers(0, 2000)))
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 63))
advance_op = st.tuples(st.just("advance"), st.sampled_from([0.25, 0.5, 1.0, 5.0, 9.5, 10.0, 30.0, 59.75, 60.0, 61.0,
                                                            600.0, 3600.0, 7300.0]))
wall_op = st.tuples(st.just("wall"), st.sampled_from([-3600, -60, -1, 1, 3600, 6 * 3600, 86400, 3 * 86400,
                                                      31 * 86400]))


def steps(timed: bool) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    table = {"reserve": reserve_op, "settle": settle_op, "cancel": cancel_op, "wall": wall_op, "advance": advance_op}
    kinds = ["reserve"] * 5 + ["settle", "settle", "cancel", "wall", "wall"] + (["advance"] * 2 if timed else [])
    return st.lists(st.sampled_from(kinds).flatmap(table.__getitem__), min_size=15, max_size=40)


# -- running a sequence against a limiter ------------------------------------------------------------


class Run:
    """One sequence of steps against one limiter and the model."""

    def __init__(self, world: dict[str, ScopeLimit], model: Model, limiter: InMemoryLimiter | RedisLimiter,
                 tenant: str, read: Callable[[list[tuple[str, Rule]]], Awaitable[list[int]]],
                 tolerance: float) -> None:
        self.world = world
        self.model = model
        self.limiter = limiter
        self.tenant = tenant
        self.read = read  # [(scope, rule)] -> the limiter's counts
        self.tolerance = tolerance  # how far apart two waits may be and still count as equal
        self.max_wall = model.wall
        self.was_behind = False
        self.open: list[str] = []  # admitted, not settled or cancelled
        self.closed: list[str] = []

    def pick(self, decision: Decision) -> Callable[[list[tuple[str, int, float]]], tuple[str, int] | None]:
        """Exact (memory): the model's own choice. Redis (windows on Redis TIME, the model's clock
        frozen): the limiter's choice, if its wait is within the tolerance of the longest."""
        def choose(waits: list[tuple[str, int, float]]) -> tuple[str, int] | None:
            if self.tolerance == 0:
                return None
            longest = max(w for _, _, w in waits)
            near = [(s, i) for s, i, w in waits if w >= longest - self.tolerance]
            got = (decision.denied_scope, decision.denied_rule)
            assert got in near, (got, waits)
            return (str(got[0]), int(got[1] or 0))
        return choose

    async def step(self, op: tuple[Any, ...], n: int) -> None:
        m = self.model
        kind = op[0]
        if kind == "reserve":
            _, path, tokens, output = op
            rid = f"r{n}"
            scopes = [self.world[name] for name in PATHS[path]]
            d = await self.limiter.reserve(Reservation(rid, self.tenant, tuple(scopes), tokens,
                                                       output_tokens=output))
            assert not d.degraded
            v = m.reserve(rid, scopes, tokens, output, self.pick(d))
            assert d.allowed == v.allowed, (d, v)
            if v.denied is None:
                assert (d.denied_scope, d.denied_kind, d.denied_rule) == (None, None, None)
                self.open.append(rid)
            else:
                scope, dkind, idx, wait = v.denied
                assert (d.denied_scope, d.denied_kind, d.denied_rule) == (scope, dkind, idx), (d, v)
                assert d.retry_after_seconds == pytest.approx(wait, abs=max(1e-6, self.tolerance))
            assert list(d.over) == v.over and list(d.alerts) == v.alerts
            assert list(d.thresholds) == v.thresholds
        elif kind in ("settle", "cancel"):
            # mostly an open reservation; sometimes one settled already, or one never made
            if self.open and (op[1] % 4 or not self.closed):
                rid = self.open.pop(op[1] % len(self.open))
                self.closed.append(rid)
            else:
                rid = self.closed[op[1] % len(self.closed)] if self.closed else "never"
            if kind == "settle":
                got = await self.limiter.settle_now(self.tenant, rid, op[2], op[3])
                assert got == m.settle(rid, op[2], op[3])
            else:
                assert await self.limiter.cancel_now(self.tenant, rid) == m.cancel(rid)
        elif kind == "advance":
            m.now += op[1]
            m.wall += op[1]
            self.max_wall = max(self.max_wall, m.wall)
        else:  # the wall clock moves on, or a replica behind reads it (at most an hour behind the latest)
            m.wall = self.max_wall + op[1]
            self.was_behind |= m.wall < self.max_wall
            self.max_wall = max(self.max_wall, m.wall)

    async def check(self) -> None:
        m = self.model
        memo: dict[tuple[str, Rule], int] = {}

        def used(scope: str, rule: Rule) -> int:
            if (scope, rule) not in memo:
                memo[scope, rule] = m.used(scope, rule)
            return memo[scope, rule]

        pairs = [(s.scope, rule) for s in self.world.values() for rule in (*s.rules, *PROBES)]
        for (scope, rule), got in zip(pairs, await self.read(pairs), strict=True):
            assert got == used(scope, rule), (scope, rule, got, used(scope, rule))
        m.check_invariants(self.world)
        # a key's count is in its team, a team's in its project, a project's in its tenant. (Calendar
        # periods: as long as no clock was behind. A replica behind counts a request in the latest period
        # each counter has stored: the next period for a scope that had one, its own for a scope that had
        # not; the request is in both scopes, in different periods, until the clocks meet the next period.)
        for probe in PROBES if not self.was_behind else PROBES[:4]:
            for level, parents in ((LEVELS[3], KEYS), (LEVELS[2], TEAMS), (LEVELS[1], PROJECTS)):
                for parent in set(parents.values()):
                    children = [c for c in level if parents[c] == parent]
                    assert sum(used(c, probe) for c in children) == used(parent, probe)

    async def run(self, ops: list[tuple[Any, ...]]) -> None:
        for n, op in enumerate(ops):
            await self.step(op, n)
            await self.check()


# -- in memory, with a fake clock ---------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds([1.0, 10.0, 60.0, 3600.0]), ops=steps(timed=True))
def test_the_in_memory_limiter_matches_the_reference(world: dict[str, ScopeLimit], ops: list[tuple[Any, ...]]) -> None:
    model = Model(LEASE_S)
    clock, wall = FakeClock(MONO_START), FakeClock(WALL_START)

    def sync_clocks() -> None:
        clock.now, wall.now = model.now, model.wall

    limiter = InMemoryLimiter(clock=clock, wall_clock=wall, lease_s=LEASE_S)

    async def read(pairs: list[tuple[str, Rule]]) -> list[int]:
        return [limiter.used("acme", scope, rule) for scope, rule in pairs]

    run = Run(world, model, limiter, "acme", read, 0.0)

    async def main() -> None:
        for n, op in enumerate(ops):
            await run.step(op, n)
            sync_clocks()
            await run.check()

    asyncio.run(main())


# -- on a real redis-server (no passage of time: windows of a minute and more, the default lease) ------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


_tenants = itertools.count()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(world=worlds([60.0, 3600.0, 86400.0]), ops=steps(timed=False))
def test_the_redis_limiter_matches_the_reference(redis_server: RedisProcess, loop: asyncio.AbstractEventLoop,
                                                 world: dict[str, ScopeLimit], ops: list[tuple[Any, ...]]) -> None:
    tenant = f"prop{next(_tenants)}-{time.monotonic_ns()}"  # a fresh tenant: fresh keys, no FLUSHALL
    model = Model(600.0)
    wall = FakeClock(WALL_START)

    async def main() -> None:
        limiter = RedisLimiter.from_url(redis_server.url, deadline_ms=2000, wall_clock=wall)
        client = Redis.from_url(redis_server.url)

        async def read(pairs: list[tuple[str, Rule]]) -> list[int]:
            """Every count in one round trip: nothing leaves a window during the test, so a window's
            count is that of all its entries."""
            pipe = client.pipeline(transaction=False)
            for scope, rule in pairs:
                key = counter_key(tenant, scope, rule.counter)
                if rule.measure is CONC:
                    pipe.zcard(key)
                elif rule.window_s is not None:
                    pipe.zrangebyscore(key, 0, "+inf")
                else:
                    pipe.hmget(key, ["p", "i", "o", "r"])
            replies = await pipe.execute()
            counts = []
            for (_, rule), reply in zip(pairs, replies, strict=True):
                if rule.measure is CONC:
                    counts.append(int(reply))
                elif rule.window_s is not None:
                    counts.append(sum(cost(rule.measure, *map(int, m.split(b"|")[:2])) for m in reply))
                else:
                    assert rule.calendar is not None
                    p, i, o, r = (int(x or 0) for x in reply)
                    current = p >= round(rule.calendar.bounds(wall.now)[0] * 1000)
                    counts.append(cost(rule.measure, i, o) if rule.measure is not REQ and current else
                                  r if current else 0)
            return counts

        # the model's clock stands still; Redis's runs (for seconds, against windows of a minute or more):
        # equal waits there are waits within that of each other
        run = Run(world, model, limiter, tenant, read, 30.0)
        try:
            for n, op in enumerate(ops):
                await run.step(op, n)
                wall.now = model.wall
                await run.check()
        finally:
            await limiter.aclose()
            await client.aclose()

    loop.run_until_complete(main())
