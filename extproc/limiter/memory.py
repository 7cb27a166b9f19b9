"""The limiter in-process: exact sliding logs, calendar quotas and pool ceilings for one processor.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from extproc.limiter.types import (
    KIND_POOL,
    KIND_QUOTA_REQUESTS,
    KIND_QUOTA_TOKENS,
    KIND_REQUESTS,
    KIND_TOKENS,
    KIND_TOO_LARGE,
    POOL_SCOPE,
    REQUESTS_HOUR_WINDOW_S,
    REQUESTS_MINUTE_WINDOW_S,
    RESERVATION_MIN_TTL_S,
    TOKENS_WINDOW_S,
    Decision,
    DuplicateReservation,
    Reservation,
    WindowStatus,
)

_DAY_S = 86400


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; same as reserve.lua)."""
    y -= 1 if m <= 2 else 0
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int]:
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if m <= 2 else 0), m


def quota_period(epoch_s: float, period: str) -> tuple[int, float]:
    """(period id, end of the period in epoch seconds) for a UTC "day" or "month"."""
    days = int(epoch_s // _DAY_S)
    if period == "day":
        return days, float((days + 1) * _DAY_S)
    if period != "month":
        raise ValueError(f"quota_period must be 'day' or 'month', not {period!r}")
    y, m = _civil_from_days(days)
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return y * 12 + m - 1, float(_days_from_civil(ny, nm, 1) * _DAY_S)


class _Entry:
    __slots__ = ("alive", "cost", "t")

    def __init__(self, t: float, cost: int) -> None:
        self.t = t
        self.cost = cost
        self.alive = True


class _Window:
    """A sliding log: entries in admission order, a running total of their costs."""

    __slots__ = ("entries", "total", "width")

    def __init__(self, width: float) -> None:
        self.width = width
        self.entries: deque[_Entry] = deque()
        self.total = 0

    def evict(self, now: float) -> None:
        cutoff = now - self.width
        entries = self.entries
        while entries and entries[0].t <= cutoff:
            e = entries.popleft()
            e.alive = False
            self.total -= e.cost
        if not entries:
            self.total = 0

    def add(self, now: float, cost: int) -> _Entry:
        e = _Entry(now, cost)
        self.entries.append(e)
        self.total += cost
        return e

    def wait_for_room(self, now: float, cost: int, limit: int) -> float:
        """Seconds until enough of the oldest entries expire for ``cost`` to fit (the window is full)."""
        need = self.total + cost - limit
        freed = 0
        for e in self.entries:
            freed += e.cost
            if freed >= need:
                return e.t + self.width - now
        return self.width

    def wait_for_slot(self, now: float, limit: int) -> float:
        """Request windows (cost 1): seconds until the count drops below ``limit``."""
        index = len(self.entries) - limit
        return self.entries[index].t + self.width - now

    def drained_in(self, now: float) -> float:
        return self.entries[-1].t + self.width - now if self.entries else 0.0


@dataclass(slots=True)
class _Quota:
    period: int
    end: float
    tokens: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Res:
    cost: int
    expires: float
    token_entries: list[tuple[_Window, _Entry]] = field(default_factory=list)
    request_entries: list[tuple[_Window, _Entry]] = field(default_factory=list)
    quotas: list[tuple[_Quota, int]] = field(default_factory=list)


def _live(w: _Window, now: float) -> bool:
    """Evict expired entries; True while the window still holds some."""
    w.evict(now)
    return bool(w.entries)


def _divided(limit: int | None, divisor: int) -> int | None:
    if limit is None or divisor == 1:
        return limit
    return math.ceil(limit / divisor)


class InMemoryLimiter:
    """Same semantics as ``RedisLimiter`` for a single processor.

    ``clock`` is a monotonic clock in seconds (windows, reservation TTLs); ``wall_clock`` gives epoch
    seconds for the calendar quota periods. Both are injectable for tests. ``limit_divisor`` divides every
    limit (rounded up): the per-replica share used as Redis fallback. ``window_scale`` multiplies window
    lengths; it exists for tests only (production: 1.0).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        limit_divisor: int = 1,
        window_scale: float = 1.0,
    ) -> None:
        if limit_divisor < 1:
            raise ValueError("limit_divisor must be >= 1")
        if window_scale <= 0:
            raise ValueError("window_scale must be > 0")
        self._clock = clock
        self._wall_clock = wall_clock
        self._divisor = limit_divisor
        self._w_tpm = TOKENS_WINDOW_S * window_scale
        self._w_rpm = REQUESTS_MINUTE_WINDOW_S * window_scale
        self._w_rph = REQUESTS_HOUR_WINDOW_S * window_scale
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._pools: dict[str, _Window] = {}
        self._quotas: dict[tuple[str, str], _Quota] = {}
        self._reservations: dict[tuple[str, str], _Res] = {}
        self._sweep_every = self._w_tpm
        self._next_sweep = clock() + self._sweep_every

    # -- Limiter protocol ----------------------------------------------------------------------

    async def reserve(self, r: Reservation) -> Decision:
        return self.reserve_sync(r)

    def settle(self, tenant: str, request_id: str, actual_tokens: int) -> None:
        """Applied at once: in-process it costs a dict lookup and a few additions."""
        self.settle_sync(tenant, request_id, actual_tokens)

    async def settle_now(self, tenant: str, request_id: str, actual_tokens: int) -> bool:
        return self.settle_sync(tenant, request_id, actual_tokens)

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- the algorithm ---------------------------------------------------------------------------

    def _window(self, tenant: str, scope: str, kind: str, width: float) -> _Window:
        k = (tenant, scope, kind)
        w = self._windows.get(k)
        if w is None:
            w = self._windows[k] = _Window(width)
        return w

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
        cost = max(0, int(r.tokens))
        wall = self._wall_clock()
        div = self._divisor

        # Phase 1: read every window and quota (evicting expired entries), collect violations.
        token_windows: list[_Window] = []
        request_windows: list[_Window] = []
        quotas: list[_Quota] = []
        alerts: list[str] = []
        too_large: str | None = None
        deny_scope: str | None = None
        deny_kind: str | None = None
        deny_wait = -1.0
        tight_tok: tuple[int, _Window] | None = None  # (limit, window) with least room
        tight_req: tuple[int, _Window] | None = None

        for s in r.scopes:
            violations: list[tuple[str, float]] = []
            tpm = _divided(s.tokens_per_minute, div)
            if tpm is not None:
                w = self._window(r.tenant, s.scope, "tpm", self._w_tpm)
                w.evict(now)
                token_windows.append(w)
                if cost > tpm:
                    violations.append((KIND_TOO_LARGE, 0.0))
                elif w.total + cost > tpm:
                    violations.append((KIND_TOKENS, w.wait_for_room(now, cost, tpm)))
                if s.enforce and (tight_tok is None or tpm - w.total < tight_tok[0] - tight_tok[1].total):
                    tight_tok = (tpm, w)
            for kind, lim, width in (("rpm", s.requests_per_minute, self._w_rpm),
                                     ("rph", s.requests_per_hour, self._w_rph)):
                lim = _divided(lim, div)
                if lim is None:
                    continue
                w = self._window(r.tenant, s.scope, kind, width)
                w.evict(now)
                request_windows.append(w)
                n = len(w.entries)
                if lim < 1:
                    violations.append((KIND_TOO_LARGE, 0.0))
                elif n + 1 > lim:
                    violations.append((KIND_REQUESTS, w.wait_for_slot(now, lim)))
                if kind == "rpm" and s.enforce and (
                    tight_req is None or lim - n < tight_req[0] - len(tight_req[1].entries)
                ):
                    tight_req = (lim, w)
            qt = _divided(s.quota_tokens, div)
            qr = _divided(s.quota_requests, div)
            if qt is not None or qr is not None:
                pid, end = quota_period(wall, s.quota_period)
                q = self._quotas.get((r.tenant, s.scope))
                if q is None:
                    q = self._quotas[(r.tenant, s.scope)] = _Quota(pid, end)
                elif q.period != pid:
                    q.period, q.end, q.tokens, q.requests = pid, end, 0, 0
                quotas.append(q)
                if qt is not None:
                    if cost > qt:
                        violations.append((KIND_TOO_LARGE, 0.0))
                    elif q.tokens + cost > qt:
                        violations.append((KIND_QUOTA_TOKENS, max(0.0, end - wall)))
                if qr is not None:
                    if qr < 1:
                        violations.append((KIND_TOO_LARGE, 0.0))
                    elif q.requests + 1 > qr:
                        violations.append((KIND_QUOTA_REQUESTS, max(0.0, end - wall)))
            if not violations:
                continue
            if not s.enforce:
                alerts.append(s.scope)
                continue
            for kind, wait in violations:
                if kind == KIND_TOO_LARGE:
                    if too_large is None:
                        too_large = s.scope
                elif wait > deny_wait:
                    deny_scope, deny_kind, deny_wait = s.scope, kind, wait

        if too_large is not None:
            return self._denied(too_large, KIND_TOO_LARGE, 0.0, tight_tok, tight_req, now, alerts)
        if deny_kind is not None:
            return self._denied(deny_scope, deny_kind, deny_wait, tight_tok, tight_req, now, alerts)

        # Phase 2: the first pool in preference order with room for the request.
        chosen: str | None = None
        chosen_window: _Window | None = None
        if r.pools:
            pool_wait = -1.0
            for p in r.pools:
                ceiling = _divided(p.tokens_per_minute, div)
                if ceiling is None:
                    chosen = p.name
                    break
                pw = self._pools.get(p.name)
                if pw is None:
                    pw = self._pools[p.name] = _Window(self._w_tpm)
                pw.evict(now)
                if cost > ceiling:
                    continue
                if pw.total + cost <= ceiling:
                    chosen, chosen_window = p.name, pw
                    break
                wait = pw.wait_for_room(now, cost, ceiling)
                if pool_wait < 0 or wait < pool_wait:
                    pool_wait = wait
            if chosen is None:
                kind = KIND_POOL if pool_wait >= 0 else KIND_TOO_LARGE
                return self._denied(POOL_SCOPE, kind, max(0.0, pool_wait), tight_tok, tight_req, now, alerts)

        # Phase 3: write everything.
        ttl = RESERVATION_MIN_TTL_S
        res = _Res(cost=cost, expires=0.0)
        for w in token_windows:
            res.token_entries.append((w, w.add(now, cost)))
            ttl = max(ttl, 2 * w.width)
        if chosen_window is not None:
            res.token_entries.append((chosen_window, chosen_window.add(now, cost)))
        for w in request_windows:
            res.request_entries.append((w, w.add(now, 1)))
            ttl = max(ttl, 2 * w.width)
        for q in quotas:
            q.tokens += cost
            q.requests += 1
            res.quotas.append((q, q.period))
        res.expires = now + ttl
        self._reservations[rkey] = res
        return Decision(
            allowed=True,
            pool=chosen,
            tokens=self._status(tight_tok, now),
            requests=self._status(tight_req, now),
            alerts=tuple(alerts),
        )

    @staticmethod
    def _status(tight: tuple[int, _Window] | None, now: float) -> WindowStatus | None:
        """Header numbers: remaining after this decision; reset = until the window has fully drained."""
        if tight is None:
            return None
        limit, w = tight
        # On admission the new entry (already appended) is the newest: the window drains a full width later.
        return WindowStatus(limit=limit, remaining=max(0, limit - w.total), reset_seconds=w.drained_in(now))

    def _denied(
        self,
        scope: str | None,
        kind: str,
        wait: float,
        tight_tok: tuple[int, _Window] | None,
        tight_req: tuple[int, _Window] | None,
        now: float,
        alerts: Iterable[str],
    ) -> Decision:
        return Decision(
            allowed=False,
            retry_after_seconds=wait,
            denied_scope=scope,
            denied_kind=kind,
            tokens=self._status(tight_tok, now),
            requests=self._status(tight_req, now),
            alerts=tuple(alerts),
        )

    def settle_sync(self, tenant: str, request_id: str, actual_tokens: int) -> bool:
        res = self._reservations.pop((tenant, request_id), None)
        if res is None or res.expires <= self._clock():
            return False
        actual = max(0, int(actual_tokens))
        delta = actual - res.cost
        for w, e in res.token_entries:
            if e.alive:
                e.cost = actual
                w.total += delta
        for q, period in res.quotas:
            if q.period == period:
                q.tokens += delta
        return True

    def cancel_sync(self, tenant: str, request_id: str) -> bool:
        """Undo a reservation entirely (no charge at all). Used by tests and the cluster rollback path."""
        res = self._reservations.pop((tenant, request_id), None)
        if res is None or res.expires <= self._clock():
            return False
        for w, e in (*res.token_entries, *res.request_entries):
            if e.alive:
                e.alive = False
                w.entries.remove(e)
                w.total -= e.cost
        for q, period in res.quotas:
            if q.period == period:
                q.tokens -= res.cost
                q.requests -= 1
        return True

    def _sweep(self, now: float) -> None:
        """Forget idle windows, past quota periods and expired reservations (bounded memory)."""
        self._next_sweep = now + self._sweep_every
        for wk in [k for k, w in self._windows.items() if not _live(w, now)]:
            del self._windows[wk]
        for pk in [k for k, w in self._pools.items() if not _live(w, now)]:
            del self._pools[pk]
        wall = self._wall_clock()
        for qk in [k for k, q in self._quotas.items() if q.end <= wall]:
            del self._quotas[qk]
        for rk in [k for k, res in self._reservations.items() if res.expires <= now]:
            del self._reservations[rk]

    # -- introspection (tests, debugging) --------------------------------------------------------

    def window_total(self, tenant: str, scope: str, kind: str = "tpm") -> int:
        """Current total of a scope's window ("tpm": tokens, "rpm"/"rph": requests)."""
        w = self._windows.get((tenant, scope, kind))
        if w is None:
            return 0
        w.evict(self._clock())
        return w.total

    def pool_total(self, pool: str) -> int:
        w = self._pools.get(pool)
        if w is None:
            return 0
        w.evict(self._clock())
        return w.total
