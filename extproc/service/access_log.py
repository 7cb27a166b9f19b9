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
from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc

from extproc.service.metadata import SETTLE_LOG_NAME
from extproc.service.processor import Context
from extproc.settlement.request_end import RequestEnd, end_request

log = logging.getLogger("tokenmeter.access_log")

# Entries settled between two turns of the event loop: Envoy sends one message per flush interval
# (100 ms in the generated configuration), about a hundred entries at 1,000 requests/s.
YIELD_EVERY = 16


def settle_entry(ctx: Context, entry: alog.HTTPAccessLogEntry) -> bool:
    """End one request from its access log entry (extproc.settlement.request_end); False when there
    was nothing to end here."""
    return end_request(ctx, RequestEnd.from_grpc(entry))


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
