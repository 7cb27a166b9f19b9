"""OpenAI-style x-ratelimit-* response headers, the billing-period quota headers, and Retry-After."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from extproc.limiter.types import Decision, WindowStatus

# The period quota with the least room: its limit, what remains after this request's reservation,
# and when the period ends (RFC 3339, UTC): a month is not a duration a client should count down.
QUOTA_HEADERS = ("x-tokenmeter-quota-limit", "x-tokenmeter-quota-remaining", "x-tokenmeter-quota-reset")
RATELIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")
)


def metadata_key(header: str) -> str:
    """The dynamic metadata key from which Envoy's route adds `header` to the response."""
    return "rl_" + header.removeprefix("x-ratelimit-").removeprefix("x-tokenmeter-").replace("-", "_")


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


def period_end(reset_seconds: float, now: float) -> str:
    """When a billing period ends, `reset_seconds` after `now`: RFC 3339 in UTC, whole seconds."""
    ends = datetime.fromtimestamp(now + reset_seconds, UTC).replace(microsecond=0)
    return ends.isoformat().replace("+00:00", "Z")


def _quota(status: WindowStatus | None, now: float) -> list[tuple[str, str]]:
    if status is None:
        return []
    return list(zip(QUOTA_HEADERS, (str(status.limit), str(max(0, status.remaining)),
                                    period_end(status.reset_seconds, now)), strict=True))


def ratelimit_headers(decision: Decision, now: float | None = None) -> list[tuple[str, str]]:
    return (_trio("requests", decision.requests) + _trio("tokens", decision.tokens)
            + _quota(decision.quota, time.time() if now is None else now))


def retry_after(decision: Decision) -> str:
    """Whole seconds, at least 1: a client that waits this long will not be refused for the same reason."""
    return str(max(1, math.ceil(decision.retry_after_seconds)))


def ratelimit_metadata(decision: Decision) -> dict[str, str]:
    """The same headers as dynamic metadata (`metadata_key`), for Envoy's route to add to the response."""
    return {metadata_key(name): value for name, value in ratelimit_headers(decision)}
