"""How Envoy saw a request end, and ending it from that: one path for the live gRPC access log and
for recovery from Envoy's file access log.

Envoy writes the end of every request twice: to the processor over its gRPC access log (the fast
path: settled at once, extproc.service.access_log) and to its own JSON access log file (written by
Envoy whatever happens to the processor). Both carry the same facts: status, whether the response
was cut, the sealed admission facts (namespace `tokenmeter`) and Envoy's usage counts
(`tokenmeter.usage`). `RequestEnd` is that, read from either; `end_request` ends the request from
it through Settlement.end, so a request recovered from the file is recorded exactly as it would
have been live (extproc.settlement.recover).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from google.protobuf import struct_pb2

from extproc.metering.envoy_usage import response_model
from extproc.metering.usage import Usage
from extproc.policy.model import Policy
from extproc.records.ledger import parse_time
from extproc.records.record import UsageRecord, bounded
from extproc.service.inflight import Inflight
from extproc.service.metadata import NAMESPACE, USAGE_NAMESPACE
from extproc.service.meter_stream import COUNTED_MODEL, counted_usage
from extproc.service.seal import Seal
from extproc.service.telemetry import Telemetry
from extproc.settlement.admitted import Admitted, Unsealed
from extproc.settlement.outcome import Decision, Ending
from extproc.settlement.settle import Settlement, final_usage

log = logging.getLogger("tokenmeter.settlement")

# Response flags that mean the response did not run to its end (client gone, upstream cut or reset,
# timeouts): without reported usage such a request stays charged at its reservation. By their
# names in the gRPC entry (alog.ResponseFlags) and their codes in %RESPONSE_FLAGS%.
CUT_FLAGS = {
    "downstream_connection_termination": "DC",
    "downstream_remote_reset": "DR",
    "upstream_remote_reset": "UR",
    "upstream_connection_termination": "UC",
    "upstream_protocol_error": "UPE",
    "local_reset": "LR",
    "stream_idle_timeout": "SI",
    "upstream_request_timeout": "UT",
    "upstream_max_stream_duration_reached": "UMSDR",
    "duration_timeout": "DT",
    "overload_manager": "OM",
}
_CUT_CODES = frozenset(CUT_FLAGS.values())


@dataclass(frozen=True, slots=True)
class RequestEnd:
    envoy_request_id: str
    path: str
    start_time: float | None  # unix seconds
    status: int | None
    details: str  # %RESPONSE_CODE_DETAILS%
    cut: bool  # the response did not run to its end
    upstream_answered: bool  # a model server sent something back
    body_bytes: int
    duration_ms: float | None  # first request byte to last response byte sent
    ttfb_ms: float | None  # to the first byte of the model server's answer
    admission: struct_pb2.Struct | None  # the `tokenmeter` namespace (None: the processor never answered)
    usage: Mapping[str, object]  # the `tokenmeter.usage` namespace, as plain values

    @property
    def replaced_by_envoy(self) -> bool:
        """The upstream started answering, but the client got Envoy's own reply instead (e.g. a JSON
        response over the buffer json_to_metadata needs): the model did the work, so this is not an
        error that served nothing: it is settled as a cut response."""
        return bool(self.details) and self.details != "via_upstream" and self.upstream_answered

    @classmethod
    def from_grpc(cls, entry: alog.HTTPAccessLogEntry) -> RequestEnd:
        props = entry.common_properties
        md = props.metadata.filter_metadata
        counted = md.get(USAGE_NAMESPACE)
        return cls(
            envoy_request_id=entry.request.request_id,
            path=entry.request.path,
            start_time=props.start_time.ToNanoseconds() / 1e9 if props.HasField("start_time") else None,
            status=entry.response.response_code.value or None if entry.response.HasField("response_code") else None,
            details=entry.response.response_code_details,
            cut=any(getattr(props.response_flags, name) for name in CUT_FLAGS),
            upstream_answered=props.HasField("time_to_first_upstream_rx_byte"),
            body_bytes=entry.response.response_body_bytes,
            duration_ms=_ms(props, "time_to_last_downstream_tx_byte"),
            ttfb_ms=_ms(props, "time_to_first_upstream_rx_byte"),
            admission=md[NAMESPACE] if NAMESPACE in md else None,
            usage=dict(counted.items()) if counted is not None else {},
        )

    @classmethod
    def from_log_line(cls, line: Mapping[str, Any]) -> RequestEnd:
        """A line of the generated configuration's JSON access log (extproc.envoy.config)."""
        admission = line.get("admission")
        struct: struct_pb2.Struct | None = None
        if isinstance(admission, dict):
            struct = struct_pb2.Struct()
            struct.update(admission)
        flags = str(line.get("response_flags") or "-")
        status = line.get("status")
        usage = line.get("usage")
        return cls(
            envoy_request_id=str(line.get("envoy_request_id") or ""),
            path=str(line.get("path") or ""),
            start_time=_iso_time(line.get("time")),
            status=int(status) if isinstance(status, int | float) and status else None,
            details=str(line.get("details") or ""),
            cut=bool(_CUT_CODES.intersection(flags.split(","))),
            upstream_answered=bool(line.get("upstream_host")) and line.get("ttfb_ms") is not None,
            body_bytes=int(line.get("bytes_sent") or 0),
            duration_ms=_number(line.get("duration_ms")),
            ttfb_ms=_number(line.get("ttfb_ms")),
            admission=struct,
            usage=dict(usage) if isinstance(usage, dict) else {},
        )


