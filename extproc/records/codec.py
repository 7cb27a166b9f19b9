"""UsageRecord (the JSON Lines record, extproc.records.record) <-> tokenmeter.v1.UsageRecord (its
schema, protos/tokenmeter/v1/usage_record.proto), without loss: `record_from_proto(record_to_proto(r))
== r` for every record settlement writes.

Mapping notes:
  * `time` is admission.admitted_at, `duration_ms` duration and `time_to_first_token_ms`
    time_to_first_token, converted exactly (through fractions, to the nanosecond; a float of unix
    seconds or milliseconds comes back the same float);
  * empty strings in the message are None in the record (tenant, project, team, key_id, path,
    model, response_model, pool, api, currency, price_version, replica);
  * the record's decisions that the AdmissionFacts enum has no value for are in the message's
    ending: Decision.REFUSED_BY_ENVOY (with Ending.REFUSED) is DECISION_UNSPECIFIED with
    ENDING_REFUSED_BY_ENVOY, Decision.NOT_GOVERNED (with Ending.COMPLETED) is DECISION_UNSPECIFIED
    with ENDING_NOT_GOVERNED;
  * an admitted request that completed with an error status and no tokens is ENDING_FAILED_UPSTREAM
    (read back as Ending.COMPLETED, which the status and tokens tell apart);
  * the facts the record does not keep (prompt_estimate, max_output_tokens, usage_injected) are
    left unset.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from extproc.protos import facts as facts_codec
from extproc.protos.tokenmeter.v1 import admission_pb2 as apb
from extproc.protos.tokenmeter.v1 import usage_record_pb2 as upb
from extproc.records.record import API_LABELS, Limit, UsageRecord
from extproc.settlement.outcome import Decision, Ending

__all__ = ["record_from_proto", "record_to_proto"]

_API_VALUES = {label: value for value, label in API_LABELS.items()}

_SOURCES = {"none": upb.USAGE_SOURCE_NONE, "reported": upb.USAGE_SOURCE_REPORTED,
            "estimated": upb.USAGE_SOURCE_ESTIMATED}
_SOURCE_LABELS = {value: label for label, value in _SOURCES.items()}

_ENDINGS = {Ending.COMPLETED: apb.ENDING_COMPLETED, Ending.REFUSED: apb.ENDING_REFUSED,
            Ending.INCOMPLETE: apb.ENDING_INCOMPLETE, Ending.ABORTED: apb.ENDING_ABORTED}
_ENDING_VALUES = {value: ending for ending, value in _ENDINGS.items()}
_BILLION = 10**9
_MILLION = 10**6


def _nanos(value: float, per_unit: int) -> int:
    return round(Fraction(value) * per_unit)


def _ending(rec: UsageRecord) -> apb.Ending:
    if rec.decision is Decision.REFUSED_BY_ENVOY:
        return apb.ENDING_REFUSED_BY_ENVOY
    if rec.decision is Decision.NOT_GOVERNED:
        return apb.ENDING_NOT_GOVERNED
    if (rec.ending is Ending.COMPLETED and rec.decision.admitted and rec.status is not None
            and rec.status >= 400 and rec.prompt_tokens == 0 and rec.completion_tokens == 0):
        return apb.ENDING_FAILED_UPSTREAM
    return _ENDINGS[rec.ending]


def record_to_proto(rec: UsageRecord) -> upb.UsageRecord:
    facts = apb.AdmissionFacts(
        request_id=rec.request_id, policy_version=rec.policy_version, tenant=rec.tenant or "",
        project=rec.project or "", team=rec.team or "", key_id=rec.key_id or "",
        api=_API_VALUES.get(rec.api or "", apb.API_UNSPECIFIED),  # type: ignore[arg-type]
        path=rec.path or "", requested_model=rec.model or "", stream=rec.stream, pool=rec.pool or "",
        reserved_tokens=rec.reserved_tokens,
        decision=facts_codec.decision_value(rec.decision),  # type: ignore[arg-type]
        alerts=rec.alerts, degraded=rec.degraded,
    )
    facts.admitted_at.FromNanoseconds(_nanos(rec.time, _BILLION))
    msg = upb.UsageRecord(
        admission=facts, ending=_ending(rec), response_model=rec.response_model or "",
        prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens,
        cached_tokens=rec.cached_tokens, cache_write_tokens=rec.cache_write_tokens,
        reasoning_tokens=rec.reasoning_tokens,
        usage_source=_SOURCES.get(rec.usage_source, upb.USAGE_SOURCE_UNSPECIFIED),
        currency=rec.currency or "", price_version=rec.price_version or "", price_missing=rec.price_missing,
        replica=rec.replica or "",
    )
    if rec.status is not None:
        msg.status = rec.status
    msg.duration.FromNanoseconds(_nanos(rec.duration_ms, _MILLION))
    if rec.time_to_first_token_ms is not None:
        msg.time_to_first_token.FromNanoseconds(_nanos(rec.time_to_first_token_ms, _MILLION))
    if rec.cost is not None:
        msg.cost = rec.cost
    if rec.decided_by is not None:
        msg.decided_by.scope = rec.decided_by.scope
        msg.decided_by.kind = rec.decided_by.kind or ""
        msg.decided_by.action = rec.decided_by.action or ""
    return msg


def record_from_facts(f: apb.AdmissionFacts, decision: Decision) -> UsageRecord:
    """A record of what the admission facts say (no usage yet): the part of a UsageRecord message
    that is its AdmissionFacts; also how settlement starts a record from sealed facts."""
    return UsageRecord(
        request_id=f.request_id,
        time=f.admitted_at.ToNanoseconds() / _BILLION,
        decision=decision,
        policy_version=f.policy_version,
        tenant=f.tenant or None,
        project=f.project or None,
        team=f.team or None,
        key_id=f.key_id or None,
        path=f.path or None,
        model=f.requested_model or None,
        pool=f.pool or None,
        stream=f.stream,
        reserved_tokens=f.reserved_tokens,
        alerts=tuple(f.alerts),
        degraded=f.degraded,
        api=API_LABELS.get(f.api),
        decided_by=Limit(f.shadow_scope, f.shadow_kind or None, f.shadow_action or None) if f.shadow_scope else None,
    )


def record_from_proto(msg: upb.UsageRecord) -> UsageRecord:
    f = msg.admission
    if msg.ending == apb.ENDING_REFUSED_BY_ENVOY:
        decision, ending = Decision.REFUSED_BY_ENVOY, Ending.REFUSED
    elif msg.ending == apb.ENDING_NOT_GOVERNED:
        decision, ending = Decision.NOT_GOVERNED, Ending.COMPLETED
    else:
        decision = Decision(facts_codec.decision_label(f.decision))
        ending = _ENDING_VALUES.get(msg.ending, Ending.COMPLETED)  # FAILED_UPSTREAM, UNSPECIFIED
    decided_by = None
    if msg.HasField("decided_by"):
        d = msg.decided_by
        decided_by = Limit(d.scope, d.kind or None, d.action or None)
    rec = record_from_facts(f, decision)
    return dataclasses.replace(
        rec,
        response_model=msg.response_model or None,
        status=msg.status if msg.HasField("status") else None,
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        cached_tokens=msg.cached_tokens,
        reasoning_tokens=msg.reasoning_tokens,
        usage_source=_SOURCE_LABELS.get(msg.usage_source, "none"),
        ending=ending,
        duration_ms=msg.duration.ToNanoseconds() / _MILLION,
        cache_write_tokens=msg.cache_write_tokens,
        time_to_first_token_ms=(
            msg.time_to_first_token.ToNanoseconds() / _MILLION if msg.HasField("time_to_first_token") else None
        ),
        cost=msg.cost if msg.HasField("cost") else None,
        currency=msg.currency or None,
        price_version=msg.price_version or None,
        price_missing=msg.price_missing,
        decided_by=decided_by or rec.decided_by,
        replica=msg.replica or None,
    )
