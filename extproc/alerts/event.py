"""The alert event: a quota crossed a soft threshold, or a request went over an alert-only limit.

One event is both the log line (logger ``tokenmeter.alerts``) and the webhook payload: `to_json`
writes it, with stable field names and times in ISO 8601 UTC. Strings that come from a request or a
policy are bounded (extproc.records.record.bounded) when the event is made, so neither a log line
nor a payload nor a metric label can be grown by a client. An event carries no key and no prompt.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from extproc.records.record import bounded

__all__ = ["SCHEMA", "AlertEvent", "AlertKind", "iso_utc"]

SCHEMA = "tokenmeter.alert.v1"  # the payload's `schema`: changes only when a field changes meaning


class AlertKind(StrEnum):
    THRESHOLD = "threshold"  # a quota's usage reached a percent of its limit (once per period per scope)
    OVER_LIMIT = "over_limit"  # a request over a limit whose action is `alert`, let through


def iso_utc(epoch_s: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds: 2025-07-01T00:00:00.000Z."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_BOUNDED = ("tenant", "scope", "limit", "request_id", "policy_version")


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertEvent:
    kind: AlertKind
    tenant: str
    scope: str  # "project:acme/chatbot", "key:ci-bot", ...
    limit: str  # what the limit is, for people: "tokens per month (billing period)"
    limit_value: int
    used: int  # the count the event is about, the request that raised it included
    percent: int | None = None  # threshold events: the percent of the limit reached
    period_end: float | None = None  # epoch s: when the quota's period ends (calendar limits)
    request_id: str | None = None  # the request that raised it
    policy_version: str
    at: float = field(default_factory=time.time)  # epoch s
    # Unique per event: webhook delivery is at least once (a 2xx lost on the way is retried), so a
    # receiver drops repeats by this id.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in _BOUNDED:
            value = getattr(self, name)
            if value is not None and len(value) > 256:
                object.__setattr__(self, name, bounded(value))

    def fields(self) -> dict[str, Any]:
        """The payload as a dict (the order `to_json` writes)."""
        return {
            "schema": SCHEMA,
            "id": self.id,
            "kind": str(self.kind),
            "tenant": self.tenant,
            "scope": self.scope,
            "limit": self.limit,
            "limit_value": self.limit_value,
            "used": self.used,
            "percent": self.percent,
            "period_end": None if self.period_end is None else iso_utc(self.period_end),
            "request_id": self.request_id,
            "policy_version": self.policy_version,
            "at": iso_utc(self.at),
        }

    def to_json(self) -> bytes:
        """One JSON object, no newline: the webhook body and the log line."""
        return orjson.dumps(self.fields())
