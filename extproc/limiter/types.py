"""The limiter's contract: what a request asks for, what the limiter answers, and the backend protocol.

Semantics (both backends implement them identically; see README.md in this package):

* ``reserve`` reserves ``Reservation.tokens`` on every scope of the path, all-or-nothing: either every
  window/quota of every scope (and the chosen pool) records the request, or nothing is written.
* Token and request windows are exact sliding windows (a sliding log): no interval of the window's
  length ever admits more than the limit (measured in reserved/settled costs).
* ``settle`` replaces the reserved estimate by the real token count (refund or debt), at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Window lengths in seconds, before any test-only scaling.
TOKENS_WINDOW_S = 60.0
REQUESTS_MINUTE_WINDOW_S = 60.0
REQUESTS_HOUR_WINDOW_S = 3600.0
# A reservation record lives this long at least (a long stream may settle late), and at least twice the
# longest window the reservation touched.
RESERVATION_MIN_TTL_S = 600.0

# Decision.denied_kind values
KIND_TOKENS = "tokens"
KIND_REQUESTS = "requests"
KIND_QUOTA_TOKENS = "quota_tokens"
KIND_QUOTA_REQUESTS = "quota_requests"
KIND_TOO_LARGE = "too_large"
KIND_POOL = "pool"
KIND_BACKEND = "backend"

POOL_SCOPE = "pool"


@dataclass(frozen=True, slots=True)
class ScopeLimit:
    scope: str  # e.g. "tenant:acme", "project:acme/chatbot", "team:acme/chatbot/support", "key:acme-web"
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    quota_tokens: int | None = None
    quota_requests: int | None = None
    quota_period: str = "month"  # "day" | "month"
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class PoolCeiling:
    name: str
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    tenant: str
    scopes: tuple[ScopeLimit, ...]
    tokens: int  # the estimate to reserve
    pools: tuple[PoolCeiling, ...] = ()


@dataclass(frozen=True, slots=True)
class WindowStatus:
    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    pool: str | None = None
    retry_after_seconds: float = 0.0
    denied_scope: str | None = None  # scope name, or "pool"
    # "tokens" | "requests" | "quota_tokens" | "quota_requests" | "too_large" | "pool" | "backend"
    denied_kind: str | None = None
    tokens: WindowStatus | None = None
    requests: WindowStatus | None = None
    alerts: tuple[str, ...] = ()
    degraded: bool = False  # decided without the shared backend (Redis down/slow): fail-open or fail-closed


@runtime_checkable
class Limiter(Protocol):
    async def reserve(self, r: Reservation) -> Decision: ...

    def settle(self, tenant: str, request_id: str, actual_tokens: int) -> None:
        """NON-blocking: enqueue; applied off the request path."""
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
