"""The limiter's contract: what a request asks for, what the limiter answers, and the backend protocol.

Semantics (both backends implement them identically; see README.md in this package):

* A scope (tenant, project, team, key, or one of those narrowed to a group of models) carries a list of
  ``Rule``s. Each rule counts one ``Measure`` (total, input or output tokens, requests, or requests in
  flight) over one ``Counter``: an exact sliding window of any length (a second to days), a calendar
  period (day, week or month, in a time zone, with an anchor day), or, for concurrency, the requests
  in flight. Rules of a scope that share a counter share its storage.
* ``reserve`` reserves the request's input estimate and output reservation on every rule of every scope
  of the path (and on the chosen pool), all-or-nothing: either every counter records the request, or
  nothing is written (threshold marks aside).
* Sliding windows are exact sliding logs: no interval of the window's length ever admits more than the
  limit (measured in reserved/settled costs).
* ``settle`` replaces the reserved estimate by the real counts (refund or debt), at most once, and
  releases the request's concurrency slots; a reservation nobody settles releases them when its lease
  ends (``CONCURRENCY_LEASE_S``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from extproc.limiter.calendar import Calendar

# Window lengths in seconds, before any test-only scaling.
TOKENS_WINDOW_S = 60.0
REQUESTS_MINUTE_WINDOW_S = 60.0
REQUESTS_HOUR_WINDOW_S = 3600.0
POOL_WINDOW_S = 60.0  # a pool's ceiling is per minute
# A reservation record lives this long at least (a long stream may settle late), and at least twice the
# longest window the reservation touched.
RESERVATION_MIN_TTL_S = 600.0
# A concurrency slot nobody releases (its end was never reported) is freed after this long.
CONCURRENCY_LEASE_S = RESERVATION_MIN_TTL_S
# Windows longer than this are refused by the policy: an exact log holds one entry per request in it.
MAX_WINDOW_S = 7 * 86400.0

# Decision.denied_kind values: a rule's own kind (``Rule.kind``: "tokens", "input_tokens", "output_tokens",
# "requests", "concurrent", and "quota_<measure>" for a billing-period rule), or one of these:
KIND_TOO_LARGE = "too_large"
KIND_POOL = "pool"
KIND_BACKEND = "backend"

POOL_SCOPE = "pool"


class Measure(StrEnum):
    """What a rule counts."""

    TOKENS = "tokens"  # input + output
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    REQUESTS = "requests"
    CONCURRENT = "concurrent"  # requests admitted and not yet ended

    @property
    def code(self) -> str:
        """One letter for the scripts: t, i, o, r, c."""
        return _CODES[self]


_CODES = {
    Measure.TOKENS: "t",
    Measure.INPUT_TOKENS: "i",
    Measure.OUTPUT_TOKENS: "o",
    Measure.REQUESTS: "r",
    Measure.CONCURRENT: "c",
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit of one scope. Exactly one of ``window_s`` (a sliding window) and ``calendar`` (a calendar
    period) is set, except for ``Measure.CONCURRENT``, which has neither.

    ``group`` names the counter's model group ("" for every model): two rules of a scope with the same
    window (or calendar) and group share one counter. The caller narrows a scope's rules to the request's
    model before reserving; the limiter never sees a model name.
    """

    measure: Measure
    limit: int
    window_s: float | None = None
    calendar: Calendar | None = None
    enforce: bool = True  # False: over the limit is let through and reported (Decision.alerts)
    alert_at: tuple[int, ...] = ()  # percents of the limit that raise a threshold event once per period
    group: str = ""
    # the counter's id within its scope: "w<ms>", "q<calendar>" or "c", then "~<group>" if any (made
    # once here: the in-memory limiter keys its counters by it on every request)
    counter: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.measure is Measure.CONCURRENT:
            if self.window_s is not None or self.calendar is not None:
                raise ValueError("a concurrency rule has no window and no calendar period")
        elif (self.window_s is None) == (self.calendar is None):
            raise ValueError("a rule needs exactly one of window_s and calendar")
        if self.window_s is not None and not (0 < self.window_s <= MAX_WINDOW_S):
            raise ValueError(f"window_s must be in (0, {MAX_WINDOW_S:g}], not {self.window_s!r}")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")
        if "|" in self.group or "\n" in self.group:
            raise ValueError(f"group must not contain '|' or a newline: {self.group!r}")
        if self.window_s is not None:
            base = f"w{round(self.window_s * 1000)}"
        elif self.calendar is not None:
            base = f"q{self.calendar.key}"
        else:
            base = "c"
        object.__setattr__(self, "counter", f"{base}~{self.group}" if self.group else base)

    @property
    def kind(self) -> str:
        """Decision.denied_kind of a violation of this rule."""
        if self.calendar is not None and self.measure is not Measure.CONCURRENT:
            return f"quota_{self.measure.value}"
        return self.measure.value

    @property
    def is_tokens(self) -> bool:
        return self.measure in (Measure.TOKENS, Measure.INPUT_TOKENS, Measure.OUTPUT_TOKENS)


