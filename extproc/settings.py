"""Process settings: read once when `tokenmeter serve` starts, never part of the reloadable policy.

Where the processor listens, which Redis it uses, how long an admission may wait for Redis and what
it decides when Redis cannot answer are properties of the deployment, like envoyproxy/ratelimit's
settings. They used to sit in the policy, where a hot-reloaded edit silently did nothing; a policy
with a `redis` section is now refused with a pointer here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

MIN_SECRET_BYTES = 16


def read_secret(path: str, what: str) -> bytes:
    """A shared secret named by a flag (`--settle-secret-file`, `--alert-webhook-secret-file`): the
    file's bytes, surrounding whitespace stripped, at least MIN_SECRET_BYTES (OSError, ValueError)."""
    return check_secret(Path(path).read_bytes().strip(), what)


def check_secret(secret: bytes, what: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the {what} must be at least {MIN_SECRET_BYTES} bytes")
    return secret


class FailureMode(StrEnum):
    """What admission decides when Redis is down or misses the deadline."""

    FAIL_OPEN = "fail_open"  # admit under a local per-replica limiter (limits / replicas), marked degraded
    FAIL_CLOSED = "fail_closed"  # refuse with 503 quota_service_unavailable + Retry-After


@dataclass(frozen=True)
class Settings:
    policy: str
    listen: str = "127.0.0.1:50051"
    redis: str | None = None  # None: the in-memory limiter (one process, tests and demos)
    redis_deadline_ms: int = 50  # Redis silent this long: unreachable or stalled (the failure mode decides)
    # Redis answering but this (busy) processor not yet through reading the reply: wait up to this
    # long, then refuse with 503 (never a local admission on top of a healthy Redis). Below Envoy's
    # 500 ms message timeout for the admission call.
    redis_max_wait_ms: int = 300
    redis_failure_mode: FailureMode = FailureMode.FAIL_OPEN
    usage_log: str = "var/usage.jsonl"
    grace_seconds: float = 10.0
    reload_interval: float = 1.0
    replicas_hint: int = 1
    metrics_port: int | None = None
    settle_secret_file: str | None = None
    audit_log: str | None = None  # the hash-chained audit trail (extproc.audit); one file per replica
    alert_webhook: str | None = None  # http(s) URL alert events are POSTed to (extproc.alerts)
    alert_webhook_secret_file: str | None = None  # HMAC-SHA256 key for x-tokenmeter-signature
    alert_queue: int = 1000  # alert events waiting for the webhook; a full queue drops new ones
    # testing and demos only: every sliding window, pool minute and concurrency lease is this fraction
    # of its length (calendar periods are not scaled). Production: 1.
    window_scale: float = 1.0
