"""Envoy's gRPC access log as the end of each request.

With the response metered by Envoy itself (json_to_metadata / sse_to_metadata), the processor
learns how a request ended from the access log entry Envoy sends when the stream is over: status,
body bytes, response flags, the admission's own dynamic metadata (`tokenmeter`, written by this
processor at admission, so any replica can settle it) and the counted usage (`tokenmeter.usage`).
Envoy batches entries (buffer_flush_interval), so settlement costs no message per request.

Only a log named SETTLE_LOG_NAME settles: any other access log pointed here is read and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc

from extproc.metering.envoy_usage import response_model
from extproc.metering.usage import Usage
from extproc.records.record import UsageRecord
from extproc.service.metadata import NAMESPACE, SETTLE_LOG_NAME, USAGE_NAMESPACE
from extproc.service.meter_stream import COUNTED_MODEL, counted_usage
from extproc.service.processor import Context
from extproc.settlement.admitted import Admitted, Unsealed
from extproc.settlement.outcome import Decision, Ending
from extproc.settlement.settle import final_usage

log = logging.getLogger("tokenmeter.access_log")

# Response flags that mean the response did not run to its end (client gone, upstream cut or reset,
# timeouts): without reported usage such a request stays charged at its reservation.
_CUT_FLAGS = (
    "downstream_connection_termination",
    "downstream_remote_reset",
    "upstream_remote_reset",
    "upstream_connection_termination",
    "upstream_protocol_error",
    "local_reset",
    "stream_idle_timeout",
    "upstream_request_timeout",
    "upstream_max_stream_duration_reached",
    "duration_timeout",
    "overload_manager",
)


# Entries settled between two turns of the event loop: Envoy sends one message per flush interval
# (100 ms in envoy-native.yaml), about a hundred entries at 1,000 requests/s.
YIELD_EVERY = 16


def was_cut(flags: alog.ResponseFlags) -> bool:
    return any(getattr(flags, name) for name in _CUT_FLAGS)


def replaced_by_envoy(entry: alog.HTTPAccessLogEntry) -> bool:
    """The upstream started answering, but the client got Envoy's own reply instead (e.g. a JSON
    response over the buffer json_to_metadata needs: 500 `response_payload_too_large`). The model
    did the work, so this is not an error that served nothing: it is settled as a cut response."""
    details = entry.response.response_code_details
    return bool(details) and details != "via_upstream" and entry.common_properties.HasField(
        "time_to_first_upstream_rx_byte")


def _status(entry: alog.HTTPAccessLogEntry) -> int | None:
    return entry.response.response_code.value or None if entry.response.HasField("response_code") else None


def _duration_ms(props: alog.AccessLogCommon) -> float | None:
    """Envoy's own time from the first request byte to the last response byte sent."""
    if not props.HasField("time_to_last_downstream_tx_byte"):
        return None
    return float(props.time_to_last_downstream_tx_byte.ToNanoseconds()) / 1e6


def _record_unseen(ctx: Context, entry: alog.HTTPAccessLogEntry) -> None:
    """A request Envoy answered itself before the processor saw it (a POST without a body, a body
    over Envoy's buffer, ...): no caller is known and nothing was reserved, but it gets its record."""
    props = entry.common_properties
    started = props.start_time.ToNanoseconds() / 1e9 if props.HasField("start_time") else time.time()
    status = _status(entry)
    governed = status is None or status >= 400
    rec = UsageRecord(
        # Envoy's x-request-id: Envoy issues it, and it is prefixed so it never passes for one of ours
        request_id=f"envoy:{entry.request.request_id or f'{time.time_ns():x}'}",
        time=started,
        decision=Decision.REFUSED_BY_ENVOY if governed else Decision.NOT_GOVERNED,
        policy_version=ctx.policy.version,
        path=_bounded(entry.request.path.split("?", 1)[0]) or None,
    )
    if not governed:  # the generated routes make this impossible
        log.warning("a request reached status %s without the processor (path %s)", status, rec.path)
    ctx.settlement.end(rec, Ending.REFUSED if governed else Ending.COMPLETED, status=status,
                       duration_ms=_duration_ms(props) or 0.0)
    ctx.telemetry.refusal(None, rec.decision)


def _bounded(text: str, limit: int = 256) -> str:
    """A client-chosen string bounded before it becomes a record field."""
    return text if len(text) <= limit else text[:limit] + "..."