class EndContext(Protocol):
    """What ending a request needs (extproc.service.processor.Context has it)."""

    settlement: Settlement
    seal: Seal | None
    telemetry: Telemetry
    inflight: Inflight[Admitted]
    by_envoy_id: Inflight[str]

    @property
    def policy(self) -> Policy: ...


def end_request(ctx: EndContext, end: RequestEnd, *, recovering: bool = False) -> bool:
    """End one request as Envoy reported it; False when there was nothing to end here (a refusal or
    unmetered request the processor already ended; a duplicate; a tampered entry).

    `recovering`: the line comes from Envoy's file log for a request the ledger lacks, so a refusal
    the processor answered (and recorded, in a record that was lost) is recorded from the line too.
    """
    ours = ctx.by_envoy_id.pop(end.envoy_request_id) if end.envoy_request_id else None
    if end.admission is None:
        # Envoy answered it without the processor's word: it never reached the processor (no body,
        # a body over Envoy's buffer, ...), or Envoy never applied the processor's reply.
        lost = ctx.inflight.pop(ours) if ours is not None else None
        if lost is not None:
            return _admitted_but_lost(ctx, end, lost)
        if ours is None:
            return _record_unseen(ctx, end)
        return False  # the processor ended it (e.g. the client left while it reserved)
    try:
        admitted = Admitted.from_metadata(end.admission.fields, ctx.seal)
    except Unsealed:
        log.warning("access log entry with unsealed or tampered admission facts: not settled")
        return False
    if admitted is None:
        return _record_refusal(ctx, end) if recovering else False
    ctx.inflight.done(admitted.record.request_id)
    reported = admitted.api.usage_from_envoy(end.usage)
    counted = counted_usage(end.usage) if reported is None else None  # the processor metered it
    if counted is not None and not counted.estimated:
        reported, counted = counted, None  # the meter saw the server's own usage after all
    complete = not end.cut and not end.replaced_by_envoy
    usage = final_usage(
        reported, status=end.status, complete=complete, body_bytes=end.body_bytes,
        prompt_estimate=admitted.prompt_estimate, reserved=admitted.record.reserved_tokens,
        count=None if counted is None else lambda: counted,
    )
    model = response_model(end.usage) or _text(end.usage.get(COUNTED_MODEL))
    return ctx.settlement.end(
        admitted.record, Ending.COMPLETED if complete else Ending.INCOMPLETE, usage=usage,
        charge=usage.total_tokens, status=end.status, duration_ms=end.duration_ms, response_model=model,
        time_to_first_token_ms=end.ttfb_ms,
    )


