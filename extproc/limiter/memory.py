"""The limiter in-process: exact sliding logs, calendar quotas, concurrency slots and pool ceilings for
one processor.

This is the default when no Redis URL is given, and the per-replica fallback of ``RedisLimiter`` when
Redis is down (built with ``limit_divisor=replicas_hint``). Semantics match ``reserve.lua`` /
``settle.lua`` exactly; the conformance suite runs the same assertions against both.

Everything here is synchronous under the hood (no awaits between check and write), so one event loop
sees every reservation as atomic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from extproc.limiter.types import (
    CONCURRENCY_LEASE_S,
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
    split_actual,
)


def counted(measure: Measure, inp: int, out: int, requests: int) -> int:
    """What ``measure`` counts of ``inp`` input tokens, ``out`` output tokens and ``requests`` requests
    (one request's cost, a window's or a period's total). Not for ``Measure.CONCURRENT``."""
    if measure is Measure.TOKENS:
        return inp + out
    if measure is Measure.INPUT_TOKENS:
        return inp
    if measure is Measure.OUTPUT_TOKENS:
        return out
    return requests


class _Entry:
    __slots__ = ("alive", "inp", "out", "t")

    def __init__(self, t: float, inp: int, out: int) -> None:
        self.t = t
        self.inp = inp
        self.out = out
        self.alive = True


class _Log:
    """A sliding log: entries in admission order, running totals of their input and output tokens."""

    __slots__ = ("entries", "tin", "tout", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self.entries: deque[_Entry] = deque()
        self.tin = 0
        self.tout = 0

    def evict(self, now: float) -> None:
        cutoff = now - self.width
        entries = self.entries
        while entries and entries[0].t <= cutoff:
            e = entries.popleft()
            e.alive = False
            self.tin -= e.inp
            self.tout -= e.out
        if not entries:
            self.tin = self.tout = 0

    def add(self, now: float, inp: int, out: int) -> _Entry:
        e = _Entry(now, inp, out)
        self.entries.append(e)
        self.tin += inp
        self.tout += out
        return e

    def remove(self, e: _Entry) -> None:
        e.alive = False
        self.entries.remove(e)
        self.tin -= e.inp
        self.tout -= e.out

    def wait(self, now: float, measure: Measure, cost: int, limit: int) -> float:
        """Seconds until enough of the oldest entries expire for ``cost`` more to fit."""
        if measure is Measure.REQUESTS:
            return self.entries[len(self.entries) - limit].t + self.width - now
        need = counted(measure, self.tin, self.tout, len(self.entries)) + cost - limit
        freed = 0
        for e in self.entries:
            freed += counted(measure, e.inp, e.out, 1)
            if freed >= need:
                return e.t + self.width - now
        return self.width

    def drained_in(self, now: float) -> float:
        return self.entries[-1].t + self.width - now if self.entries else 0.0


@dataclass(slots=True)
class _Period:
    start: float
    end: float
    inp: int = 0
    out: int = 0
    requests: int = 0
    marks: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Res:
    inp: int
    out: int
    expires: float
    entries: list[tuple[_Log, _Entry]] = field(default_factory=list)
    periods: list[tuple[_Period, float]] = field(default_factory=list)
    slots: list[dict[str, float]] = field(default_factory=list)


# A period's counts are kept this long after it ends, as reserve.lua's keys are (a clock that steps back
# across the boundary finds them).
_PERIOD_KEPT_S = 86400.0


def _divided(limit: int | None, divisor: int) -> int | None:
    if limit is None or divisor == 1:
        return limit
    return math.ceil(limit / divisor)


def _counter_order(rules: tuple[Rule, ...]) -> list[tuple[int, Rule]]:
    """(index, rule) grouped by counter in order of first appearance: reserve.lua's order (it reads a
    counter, then checks its rules), so both backends list ``over`` and break ties between equal waits
    alike."""
    order = list(enumerate(rules))
    if len(order) > 2:
        first: dict[str, int] = {}
        for i, rule in order:
            first.setdefault(rule.counter, i)
        order.sort(key=lambda ir: first[ir[1].counter])
    return order


def mark(rule: Rule, percent: int) -> str:
    """The once-per-period mark of a threshold (the same string reserve.lua writes)."""
    return f"{rule.measure.code}{rule.limit}:{percent}"


class _Tight:
    """The enforced rule with the least room, for the response headers."""

    __slots__ = ("best",)

    def __init__(self) -> None:
        # (limit, used before this request, its cost there, reset now, reset once admitted)
        self.best: tuple[int, int, int, float, float] | None = None

    def offer(self, limit: int, used: int, cost: int, reset: float, reset_admitted: float) -> None:
        if self.best is None or limit - used < self.best[0] - self.best[1]:
            self.best = (limit, used, cost, reset, reset_admitted)

    def status(self, admitted: bool) -> WindowStatus | None:
        """Remaining after this decision; reset: until the window has fully drained (a full width after
        an admission), or until the period ends."""
        if self.best is None:
            return None
        limit, used, cost, reset, reset_admitted = self.best
        if admitted:
            used, reset = used + cost, reset_admitted
        return WindowStatus(limit=limit, remaining=max(0, limit - used), reset_seconds=reset)


class InMemoryLimiter:
    """Same semantics as ``RedisLimiter`` for a single processor.

    ``clock`` is a monotonic clock in seconds (windows, reservation TTLs, concurrency leases);
    ``wall_clock`` gives epoch seconds for the calendar periods. Both are injectable for tests.
    ``limit_divisor`` divides every limit (rounded up): the per-replica share used as Redis fallback.
    ``window_scale`` multiplies sliding window lengths and the lease; it exists for tests only.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        limit_divisor: int = 1,
        window_scale: float = 1.0,
        lease_s: float = CONCURRENCY_LEASE_S,
    ) -> None:
        if limit_divisor < 1:
            raise ValueError("limit_divisor must be >= 1")
        if window_scale <= 0:
            raise ValueError("window_scale must be > 0")
        self._clock = clock
        self._wall_clock = wall_clock
        self._divisor = limit_divisor
        self._scale = window_scale
        self._lease = lease_s * window_scale
        self._logs: dict[tuple[str, str, str], _Log] = {}
        self._periods: dict[tuple[str, str, str], _Period] = {}
        self._slots: dict[tuple[str, str, str], dict[str, float]] = {}
        self._pools: dict[str, _Log] = {}  # a pool's window, and each owner's in it
        self._spilling: dict[str, float] = {}  # pool -> until when it spills (monotonic s)
        self._demand: dict[tuple[str, str], float] = {}  # (pool, owner) -> until when the owner asked
        self._reservations: dict[tuple[str, str], _Res] = {}
        self._pool_width = POOL_WINDOW_S * window_scale
        self._sweep_every = self._pool_width
        self._next_sweep = clock() + self._sweep_every

    # -- Limiter protocol ----------------------------------------------------------------------

    async def reserve(self, r: Reservation) -> Decision:
        return self.reserve_sync(r)

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        """Applied at once: in-process it costs a dict lookup and a few additions."""
        self.settle_sync(tenant, request_id, actual_tokens, output_tokens)

    async def settle_now(
        self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None
    ) -> bool:
        return self.settle_sync(tenant, request_id, actual_tokens, output_tokens)

    async def cancel_now(self, tenant: str, request_id: str) -> bool:
        return self.cancel_sync(tenant, request_id)

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- the algorithm ---------------------------------------------------------------------------

    def _log(self, key: tuple[str, str, str], width: float) -> _Log:
        w = self._logs.get(key)
        if w is None:
            w = self._logs[key] = _Log(width)
        return w

    def _period(self, key: tuple[str, str, str], start: float, end: float) -> _Period:
        p = self._periods.get(key)
        if p is None or p.start < start:  # a new period starts empty (a later one, stored, is kept)
            return _Period(start, end)  # stored when a reservation writes it, as reserve.lua does
        return p

    def reserve_sync(self, r: Reservation) -> Decision:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        rkey = (r.tenant, r.request_id)
        live = self._reservations.get(rkey)
        if live is not None:
            if live.expires > now:
                raise DuplicateReservation(f"request id {r.request_id!r} already has a live reservation")
            del self._reservations[rkey]
        inp, out = r.input_tokens, r.output_part
        wall = self._wall_clock()
        div = self._divisor

        # Phase 1: read every counter (evicting what expired), collect violations.
        logs: dict[tuple[str, str, str], _Log] = {}
        periods: dict[tuple[str, str, str], _Period] = {}
        slot_sets: dict[tuple[str, str, str], dict[str, float]] = {}
        watch: list[tuple[ScopeLimit, int, Rule, _Period, int]] = []  # calendar rules with thresholds
        alerts: list[str] = []
        over: list[tuple[str, int, int]] = []
        too_large: tuple[str, int] | None = None
        deny: tuple[str, str, int, float] | None = None  # scope, kind, rule, wait
        deny_period: tuple[ScopeLimit, int, Rule, _Period] | None = None
        tok, req, quota = _Tight(), _Tight(), _Tight()

        for s in r.scopes:
            scope_over = False
            for idx, rule in _counter_order(s.rules):
                lim = _divided(rule.limit, div)
                assert lim is not None
                cost = counted(rule.measure, inp, out, 1)
                ckey = (r.tenant, s.scope, rule.counter)
                enforced = s.enforced(rule)
                wait: float | None = None
                large = False
                period: _Period | None = None
                if rule.measure is Measure.CONCURRENT:
                    slots = slot_sets.get(ckey)
                    if slots is None:
                        slots = slot_sets[ckey] = self._slots.setdefault(ckey, {})
                        for rid in [k for k, until in slots.items() if until <= now]:
                            del slots[rid]
                    used = len(slots)
                    if lim < 1:
                        large = True
                    elif used + 1 > lim:
                        wait = 1.0  # a slot frees when a request in flight ends: unknown, so soon
                elif rule.window_s is not None:
                    log = logs.get(ckey)
                    if log is None:
                        log = logs[ckey] = self._log(ckey, rule.window_s * self._scale)
                        log.evict(now)
                    used = counted(rule.measure, log.tin, log.tout, len(log.entries))
                    if cost > lim or lim < 1:
                        large = True
                    elif used + cost > lim:
                        wait = log.wait(now, rule.measure, cost, lim)
                    if enforced:
                        (req if rule.measure is Measure.REQUESTS else tok).offer(
                            lim, used, cost, log.drained_in(now), log.width)
                else:
                    assert rule.calendar is not None
                    start, end = rule.calendar.bounds(wall)
                    period = periods.get(ckey)
                    if period is None:
                        period = periods[ckey] = self._period(ckey, start, end)
                    used = counted(rule.measure, period.inp, period.out, period.requests)
                    if cost > lim or lim < 1:
                        large = True
                    elif used + cost > lim:
                        wait = max(0.0, period.end - wall)
                    if enforced and rule.is_tokens:
                        left = max(0.0, period.end - wall)
                        quota.offer(lim, used, cost, left, left)
                    if rule.alert_at:
                        watch.append((s, idx, rule, period, lim))
                if not large and wait is None:
                    continue
                if not enforced:
                    scope_over = True
                    over.append((s.scope, idx, used + cost))
                elif large:
                    if too_large is None:
                        too_large = (s.scope, idx)
                elif deny is None or (wait is not None and wait > deny[3]):
                    assert wait is not None
                    deny = (s.scope, rule.kind, idx, wait)
                    deny_period = (s, idx, rule, period) if period is not None else None
            if scope_over:
                alerts.append(s.scope)

        def denied(scope: str, kind: str, rule: int | None, wait: float,
                   thresholds: tuple[Threshold, ...] = ()) -> Decision:
            return Decision(allowed=False, retry_after_seconds=wait, denied_scope=scope, denied_kind=kind,
                            denied_rule=rule, tokens=tok.status(False), requests=req.status(False),
                            quota=quota.status(False),
                            alerts=tuple(alerts), over=tuple(over), thresholds=thresholds)

        if too_large is not None:
            return denied(too_large[0], KIND_TOO_LARGE, too_large[1], 0.0)
        if deny is not None:
            # a billing-period quota that refuses a request has reached its line: its 100 % threshold
            crossed: tuple[Threshold, ...] = ()
            if deny_period is not None:
                s, idx, rule, period = deny_period
                lim = _divided(rule.limit, div)
                assert lim is not None
                if 100 in rule.alert_at and mark(rule, 100) not in period.marks:
                    period.marks.add(mark(rule, 100))
                    used = counted(rule.measure, period.inp, period.out, period.requests)
                    crossed = (Threshold(s.scope, idx, 100, used, lim, period.end),)
            return denied(deny[0], deny[1], deny[2], deny[3], crossed)

        # Phase 2: the first pool in preference order with room for the request.
        chosen: str | None = None
        chosen_logs: list[_Log] = []
        total = inp + out
        if r.pools:
            pool_wait = -1.0
            for p in r.pools:
                fit = self._pool_fit(p, total, now)
                if isinstance(fit, list):
                    chosen, chosen_logs = p.name, fit
                    break
                if fit >= 0 and (pool_wait < 0 or fit < pool_wait):
                    pool_wait = fit
            if chosen is None:
                kind = KIND_POOL if pool_wait >= 0 else KIND_TOO_LARGE
                return denied(POOL_SCOPE, kind, None, max(0.0, pool_wait))

        # Phase 3: write everything.
        ttl = max(RESERVATION_MIN_TTL_S, self._lease)
        res = _Res(inp=inp, out=out, expires=0.0)
        for log in logs.values():
            res.entries.append((log, log.add(now, inp, out)))
            ttl = max(ttl, 2 * log.width)
        for log in chosen_logs:  # the pool's window and its owner's
            res.entries.append((log, log.add(now, inp, out)))
        for ckey, period in periods.items():
            self._periods[ckey] = period
            period.inp += inp
            period.out += out
            period.requests += 1
            res.periods.append((period, period.start))
        for slots in slot_sets.values():
            slots[r.request_id] = now + self._lease
            res.slots.append(slots)
        res.expires = now + ttl
        self._reservations[rkey] = res
        thresholds: list[Threshold] = []
        for s, idx, rule, period, lim in watch:
            used = counted(rule.measure, period.inp, period.out, period.requests)
            for pct in rule.alert_at:
                if used * 100 >= pct * lim and mark(rule, pct) not in period.marks:
                    period.marks.add(mark(rule, pct))
                    thresholds.append(Threshold(s.scope, idx, pct, used, lim, period.end))
        return Decision(
            allowed=True,
            pool=chosen,
            tokens=tok.status(True),
            requests=req.status(True),
            quota=quota.status(True),
            alerts=tuple(alerts),
            over=tuple(over),
            thresholds=tuple(thresholds),
        )

    def _pool_log(self, key: str) -> _Log:
        log = self._pools.get(key)
        if log is None:
            log = self._pools[key] = _Log(self._pool_width)
        return log

    def _pool_fit(self, p: PoolCeiling, total: int, now: float) -> list[_Log] | float:
        """The windows to charge (the pool's, and its owner's) if the request fits the pool; else seconds
        until it might (-1: never, it is larger than the pool lets it take). Same as reserve.lua."""
        div = self._divisor
        ceiling = _divided(p.tokens_per_minute, div)
        if ceiling is None:
            return []
        low = _divided(p.low, div)
        assert low is not None
        pool = self._pool_log(p.name)
        pool.evict(now)
        used = pool.tin + pool.tout
        mine: _Log | None = None
        maximum = ceiling
        if p.owner:
            mine = self._pool_log(_owner_log(p.name, p.owner))
            mine.evict(now)
            if p.maximum is not None:  # (0 is a cap too: the owner may take nothing)
                maximum = min(ceiling, _divided(p.maximum, div) or 0)
        if total > maximum:
            return -1.0
        if mine is not None and mine.tin + mine.tout + total > maximum:
            return mine.wait(now, Measure.TOKENS, total, maximum)  # its own cap: wait for its tokens to leave
        within = mine is not None and mine.tin + mine.tout + total <= (_divided(p.guaranteed, div) or 0)
        held = 0  # the unused guarantees of the other owners who are active: not lent to a borrower
        if not within:
            for owner, guaranteed in p.others:
                theirs = self._pool_log(_owner_log(p.name, owner))
                theirs.evict(now)
                their_used = theirs.tin + theirs.tout
                if their_used > 0 or self._demand.get((p.name, owner), -math.inf) > now:
                    held += max(0, (_divided(guaranteed, div) or 0) - their_used)
        spilling = self._spilling.get(p.name, -math.inf) > now
        # an owner within its guarantee is not held back by the hysteresis line: only the ceiling
        line = low if spilling and not within else ceiling
        if used + total + held <= line:
            if spilling and used + total <= low:
                del self._spilling[p.name]
            return [pool] if mine is None else [pool, mine]
        if used + total > ceiling:  # full: spill until it drains below the low line
            self._spilling[p.name] = now + self._pool_width
        if within:  # an owner refused within its guarantee: borrowers give way from now on
            self._demand[(p.name, p.owner)] = now + self._pool_width
        need = line - held
        if need < total:
            return self._pool_width
        return pool.wait(now, Measure.TOKENS, total, need)

    def settle_sync(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> bool:
        res = self._reservations.pop((tenant, request_id), None)
        if res is None or res.expires <= self._clock():
            return False
        ain, aout = split_actual(actual_tokens, output_tokens, res.inp)
        for log, e in res.entries:
            if e.alive:
                log.tin += ain - e.inp
                log.tout += aout - e.out
                e.inp, e.out = ain, aout
        for period, start in res.periods:
            if period.start == start:
                period.inp += ain - res.inp
                period.out += aout - res.out
        for slots in res.slots:
            slots.pop(request_id, None)
        return True

    def cancel_sync(self, tenant: str, request_id: str) -> bool:
        """Undo a reservation entirely (no charge at all). Used by tests and the cluster rollback path."""
        res = self._reservations.pop((tenant, request_id), None)
        if res is None or res.expires <= self._clock():
            return False
        for log, e in res.entries:
            if e.alive:
                log.remove(e)
        for period, start in res.periods:
            if period.start == start:
                period.inp -= res.inp
                period.out -= res.out
                period.requests -= 1
        for slots in res.slots:
            slots.pop(request_id, None)
        return True

    def _sweep(self, now: float) -> None:
        """Forget idle windows, past periods, empty slot sets and expired reservations (bounded memory)."""
        self._next_sweep = now + self._sweep_every
        for key in [k for k, w in self._logs.items() if not _live(w, now)]:
            del self._logs[key]
        for name in [k for k, w in self._pools.items() if not _live(w, now)]:
            del self._pools[name]
        for pool in [k for k, until in self._spilling.items() if until <= now]:
            del self._spilling[pool]
        for owner in [k for k, until in self._demand.items() if until <= now]:
            del self._demand[owner]
        wall = self._wall_clock()
        for key in [k for k, p in self._periods.items() if p.end + _PERIOD_KEPT_S <= wall]:
            del self._periods[key]
        for key, slots in list(self._slots.items()):
            for rid in [k for k, until in slots.items() if until <= now]:
                del slots[rid]
            if not slots:
                del self._slots[key]
        for rkey in [k for k, res in self._reservations.items() if res.expires <= now]:
            del self._reservations[rkey]

    # -- introspection (tests, debugging) --------------------------------------------------------

    def used(self, tenant: str, scope: str, rule: Rule) -> int:
        """What a rule of a scope counts now (a window's total, a period's count, the slots in use)."""
        key = (tenant, scope, rule.counter)
        if rule.measure is Measure.CONCURRENT:
            now = self._clock()
            return sum(1 for until in self._slots.get(key, {}).values() if until > now)
        if rule.window_s is not None:
            log = self._logs.get(key)
            if log is None:
                return 0
            log.evict(self._clock())
            return counted(rule.measure, log.tin, log.tout, len(log.entries))
        assert rule.calendar is not None
        p = self._periods.get(key)
        start, _ = rule.calendar.bounds(self._wall_clock())
        if p is None or p.start < start:
            return 0
        return counted(rule.measure, p.inp, p.out, p.requests)

    def pool_total(self, pool: str, owner: str = "") -> int:
        """The tokens in a pool's window now, or (``owner``) in that owner's share of it."""
        w = self._pools.get(_owner_log(pool, owner) if owner else pool)
        if w is None:
            return 0
        w.evict(self._clock())
        return w.tin + w.tout


def _owner_log(pool: str, owner: str) -> str:
    """The key in ``_pools`` of an owner's window in a pool (reserve.lua: ``pool_owner_key``)."""
    return f"{pool}\x00o\x00{owner}"


def _live(w: _Log, now: float) -> bool:
    """Evict expired entries; True while the log still holds some."""
    w.evict(now)
    return bool(w.entries)
