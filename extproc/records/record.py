"""The usage record: one per request, written when it ends (extproc.settlement.settle).

Its schema is the protobuf message tokenmeter.v1.UsageRecord (protos/tokenmeter/v1/
usage_record.proto), which embeds the admission facts; extproc.records.codec converts without loss.
On disk it is one JSON object per line (JSON Lines, `to_json`), the keys being the field names
below. Readers are backwards compatible: a line written before a field existed loads with the
field's default, and keys a reader does not know (a newer writer's) are ignored.

Token counts: `prompt_tokens` is every input token (cache reads and cache writes included),
`cached_tokens` and `cache_write_tokens` are parts of it; `completion_tokens` is every output token,
`reasoning_tokens` a part of it (extproc.metering.usage.Usage). The disjoint kinds that are priced
are extproc.billing.token_kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from extproc.metering.usage import Usage
from extproc.protos.tokenmeter.v1 import admission_pb2
from extproc.settlement.outcome import Decision, Ending

__all__ = ["API_LABELS", "Limit", "RecordSink", "UsageRecord", "bounded"]


def bounded(text: str, limit: int = 256) -> str:
    """A client-chosen string (a model name, a path) bounded before it becomes a record field or
    travels in metadata."""
    return text if len(text) <= limit else text[:limit] + "..."

# The record's `api` labels ("openai_chat", "anthropic_messages", ...), by the tokenmeter.v1.Api
# value they stand for (AdmissionFacts.api, ApiSchema.api): the enum value's name, lowercased,
# without its prefix.
API_LABELS: dict[int, str] = {
    value: name.removeprefix("API_").lower() for name, value in admission_pb2.Api.items() if value
}


@dataclass(frozen=True, slots=True)
class Limit:
    """The limit that refused a request (or, in shadow mode, would have): tokenmeter.v1.LimitRef."""

    scope: str  # "tenant:acme", "project:acme/web", "team:acme/web/search", "key:ci-bot", "pool"
    kind: str | None = None  # extproc.limiter.types KIND_*: "tokens", "quota_tokens", ...; None: not known
    action: str | None = None  # "throttle" | "block" | "alert"; None: not known

    @classmethod
    def strictest(cls, scopes: Iterable[str], actions: Mapping[str, object]) -> Limit | None:
        """In shadow mode: of the scopes over their limits (the record's `alerts`), the one whose
        action is the strictest (block, then throttle), with that action; None when each would only
        have alerted (or there are none). `actions`: scope name -> action (a scope not in it
        throttles, the policy's default), as extproc.service.admission.ScopePath.actions."""
        best: Limit | None = None
        best_rank = 0
        for scope in scopes:
            action = str(actions.get(scope, "throttle"))
            rank = _STRICTNESS.get(action, 0)
            if rank > best_rank:
                best, best_rank = cls(scope, None, action), rank
        return best


_STRICTNESS = {"throttle": 1, "block": 2}


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
    model: str | None = None  # the model the request asked for
    response_model: str | None = None  # the model that answered (the response's `model`)
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
    # -- since the usage record became tokenmeter.v1.UsageRecord --------------------------
    api: str | None = None  # API_LABELS: "openai_chat", "anthropic_messages", ...
    cache_write_tokens: int = 0  # part of prompt_tokens: Anthropic cache_creation_input_tokens
    time_to_first_token_ms: float | None = None  # request start to the model server's first byte
    cost: str | None = None  # exact decimal string (extproc.billing.price); None: not priced
    currency: str | None = None  # ISO 4217, of `cost`
    price_version: str | None = None  # the price catalog's version that priced it
    price_missing: bool = False  # used tokens, but the catalog has no price for its model
    decided_by: Limit | None = None  # the limit that refused it (shadow: would have)
    replica: str | None = None  # the processor replica that wrote it

    def set_usage(self, usage: Usage) -> None:
        """Take the tokens of `usage` (every kind) and where they come from."""
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.cached_tokens, self.cache_write_tokens = usage.cached_tokens, usage.cache_creation_tokens
        self.reasoning_tokens = usage.reasoning_tokens
        self.usage_source = "estimated" if usage.estimated else "reported" if usage.total_tokens else "none"

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serializes dataclasses natively (no asdict copy)

    @classmethod
    def from_json(cls, line: bytes | str) -> UsageRecord:
        """One JSON line. Missing optional fields take their defaults, unknown keys are ignored;
        raises ValueError (orjson.JSONDecodeError is one), TypeError or KeyError on a line that is
        not a record."""
        data: Any = orjson.loads(line)
        if not isinstance(data, dict):
            raise ValueError("a usage record must be a JSON object")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"missing {', '.join(map(repr, missing))}")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        known["alerts"] = tuple(known.get("alerts") or ())
        known["decision"] = Decision(known["decision"])
        known["ending"] = Ending(known.get("ending") or Ending.COMPLETED)
        decided = known.get("decided_by")
        if decided is not None:
            if not isinstance(decided, dict):
                raise ValueError("decided_by must be an object")
            known["decided_by"] = Limit(str(decided["scope"]), decided.get("kind"), decided.get("action"))
        return cls(**known)


_FIELDS = frozenset(f.name for f in dataclasses.fields(UsageRecord))
_REQUIRED = ("request_id", "time", "decision", "policy_version")


class RecordSink(Protocol):
    """Where usage records go (extproc.records.sink.JsonlSink)."""

    def emit(self, record: UsageRecord) -> None: ...
