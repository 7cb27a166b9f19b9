"""The one place a request ends.

Every way a request can end goes through `Settlement.end`: a refusal at admission, an unmetered
request answered at once, Envoy's access log entry for an admitted request (or for one Envoy
answered itself), an admission whose client left while it reserved, and a drain that gives up
waiting. It settles the limiter (the reservation is replaced by what was used), writes the one
usage record, and counts the tokens, once per request id: a second ending of the same request
(the access log entry of a request the drain already settled, a duplicate delivery) changes nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

from extproc.billing import PriceCatalog, price
from extproc.limiter.types import Limiter
from extproc.metering.usage import Usage
from extproc.records.record import RecordSink, UsageRecord
from extproc.service.telemetry import Telemetry
from extproc.settlement.outcome import Ending

# Request ids remembered to make endings idempotent. Duplicate endings arrive within seconds of the
# first (a drain and a late access log entry; a re-sent access log batch), so the most recent ids
# are enough; the limiter's own settle is idempotent per reservation besides.
REMEMBER = 100_000


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
    at a token per 4 bytes; either estimate stays within the output the reservation allowed (the
    request's own maximum: no server generates more). A response cut before usage stays charged at
    its reservation, marked estimated.
    """
    if reported is not None:
        return reported
    if complete and status is not None and status >= 400:
        return Usage(0, 0)
    if complete and body_bytes == 0:
        return Usage(0, 0)  # a response without a body served nothing
    output = max(0, reserved - prompt_estimate)
    if complete and count is not None:
        counted = count()
        if counted.estimated and counted.completion_tokens > output:
            return dataclasses.replace(counted, completion_tokens=output)
        return counted
    if complete:
        output = min(output, (body_bytes + 3) // 4)
    return Usage(prompt_estimate, output, estimated=True)


class Settlement:
    def __init__(
        self,
        limiter: Limiter,
        sink: RecordSink,
        telemetry: Telemetry,
        *,
        prices: Callable[[], PriceCatalog | None] = lambda: None,
        replica: str | None = None,
        remember: int = REMEMBER,
    ) -> None:
        self.limiter = limiter
        self.sink = sink
        self.telemetry = telemetry
        self.prices = prices  # the live policy's price catalog: cost is computed when a record is written
        self.replica = replica  # who wrote the record (the processor replica)
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def end(
        self,
        rec: UsageRecord,
        ending: Ending,
        *,
        usage: Usage | None = None,
        charge: int | None = None,
        status: int | None = None,
        duration_ms: float | None = None,
        response_model: str | None = None,
        time_to_first_token_ms: float | None = None,
    ) -> bool:
        """End the request of `rec`: settle its reservation at `charge` tokens (None: nothing was
        reserved), record `usage`, `status` and how it ended, and emit its one record. False (and
        nothing done) when this request id has already ended."""
        rid = rec.request_id
        if rid in self._ended:
            return False
        self._ended[rid] = None
        if len(self._ended) > self._remember:
            self._ended.popitem(last=False)
        if charge is not None and rec.tenant:
            # the output part is known when what is charged is what the usage counts
            output = usage.completion_tokens if usage is not None and usage.total_tokens == charge else None
            self.limiter.settle(rec.tenant, rid, charge, output)
        rec.ending = ending
        if status is not None:
            rec.status = status
        if usage is not None:
            rec.set_usage(usage)
        if response_model is not None:
            rec.response_model = response_model
        if duration_ms is None:
            duration_ms = (time.time() - rec.time) * 1000
        rec.duration_ms = round(duration_ms, 3)
        if time_to_first_token_ms is not None:
            rec.time_to_first_token_ms = round(time_to_first_token_ms, 3)
        rec.replica = self.replica
        price(rec, self.prices())
        self.sink.emit(rec)
        if usage is not None:
            self.telemetry.usage(rec)
        return True
