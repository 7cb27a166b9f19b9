"""The response side of one admitted request: meter the body, settle the limiter, emit the record.

Used in two ways:
  * in the admission stream itself, when Envoy sends the response body there (STREAMED mode: the
    processor answers each chunk at once, and the token counts reach Envoy's dynamic metadata);
  * in a separate observability-mode stream (envoy/envoy-observe.yaml): Envoy does not wait for the
    processor on the response path at all. That stream may land on another processor process, so
    everything it needs travels in the request's dynamic metadata (`to_metadata`/`from_metadata`),
    and settlement goes through the shared limiter by (tenant, request id).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from google.protobuf import struct_pb2

from extproc.limiter.types import Limiter
from extproc.metering.meter import ResponseMeter
from extproc.metering.request import Schema
from extproc.metering.usage import Usage
from extproc.records.record import RecordSink, UsageRecord
from extproc.service.responses import MetadataValue
from extproc.service.telemetry import Telemetry

# UsageRecord fields that travel in dynamic metadata to an observability-mode meter stream.
_RECORD_FIELDS_STR = ("request_id", "decision", "policy_version", "tenant", "project", "team", "key_id",
                      "path", "model", "pool")


def final_usage(
    reported: Usage | None,
    *,
    status: int | None,
    complete: bool,
    body_bytes: int,
    prompt_estimate: int,
    reserved: int,
    count: Callable[[], Usage] | None = None,
) -> Usage:
    """What to charge once the response is over, whoever metered it.

    Reported usage always wins. A response that completed with an error status and no usage served
    nothing, and so did one without a body. A complete body without usage is counted (`count`: the
    processor's meter reads the text), or, where only its size is known (Envoy metered it), estimated
    at a token per 4 bytes within the reservation. A response cut before usage stays charged at its
    reservation, marked estimated.
    """
    if reported is not None:
        return reported
    if complete and status is not None and status >= 400:
        return Usage(0, 0)
    if complete and body_bytes == 0:
        return Usage(0, 0)  # a response without a body served nothing
    if complete and count is not None:
        return count()
    output = max(0, reserved - prompt_estimate)
    if complete:
        output = min(output, (body_bytes + 3) // 4)
    return Usage(prompt_estimate, output, estimated=True)


class ResponseAccounting:
    # Kept per in-flight request while the response flows (extproc.service.inflight): no __dict__.
    __slots__ = ("_meter", "done", "prompt_estimate", "record", "schema", "status")

    def __init__(
        self,
        record: UsageRecord,
        *,
        schema: Schema,
        prompt_estimate: int,
    ) -> None:
        self.record = record
        self.schema = schema
        self.prompt_estimate = prompt_estimate
        self._meter: ResponseMeter | None = None
        self.status: int | None = None
        self.done = False

    @property
    def meter(self) -> ResponseMeter:
        """Built on first use: with envoy-native.yaml the processor never sees the response."""
        if self._meter is None:
            self._meter = ResponseMeter(self.schema, self.record.stream)
        return self._meter

    # -- the request's facts, carried to another stream ---------------------------------------

    def to_metadata(self) -> dict[str, MetadataValue]:
        r = self.record
        out: dict[str, MetadataValue] = {k: getattr(r, k) or "" for k in _RECORD_FIELDS_STR}
        out.update(
            time=r.time,
            stream=r.stream,
            reserved_tokens=r.reserved_tokens,
            prompt_estimate=self.prompt_estimate,
            schema=str(self.schema),
            alerts=",".join(r.alerts),
            degraded=r.degraded,
        )
        return out

    @classmethod
    def from_metadata(cls, fields: Mapping[str, struct_pb2.Value]) -> ResponseAccounting | None:
        """Rebuild from an observability stream's metadata; None when the request was not admitted."""
        if "reserved_tokens" not in fields or "request_id" not in fields:
            return None

        def text(name: str) -> str | None:
            value = fields.get(name)
            return value.string_value or None if value is not None else None

        def number(name: str) -> float:
            value = fields.get(name)
            return value.number_value if value is not None else 0.0

        def flag(name: str) -> bool:
            value = fields.get(name)
            return value.bool_value if value is not None else False

        record = UsageRecord(
            request_id=text("request_id") or "",
            time=number("time"),
            decision=text("decision") or "admitted",
            policy_version=text("policy_version") or "",
            tenant=text("tenant"),
            project=text("project"),
            team=text("team"),
            key_id=text("key_id"),
            path=text("path"),
            model=text("model"),
            pool=text("pool"),
            stream=flag("stream"),
            reserved_tokens=int(number("reserved_tokens")),
            alerts=tuple(a for a in (text("alerts") or "").split(",") if a),
            degraded=flag("degraded"),
        )
        schema = Schema(text("schema") or Schema.OPENAI)
        return cls(record, schema=schema, prompt_estimate=int(number("prompt_estimate")))

    # -- the response ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self.meter.feed(chunk)

    def finish(
        self, limiter: Limiter, sink: RecordSink, telemetry: Telemetry, *, complete: bool
    ) -> dict[str, MetadataValue]:
        """Settle and emit once; returns the token metadata for Envoy (empty if already done)."""
        if self.done:
            return {}
        meter, estimate = self.meter, self.prompt_estimate
        usage = final_usage(
            meter.finish(estimate) if meter.saw_usage else None,
            status=self.status, complete=complete, body_bytes=meter.bytes_seen,
            prompt_estimate=estimate, reserved=self.record.reserved_tokens, count=lambda: meter.finish(estimate),
        )
        return self._close(usage, meter.response_model, limiter, sink, telemetry, complete=complete)

    def finish_counted(
        self,
        reported: Usage | None,
        *,
        body_bytes: int,
        complete: bool,
        response_model: str | None,
        duration_ms: float | None,
        limiter: Limiter,
        sink: RecordSink,
        telemetry: Telemetry,
    ) -> None:
        """Settle and emit from what Envoy counted (envoy/envoy-native.yaml's access log entry)."""
        if self.done:
            return
        usage = final_usage(
            reported, status=self.status, complete=complete, body_bytes=body_bytes,
            prompt_estimate=self.prompt_estimate, reserved=self.record.reserved_tokens,
        )
        self._close(usage, response_model, limiter, sink, telemetry, complete=complete, duration_ms=duration_ms)

    def _close(
        self,
        usage: Usage,
        response_model: str | None,
        limiter: Limiter,
        sink: RecordSink,
        telemetry: Telemetry,
        *,
        complete: bool,
        duration_ms: float | None = None,
    ) -> dict[str, MetadataValue]:
        self.done = True
        rec = self.record
        if rec.tenant:
            limiter.settle(rec.tenant, rec.request_id, usage.total_tokens)
        rec.status = self.status
        rec.prompt_tokens, rec.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        rec.cached_tokens, rec.reasoning_tokens = usage.cached_tokens, usage.reasoning_tokens
        rec.usage_source = "estimated" if usage.estimated else "reported" if usage.total_tokens else "none"
        rec.response_model = response_model
        if not complete:
            rec.decision = f"{rec.decision}_incomplete"
        if duration_ms is None:
            duration_ms = (time.time() - rec.time) * 1000
        rec.duration_ms = round(duration_ms, 3)
        sink.emit(rec)
        telemetry.usage(rec)
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "usage_source": rec.usage_source,
        }