def _admitted_but_lost(ctx: Context, entry: alog.HTTPAccessLogEntry, admitted: Admitted) -> None:
    """Admitted here, but the entry carries none of our metadata: Envoy never applied the reply
    (it timed out, or the client left while it was on the wire), so no route sent the request to a
    model server. Recorded as aborted, once.

    The join is on Envoy's request id, which Envoy issues itself for every request (the listener
    takes no client's x-request-id: use_remote_address, extproc.envoy.config). Such an entry carries
    no seal, so with a settle secret it never refunds; without one, the reservation is given back
    only when Envoy says its ext_proc call failed. Otherwise it stays charged until its window
    passes: an error can only overcharge a limit window, never the bill (usage is 0)."""
    refund = ctx.seal is None and entry.response.response_code_details.startswith("ext_proc")
    ctx.settlement.end(admitted.record, Ending.ABORTED, usage=Usage(0, 0),
                       charge=0 if refund else admitted.record.reserved_tokens, status=_status(entry),
                       duration_ms=_duration_ms(entry.common_properties))


def settle_entry(ctx: Context, entry: alog.HTTPAccessLogEntry) -> bool:
    """End one request from its access log entry; False when there was nothing to settle here
    (refused or unmetered: ended by the processor already; or never seen by it: recorded here as
    refused_by_envoy; or a duplicate)."""
    props = entry.common_properties
    filter_md = props.metadata.filter_metadata
    ours = ctx.by_envoy_id.pop(entry.request.request_id) if entry.request.request_id else None
    metadata = filter_md.get(NAMESPACE)
    if metadata is None:
        # Envoy answered it without the processor's word: it never reached the processor (no body,
        # a body over Envoy's buffer, ...), or Envoy never applied the processor's reply.
        if ours is None:
            _record_unseen(ctx, entry)
        else:
            lost = ctx.inflight.pop(ours)
            if lost is not None:
                _admitted_but_lost(ctx, entry, lost)
            # else: the processor ended it (e.g. the client left while it reserved)
        return False
    try:
        admitted = Admitted.from_metadata(metadata.fields, ctx.seal)
    except Unsealed:
        log.warning("access log entry with unsealed or tampered admission facts: not settled")
        return False
    if admitted is None:
        return False  # refused or unmetered: ended by the processor at admission
    ctx.inflight.done(admitted.record.request_id)
    counted = filter_md.get(USAGE_NAMESPACE)
    fields = dict(counted.items()) if counted is not None else {}
    status = _status(entry)
    complete = not was_cut(props.response_flags) and not replaced_by_envoy(entry)
    reported = admitted.api.usage_from_envoy(fields)
    counted = counted_usage(fields) if reported is None else None  # the processor metered the response
    if counted is not None and not counted.estimated:
        reported, counted = counted, None  # the meter saw the server's own usage after all
    usage = final_usage(
        reported, status=status, complete=complete,
        body_bytes=entry.response.response_body_bytes, prompt_estimate=admitted.prompt_estimate,
        reserved=admitted.record.reserved_tokens, count=None if counted is None else lambda: counted,
    )
    model = response_model(fields) or _counted_model(fields)
    return ctx.settlement.end(
        admitted.record, Ending.COMPLETED if complete else Ending.INCOMPLETE, usage=usage,
        charge=usage.total_tokens, status=status, duration_ms=_duration_ms(props), response_model=model,
    )


def _counted_model(fields: Mapping[str, object]) -> str | None:
    value = fields.get(COUNTED_MODEL)
    return value if isinstance(value, str) and value else None


class AccessLogReceiver(als_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settled = 0

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[als.StreamAccessLogsMessage, als.StreamAccessLogsResponse],
    ) -> als.StreamAccessLogsResponse:
        settles = False
        async for msg in request_iterator:
            if msg.HasField("identifier"):  # the first message of each stream names the log
                settles = msg.identifier.log_name == SETTLE_LOG_NAME
                if not settles:
                    log.warning("ignoring access log %r (only %r settles)", msg.identifier.log_name,
                                SETTLE_LOG_NAME)
            if not settles:
                continue
            for i, entry in enumerate(msg.http_logs.log_entry, 1):
                try:
                    if settle_entry(self.ctx, entry):
                        self.settled += 1
                except Exception:  # one bad entry must not drop the rest of the batch
                    log.exception("could not settle an access log entry")
                if i % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let admissions in: a batch is ~100 entries, ~3 ms of work
        return als.StreamAccessLogsResponse()
