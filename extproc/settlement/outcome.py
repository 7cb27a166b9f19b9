"""What was decided about a request, and how it ended: two types, never strings with suffixes.

A request's usage record carries both. They are independent: an alert-admitted request can still be
cut short, a throttled one never starts. Whether the limiter decided without Redis is the record's
`degraded` flag, not a value here: it combines with every decision.
"""

from __future__ import annotations

from enum import StrEnum


class Decision(StrEnum):
    """What admission decided (the label Envoy's access log also shows, `tokenmeter:decision`)."""

    PENDING = "pending"  # not decided yet (never on a record)
    ADMITTED = "admitted"
    ALERT = "alert"  # admitted in enforce mode although a scope with action `alert` is over its limit
    SHADOW = "shadow"  # admitted because the policy is in shadow mode; enforce would have refused
    THROTTLED = "throttled"  # 429 + Retry-After
    BLOCKED = "blocked"  # 403: a quota whose action is block is spent
    REFUSED = "refused"  # 401: no key, or an unknown one; 403: a known key disabled, not yet valid or expired
    BAD_REQUEST = "bad_request"  # 400: not a valid request of its API
    TOO_LARGE = "too_large"  # 413: over the policy's body bound
    UNSUPPORTED = "unsupported"  # 404: a POST to a path this gateway does not meter
    REFUSED_BACKEND = "refused_backend"  # 503: Redis unavailable and the policy fails closed
    REFUSED_BY_ENVOY = "refused_by_envoy"  # Envoy answered before the processor saw the request
    NOT_GOVERNED = "not_governed"  # reached a model server without the processor (must not happen)

    @property
    def admitted(self) -> bool:
        return self in _ADMITTED


_ADMITTED = frozenset({Decision.ADMITTED, Decision.ALERT, Decision.SHADOW})


class Ending(StrEnum):
    """How the request ended, known at settlement."""

    COMPLETED = "completed"  # the response ran to its end (whatever its status)
    INCOMPLETE = "incomplete"  # cut short (client gone, upstream reset, drained): charged at its estimate
    ABORTED = "aborted"  # admitted or being admitted, but no response came (client left, reply lost)
    REFUSED = "refused"  # answered by the gateway itself (processor or Envoy); Decision says why
