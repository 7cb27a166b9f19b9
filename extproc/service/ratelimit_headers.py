"""OpenAI-style x-ratelimit-* response headers and Retry-After."""

from __future__ import annotations

import math

from extproc.limiter.types import Decision, WindowStatus


def go_duration(seconds: float) -> str:
    """Durations the way OpenAI writes them: 250ms, 12s, 1m30s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _trio(kind: str, status: WindowStatus | None) -> list[tuple[str, str]]:
    if status is None:
        return []
    return [
        (f"x-ratelimit-limit-{kind}", str(status.limit)),
        (f"x-ratelimit-remaining-{kind}", str(max(0, status.remaining))),
        (f"x-ratelimit-reset-{kind}", go_duration(status.reset_seconds)),
    ]


def ratelimit_headers(decision: Decision) -> list[tuple[str, str]]:
    return _trio("requests", decision.requests) + _trio("tokens", decision.tokens)


def retry_after(decision: Decision) -> str:
    """Whole seconds, at least 1: a client that waits this long will not be refused for the same reason."""
    return str(max(1, math.ceil(decision.retry_after_seconds)))


def ratelimit_metadata(decision: Decision) -> dict[str, str]:
    """The same headers as dynamic metadata (`rl_<header>`), for Envoy's route to add to the response."""
    return {f"rl_{name.removeprefix('x-ratelimit-').replace('-', '_')}": value
            for name, value in ratelimit_headers(decision)}
