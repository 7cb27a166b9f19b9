"""The server ends an ext_proc stream itself once it has answered the last message Envoy sends on it
(the admission, or a refusal). Left to Envoy's half-close, grpc.aio keeps ~120 bytes
per stream for good (measured: bench/RESULTS.md), so a long-running processor grew without bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.devstack.ports import free_port
from extproc.policy import load_policy
from extproc.service.processor import Context, FixedPolicy
from extproc.service.server import ExternalProcessor
from tests.unit.recorders import ListSink
from tests.unit.test_native_admission_and_settlement import RecordingLimiter

POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"


def headers(key: str) -> pb.ProcessingRequest:
    h = pb.HttpHeaders()
    for k, v in {":path": "/v1/chat/completions", ":method": "POST", "authorization": f"Bearer {key}"}.items():
        h.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return pb.ProcessingRequest(request_headers=h)


def body() -> pb.ProcessingRequest:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=orjson.dumps(chat), end_of_stream=True))


async def exchange(messages: list[pb.ProcessingRequest]) -> tuple[list[pb.ProcessingResponse], grpc.StatusCode]:
    """Send `messages` one at a time, each after the previous reply, and never half-close."""
    ctx = Context(FixedPolicy(load_policy(POLICY)), RecordingLimiter(), ListSink())
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(ctx), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    outbox: asyncio.Queue[pb.ProcessingRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        while True:
            yield await outbox.get()  # like Envoy, it never ends the stream on its own here

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(requests())
            replies = []
            for m in messages:
                await outbox.put(m)
                replies.append(await asyncio.wait_for(call.read(), 5))
            code = await asyncio.wait_for(call.code(), 5)  # only if the server ended the call
            return replies, code
    finally:
        await server.stop(0)


async def test_the_server_ends_the_stream_after_answering_the_admission() -> None:
    replies, code = await exchange([headers("e2e-basic-key"), body()])
    assert code == grpc.StatusCode.OK
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]


async def test_the_server_ends_the_stream_after_a_refusal() -> None:
    replies, code = await exchange([headers("not-a-key")])
    assert code == grpc.StatusCode.OK
    assert replies[0].immediate_response.status.code == 401
