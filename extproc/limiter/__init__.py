"""Admission limits: exact sliding windows, calendar quotas and pool ceilings, in-process or on Redis."""

from __future__ import annotations

from typing import Any

from extproc.limiter.memory import InMemoryLimiter
from extproc.limiter.redis_backend import CircuitBreaker, RedisLimiter
from extproc.limiter.types import (
    Decision,
    DuplicateReservation,
    Limiter,
    PoolCeiling,
    Reservation,
    ScopeLimit,
    WindowStatus,
)

# Options that only the Redis backend understands; the in-memory limiter ignores them.
_REDIS_ONLY = frozenset({"deadline_ms", "on_failure", "replicas_hint", "max_wait_ms"})


def limiter_from_url(url: str | None, **kw: Any) -> Limiter:
    """``None`` (or "") -> an ``InMemoryLimiter`` for a single processor; ``redis://...`` -> ``RedisLimiter``.

    Keyword options go to the backend (``deadline_ms``, ``on_failure``, ``replicas_hint`` for Redis; the
    in-memory limiter ignores those three).
    """
    if not url:
        return InMemoryLimiter(**{k: v for k, v in kw.items() if k not in _REDIS_ONLY})
    return RedisLimiter.from_url(url, **kw)


__all__ = [
    "CircuitBreaker",
    "Decision",
    "DuplicateReservation",
    "InMemoryLimiter",
    "Limiter",
    "PoolCeiling",
    "RedisLimiter",
    "Reservation",
    "ScopeLimit",
    "WindowStatus",
    "limiter_from_url",
]
