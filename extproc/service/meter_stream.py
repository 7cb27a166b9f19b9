"""The processor on the response path, where counting needs it.

Envoy sends a response here only on the routes of a pool whose model servers report no usage
(`reports_usage: false` in the policy; the `tokenmeter.meter` filter of extproc.envoy.config):
STREAMED, each chunk answered at once and unchanged. The admission's sealed facts come with the
first message (forwarded metadata); the meter reads the body (JSON or SSE, re-framed across
chunks) and, at its end, writes what it counted to Envoy's `tokenmeter.usage` namespace: the
reported usage if the server sent one after all, else an estimate from the generated text. The
request still ends in Envoy's access log (one settlement), which carries that count.

Any replica can meter any response: everything it needs travels in the metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.metering.meter import ResponseMeter
from extproc.metering.usage import Usage
from extproc.service import responses as R
from extproc.service.metadata import NAMESPACE, USAGE_NAMESPACE
from extproc.service.seal import Seal
from extproc.settlement.admitted import Admitted, Unsealed

log = logging.getLogger("tokenmeter.meter")

# tokenmeter.usage keys the meter writes (next to those Envoy's own filters write): read back by
# counted_usage at settlement.
COUNTED_PROMPT = "counted_prompt_tokens"
COUNTED_COMPLETION = "counted_completion_tokens"
COUNTED_CACHED = "counted_cached_tokens"
COUNTED_REASONING = "counted_reasoning_tokens"
COUNTED_ESTIMATED = "counted_estimated"
COUNTED_MODEL = "counted_response_model"


class MeterStream:
    def __init__(self, seal: Seal | None) -> None:
        self._seal = seal
        self._admitted: Admitted | None = None
        self._meter: ResponseMeter | None = None
        self.started = False
        self.done = False

    def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if req.WhichOneof("request") != "response_body":
            return R.response_headers()
        if not self.started:
            self.started = True
            self._start(req)
        msg = req.response_body
        if self._meter is not None:
            self._meter.feed(msg.body)
        if not msg.end_of_stream:
            return R.CONTINUE_RESPONSE_BODY
        self.done = True
        if self._meter is None or self._admitted is None:
            return R.CONTINUE_RESPONSE_BODY
        usage = self._meter.finish(self._admitted.prompt_estimate)
        return R.response_body(counted_fields(usage, self._meter.response_model), namespace=USAGE_NAMESPACE)

    def _start(self, req: pb.ProcessingRequest) -> None:
        fields = req.metadata_context.filter_metadata.get(NAMESPACE)
        if fields is None:
            return  # not admitted by a processor (cannot happen on the generated routes)
        try:
            self._admitted = Admitted.from_metadata(fields.fields, self._seal)
        except Unsealed:
            log.warning("meter stream with unsealed or tampered admission facts: not metered")
            return
        if self._admitted is not None:
            self._meter = ResponseMeter(self._admitted.api, self._admitted.record.stream)


def counted_fields(usage: Usage, response_model: str | None) -> dict[str, R.MetadataValue]:
    out: dict[str, R.MetadataValue] = {
        COUNTED_PROMPT: usage.prompt_tokens,
        COUNTED_COMPLETION: usage.completion_tokens,
        COUNTED_CACHED: usage.cached_tokens,
        COUNTED_REASONING: usage.reasoning_tokens,
        COUNTED_ESTIMATED: usage.estimated,
    }
    if response_model:
        out[COUNTED_MODEL] = response_model[:256]
    return out


def counted_usage(fields: Mapping[str, object]) -> Usage | None:
    """What the meter counted, from an access log entry's tokenmeter.usage fields (a Struct's items:
    plain numbers and booleans); None when the processor did not meter the response."""
    prompt, completion = fields.get(COUNTED_PROMPT), fields.get(COUNTED_COMPLETION)
    if not isinstance(prompt, float | int) or not isinstance(completion, float | int):
        return None

    def number(value: object) -> int:
        return max(0, int(value)) if isinstance(value, float | int) and not isinstance(value, bool) else 0

    return Usage(
        number(prompt), number(completion),
        cached_tokens=number(fields.get(COUNTED_CACHED)),
        reasoning_tokens=number(fields.get(COUNTED_REASONING)),
        estimated=fields.get(COUNTED_ESTIMATED) is True,
    )
