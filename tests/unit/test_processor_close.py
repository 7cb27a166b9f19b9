"""What the processor does when Envoy's stream ends early."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.limiter.types import Decision, Reservation
from extproc.policy import load_policy
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink

POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"


class HangingLimiter:
    def __init__(self) -> None:
        self.reserved: list[str] = []
        self.settled: list[tuple[str, str, int]] = []

    async def reserve(self, r: Reservation) -> Decision:
        self.reserved.append(r.request_id)
        await asyncio.Event().wait()  # the script was sent; the answer never comes
        raise AssertionError("unreachable")

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        self.settled.append((tenant, request_id, actual_tokens))

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


def _headers_message(pairs: dict[str, str]) -> pb.ProcessingRequest:
    headers = pb.HttpHeaders(end_of_stream=False)
    for k, v in pairs.items():
        headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return pb.ProcessingRequest(request_headers=headers)


async def test_a_stream_cancelled_while_reserving_gives_the_reservation_back_and_is_recorded() -> None:
    limiter, sink = HangingLimiter(), ListSink()
    proc = StreamProcessor(Context(FixedPolicy(load_policy(POLICY)), limiter, sink))
    await proc.handle(_headers_message({":path": "/v1/chat/completions", ":method": "POST",
                                        "authorization": "Bearer e2e-basic-key"}))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    message = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    task = asyncio.create_task(proc.handle(message))
    await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    proc.close(graceful=False)
    assert limiter.settled == [("acme", limiter.reserved[0], 0)]
    assert [(r.decision, r.ending) for r in sink.records] == [("pending", "aborted")]


async def test_a_request_that_never_reaches_its_body_is_recorded_as_aborted() -> None:
    limiter, sink = HangingLimiter(), ListSink()
    proc = StreamProcessor(Context(FixedPolicy(load_policy(POLICY)), limiter, sink))
    await proc.handle(_headers_message({":path": "/v1/chat/completions", ":method": "POST",
                                        "authorization": "Bearer e2e-basic-key"}))
    proc.close(graceful=True)
    assert limiter.reserved == [] and limiter.settled == []
    assert [(r.ending, r.tenant) for r in sink.records] == [("aborted", "acme")]
