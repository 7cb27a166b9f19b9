"""AdmissionFacts in Envoy's dynamic metadata (namespace `tokenmeter`): encode at admission, decode
at settlement.

The whole message travels as one string field, `facts`: the base64 of its serialized bytes
(`facts_bytes`). That is what settlement trusts, and what the HMAC seal covers, byte for byte:

    data = facts_bytes(facts)
    metadata = facts_to_struct_fields(facts)          # metadata["facts"] == base64 of `data`
    metadata["seal"] = hmac(secret, data)
    ...
    data = facts_payload(entry_metadata)              # the exact bytes that came back
    if data is not None and hmac(secret, data) == entry_metadata["seal"]:
        facts = parse_facts(data)

Verify the bytes that came back, not a re-serialization of what was parsed from them (a newer
writer's unknown fields would not survive it). Deterministic serialization only makes one writer's
bytes stable for the same message; nothing here relies on two writers agreeing.

Next to it, a few facts are copied as plain string fields (`PLAIN_FIELDS`) for the readers that
cannot parse a proto: Envoy's access log formatters (`%DYNAMIC_METADATA(tokenmeter:tenant)%`), route
matches and header values (`pool`), and people reading a log line; and `strip_usage: true` when the
gateway injected include_usage (the route that takes the usage event back out matches on it). They
are for display and routing only; settlement never reads them. The rl_* rate-limit header values
are not facts and are not written here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from google.protobuf import message, struct_pb2

from extproc.protos.tokenmeter.v1 import admission_pb2 as pb
from extproc.protos.tokenmeter.v1.admission_pb2 import AdmissionFacts
from extproc.service.metadata import STRIP_USAGE_KEY

__all__ = [
    "FACTS_KEY",
    "PLAIN_FIELDS",
    "AdmissionFacts",
    "decision_label",
    "decision_value",
    "facts_bytes",
    "facts_from_struct",
    "facts_payload",
    "facts_to_struct_fields",
    "parse_facts",
]

FACTS_KEY = "facts"

# The plain copies, by metadata key (the keys envoy/*.yaml reads today). `decision` is the label of
# `decision_label`, `model` the requested model.
PLAIN_FIELDS = ("request_id", "tenant", "project", "team", "key_id", "pool", "policy_version", "decision", "model")

# Decision -> the label the usage record, telemetry and Envoy's access log use.
_LABELS: dict[int, str] = {
    pb.DECISION_UNSPECIFIED: "pending",
    pb.DECISION_ADMITTED: "admitted",
    pb.DECISION_ADMITTED_ALERT: "alert",
    pb.DECISION_ADMITTED_SHADOW: "shadow",
    pb.DECISION_THROTTLED: "throttled",
    pb.DECISION_BLOCKED: "blocked",
    pb.DECISION_REFUSED_UNAUTHENTICATED: "refused",
    pb.DECISION_REFUSED_BAD_REQUEST: "bad_request",
    pb.DECISION_REFUSED_TOO_LARGE: "too_large",
    pb.DECISION_REFUSED_UNSUPPORTED: "unsupported",
    pb.DECISION_REFUSED_BACKEND: "refused_backend",
}
_VALUES = {label: value for value, label in _LABELS.items()}


def decision_label(decision: int) -> str:
    """The label of a Decision value (extproc.settlement.outcome.Decision's values): "admitted",
    "alert", "shadow", "throttled", "blocked", "refused", "bad_request", ... Whether the limiter
    decided without its backend is the separate `degraded` flag, never a suffix."""
    return _LABELS.get(decision, "pending")


def decision_value(label: str) -> int:
    """The Decision value of a label (the inverse of decision_label; unknown: DECISION_UNSPECIFIED)."""
    return _VALUES.get(label, pb.DECISION_UNSPECIFIED)


def facts_bytes(facts: AdmissionFacts) -> bytes:
    """The serialized message (deterministic serialization): the `facts` field's bytes, which the
    seal signs."""
    return facts.SerializeToString(deterministic=True)


def facts_to_struct_fields(facts: AdmissionFacts) -> dict[str, str | bool]:
    """The dynamic metadata fields for the facts: `facts` (base64 of `facts_bytes`), the plain
    copies of PLAIN_FIELDS (empty strings for unset ones, as the processor writes today), and
    `strip_usage: True` only when `usage_injected`."""
    fields: dict[str, str | bool] = {
        "request_id": facts.request_id,
        "tenant": facts.tenant,
        "project": facts.project,
        "team": facts.team,
        "key_id": facts.key_id,
        "pool": facts.pool,
        "policy_version": facts.policy_version,
        "decision": decision_label(facts.decision),
        "model": facts.requested_model,
        FACTS_KEY: base64.b64encode(facts_bytes(facts)).decode("ascii"),
    }
    if facts.usage_injected:
        fields[STRIP_USAGE_KEY] = True
    return fields


def _fields(struct: struct_pb2.Struct | Mapping[str, struct_pb2.Value]) -> Mapping[str, struct_pb2.Value]:
    return struct.fields if isinstance(struct, struct_pb2.Struct) else struct


def facts_payload(struct: struct_pb2.Struct | Mapping[str, struct_pb2.Value]) -> bytes | None:
    """The serialized facts exactly as they came back (the bytes to verify the seal over); None
    when there is no `facts` string field, or it is empty (the processor never writes an empty
    message: request_id is always set) or not valid base64."""
    value = _fields(struct).get(FACTS_KEY)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    try:
        return base64.b64decode(value.string_value, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def parse_facts(data: bytes) -> AdmissionFacts | None:
    """The message from its bytes; None when they are not an AdmissionFacts."""
    facts = AdmissionFacts()
    try:
        facts.ParseFromString(data)
    except message.DecodeError:
        return None
    return facts


def facts_from_struct(struct: struct_pb2.Struct | Mapping[str, struct_pb2.Value]) -> AdmissionFacts | None:
    """The facts carried in dynamic metadata (a Struct, or its `fields`), from the `facts` field
    only; None when it is missing or malformed. Does not check the seal: see facts_payload."""
    data = facts_payload(struct)
    return parse_facts(data) if data is not None else None