def _admitted_but_lost(ctx: EndContext, end: RequestEnd, admitted: Admitted) -> bool:
    """Admitted here, but the entry carries none of our metadata: Envoy never applied the reply
    (it timed out, or the client left while it was on the wire), so no route sent the request to a
    model server. Recorded as aborted, once.

    The join is on Envoy's request id, which Envoy issues itself for every request (the listener
    takes no client's x-request-id: use_remote_address, extproc.envoy.config). Such an entry carries
    no seal, so with a settle secret it never refunds; without one, the reservation is given back
    only when Envoy says its ext_proc call failed. Otherwise it stays charged until its window
    passes: an error can only overcharge a limit window, never the bill (usage is 0)."""
    refund = ctx.seal is None and end.details.startswith("ext_proc")
    return ctx.settlement.end(admitted.record, Ending.ABORTED, usage=Usage(0, 0),
                              charge=0 if refund else admitted.record.reserved_tokens, status=end.status,
                              duration_ms=end.duration_ms)


def _record_unseen(ctx: EndContext, end: RequestEnd) -> bool:
    """A request Envoy answered itself before the processor saw it (a POST without a body, a body
    over Envoy's buffer, ...): no caller is known and nothing was reserved, but it gets its record."""
    governed = end.status is None or end.status >= 400
    rec = UsageRecord(
        # Envoy's x-request-id: Envoy issues it, and it is prefixed so it never passes for one of ours
        request_id=f"envoy:{end.envoy_request_id or f'{time.time_ns():x}'}",
        time=end.start_time if end.start_time is not None else time.time(),
        decision=Decision.REFUSED_BY_ENVOY if governed else Decision.NOT_GOVERNED,
        policy_version=ctx.policy.version,
        path=bounded(end.path.split("?", 1)[0]) or None,
    )
    if not governed:  # the generated routes make this impossible
        log.warning("a request reached status %s without the processor (path %s)", end.status, rec.path)
    ctx.telemetry.refusal(None, rec.decision)
    return ctx.settlement.end(rec, Ending.REFUSED if governed else Ending.COMPLETED, status=end.status,
                              duration_ms=end.duration_ms or 0.0)


def _record_refusal(ctx: EndContext, end: RequestEnd) -> bool:
    """(Recovery only.) A request the processor refused: its record, rebuilt from what the refusal
    wrote into Envoy's metadata."""
    assert end.admission is not None
    fields = dict(end.admission.items())
    rid, label = _text(fields.get("request_id")), _text(fields.get("decision"))
    if rid is None or label is None:
        return False
    try:
        decision = Decision(label)
    except ValueError:
        return False
    rec = UsageRecord(
        request_id=rid,
        time=end.start_time if end.start_time is not None else time.time(),
        decision=decision,
        policy_version=_text(fields.get("policy_version")) or ctx.policy.version,
        tenant=_text(fields.get("tenant")),
        project=_text(fields.get("project")),
        team=_text(fields.get("team")),
        key_id=_text(fields.get("key_id")),
        path=bounded(end.path.split("?", 1)[0]) or None,
    )
    return ctx.settlement.end(rec, Ending.REFUSED, status=end.status, duration_ms=end.duration_ms or 0.0)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _ms(props: alog.AccessLogCommon, field: str) -> float | None:
    if not props.HasField(field):
        return None
    return float(getattr(props, field).ToNanoseconds()) / 1e6


def _iso_time(value: object) -> float | None:
    """Envoy's %START_TIME% (ISO 8601, UTC), as unix seconds; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None