@dataclass(frozen=True, slots=True)
class ScopeLimit:
    scope: str  # e.g. "tenant:acme", "project:acme/chatbot", "team:acme/chatbot/support", "key:acme-web"
    rules: tuple[Rule, ...] = ()
    # False: no rule of the scope refuses (shadow mode); each rule's own `enforce` applies otherwise
    enforce: bool = True

    @classmethod
    def of(
        cls,
        scope: str,
        *,
        tokens_per_minute: int | None = None,
        requests_per_minute: int | None = None,
        requests_per_hour: int | None = None,
        quota_tokens: int | None = None,
        quota_requests: int | None = None,
        quota_period: str = "month",
        concurrent: int | None = None,
        enforce: bool = True,
    ) -> ScopeLimit:
        """The common limits by name (what most callers and tests need)."""
        rules: list[Rule] = []
        if tokens_per_minute is not None:
            rules.append(Rule(Measure.TOKENS, tokens_per_minute, window_s=TOKENS_WINDOW_S))
        if requests_per_minute is not None:
            rules.append(Rule(Measure.REQUESTS, requests_per_minute, window_s=REQUESTS_MINUTE_WINDOW_S))
        if requests_per_hour is not None:
            rules.append(Rule(Measure.REQUESTS, requests_per_hour, window_s=REQUESTS_HOUR_WINDOW_S))
        cal = Calendar(quota_period)
        if quota_tokens is not None:
            rules.append(Rule(Measure.TOKENS, quota_tokens, calendar=cal))
        if quota_requests is not None:
            rules.append(Rule(Measure.REQUESTS, quota_requests, calendar=cal))
        if concurrent is not None:
            rules.append(Rule(Measure.CONCURRENT, concurrent))
        return cls(scope, tuple(rules), enforce)

    def enforced(self, rule: Rule) -> bool:
        return self.enforce and rule.enforce


@dataclass(frozen=True, slots=True)
class PoolCeiling:
    """A pool a request may go to, as seen by that request.

    ``tokens_per_minute`` is the pool's ceiling (None: no ceiling, always room). Once a request did not
    fit under the ceiling, the pool is *spilling*: it admits again only at or below ``(1 - hysteresis)`` of
    the ceiling, so traffic does not flap between pools at the line.

    Fair share: ``owner`` names the requester's share of the pool ("" none), with its ``guaranteed``
    tokens per minute and its ``maximum``; ``others`` are the other owners' guarantees. An owner's
    unused guarantee is lent while it is idle; once it uses the pool (or was refused by it) within the
    window, a request beyond its own guarantee fits only if the active owners' unused guarantees still
    fit too: borrowers are refused first, and the owner wins its guarantee back as borrowed tokens leave
    the window. A request within its owner's guarantee is held to the ceiling, not to the hysteresis
    line. The ceiling itself is never exceeded.
    """

    name: str
    tokens_per_minute: int | None = None
    hysteresis: float = 0.0
    owner: str = ""
    guaranteed: int = 0
    maximum: int | None = None  # None: the ceiling
    others: tuple[tuple[str, int], ...] = ()

    @property
    def low(self) -> int | None:
        """The line a spilling pool must be under to admit again."""
        if self.tokens_per_minute is None:
            return None
        return math.floor(self.tokens_per_minute * (1.0 - self.hysteresis))


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    tenant: str
    scopes: tuple[ScopeLimit, ...]
    tokens: int  # the estimate to reserve: input estimate + output reservation
    pools: tuple[PoolCeiling, ...] = ()
    output_tokens: int = 0  # the part of `tokens` reserved for output (the rest is input)

    @property
    def input_tokens(self) -> int:
        return max(0, int(self.tokens)) - self.output_part

    @property
    def output_part(self) -> int:
        return min(max(0, int(self.output_tokens)), max(0, int(self.tokens)))


def split_actual(actual_tokens: int, actual_output: int | None, reserved_input: int) -> tuple[int, int]:
    """(input, output) of a settlement. Without a reported output count, the input is taken to be what was
    estimated for it (at most the total) and the rest output."""
    total = max(0, int(actual_tokens))
    if actual_output is None:
        inp = min(total, max(0, reserved_input))
        return inp, total - inp
    out = min(total, max(0, int(actual_output)))
    return total - out, out


@dataclass(frozen=True, slots=True)
class WindowStatus:
    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class Threshold:
    """A calendar rule's usage reached ``percent`` of its limit for the first time this period."""

    scope: str
    rule: int  # index into the scope's rules
    percent: int
    used: int  # the count, this request included
    limit: int
    period_end: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    pool: str | None = None
    retry_after_seconds: float = 0.0
    denied_scope: str | None = None  # scope name, or "pool"
    # "tokens" | "input_tokens" | ... | "quota_tokens" | ... | "concurrent" | "too_large" | "pool" | "backend"
    denied_kind: str | None = None
    denied_rule: int | None = None  # index into the denied scope's rules
    tokens: WindowStatus | None = None  # the enforced sliding token window with the least room
    requests: WindowStatus | None = None  # the enforced sliding request window with the least room
    quota: WindowStatus | None = None  # the enforced calendar token quota with the least room
    alerts: tuple[str, ...] = ()  # scopes over a rule that does not refuse (alert action, shadow mode)
    over: tuple[tuple[str, int, int], ...] = ()  # (scope, rule index, its count with this request) of each
    thresholds: tuple[Threshold, ...] = ()
    degraded: bool = False  # decided without the shared backend (Redis down/slow): fail-open or fail-closed



@runtime_checkable
class Limiter(Protocol):
    async def reserve(self, r: Reservation) -> Decision: ...

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        """NON-blocking: enqueue; applied off the request path. ``output_tokens``: the part of
        ``actual_tokens`` that is output, when known."""
        ...

    async def flush(self) -> None:
        """Wait until queued settlements are applied (tests, shutdown)."""
        ...

    async def aclose(self) -> None: ...


class DuplicateReservation(ValueError):
    """``reserve`` was called with a request id that already holds a live reservation for the tenant.

    Request ids must be unique per request: a second reservation under the same id would make settlement
    ambiguous, so neither backend writes anything and both raise this.
    """


