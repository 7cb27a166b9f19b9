"""The usage record: who, what model, which pool, tokens by kind, decision, policy version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from extproc.settlement.outcome import Decision, Ending


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    time: float  # unix seconds when the request was admitted or refused
    decision: Decision
    policy_version: str
    tenant: str | None = None
    project: str | None = None
    team: str | None = None
    key_id: str | None = None
    path: str | None = None
    model: str | None = None
    response_model: str | None = None
    pool: str | None = None
    status: int | None = None
    stream: bool = False
    reserved_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: str = "none"  # reported | estimated | none
    alerts: tuple[str, ...] = ()
    degraded: bool = False  # the limiter decided without Redis (fail-open/fail-closed)
    ending: Ending = Ending.COMPLETED
    duration_ms: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serializes dataclasses natively (no asdict copy)

    @classmethod
    def from_json(cls, line: bytes | str) -> UsageRecord:
        data: dict[str, Any] = orjson.loads(line)
        data["alerts"] = tuple(data.get("alerts", ()))
        data["decision"] = Decision(data["decision"])
        data["ending"] = Ending(data.get("ending", Ending.COMPLETED))
        return cls(**data)


class RecordSink(Protocol):
    """Where usage records go (extproc.records.sink.JsonlSink)."""

    def emit(self, record: UsageRecord) -> None: ...
