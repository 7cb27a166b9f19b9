"""A do-nothing ext_proc server: the floor any Python grpc.aio processor can reach.

Every ProcessingRequest gets an empty response of the matching kind (request_headers and
response_headers -> HeadersResponse, request_body and response_body -> BodyResponse, trailers ->
TrailersResponse), taken from a table of response messages built once at import. No header
mutation, no dynamic metadata, no mode_override, never ``request_drain``: Envoy sees "continue"
for every message and keeps the processing mode of its config. The stream handler has the same
shape as the real processor's (extproc/service/server.py: an async generator over the request
iterator, ending the stream once the last message Envoy sends is answered) and the server the same
gRPC options, so what remains is grpc.aio's per-stream and per-message cost (HTTP/2, completion
queue, asyncio tasks, protobuf parse of the request and serialization of the reply).

The benchmark (bench/run.py, setup "(n)") puts it behind a second copy of the shipped Envoy config.

Run: ``python -m bench.null_processor --listen 127.0.0.1:50051`` (or ``--listen unix:/path``).
Exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

log = logging.getLogger("bench.null_processor")

# Same channel options as the real processor (extproc/service/server.py).
SERVER_OPTIONS = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]

# The reply for each kind of ProcessingRequest (the name of the field set in its `request` oneof).
# Built once and never mutated: the hot path allocates no response message.
RESPONSES: dict[str, pb.ProcessingResponse] = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}



def _routed(kind: str) -> pb.ProcessingResponse:
    """For envoy/envoy-native.yaml, whose routes send a request upstream only with the processor's
    pool metadata: the same empty reply plus a constant `tokenmeter:pool` and a route-cache clear."""
    md = struct_pb2.Struct()
    md.fields["tokenmeter"].struct_value.update({"pool": "cheap"})
    # Envoy re-routes after a body reply only when it carries a header mutation (even an empty one).
    common = pb.CommonResponse(clear_route_cache=True, header_mutation=pb.HeaderMutation())
    if kind == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=md)
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=md)


ROUTED_RESPONSES: dict[str, pb.ProcessingResponse] = {
    **RESPONSES,
    "request_headers": _routed("request_headers"),
    "request_body": _routed("request_body"),
}


def response_for(request: pb.ProcessingRequest, table: dict[str, pb.ProcessingResponse] = RESPONSES
                 ) -> pb.ProcessingResponse | None:
    """The precompiled empty reply for this request's kind; None for an empty request."""
    kind = request.WhichOneof("request")
    return table.get(kind) if kind is not None else None


class NullProcessor:
    """The ExternalProcessor service: `Process` is all that grpc's generated handler looks up."""

    def __init__(self, routed: bool = False) -> None:
        self.unknown = 0
        self.routed = routed
        self.table = ROUTED_RESPONSES if routed else RESPONSES

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            resp = response_for(request, self.table)
            if resp is None:  # no kind set: nothing to answer (Envoy never sends this)
                self.unknown += 1
                continue
            yield resp
            # Like the real processor, end the stream once the last message Envoy sends is answered
            # (behind envoy-native.yaml the body; else the end of the response body).
            kind = request.WhichOneof("request")
            if (self.routed and kind == "request_body") or (
                kind == "response_body" and request.response_body.end_of_stream
            ):
                return


class NullAccessLog:
    """Reads Envoy's gRPC access log stream (envoy-native.yaml sends one) and drops every entry."""

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als.StreamAccessLogsResponse()


async def serve(listen: str, grace_s: float = 1.0, routed: bool = False) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(routed), server)
    als_grpc.add_AccessLogServiceServicer_to_server(NullAccessLog(), server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    log.info("null ext_proc processor listening on %s", listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.null_processor",
        description="A do-nothing Envoy ext_proc server (grpc.aio + uvloop): the floor of a Python processor.",
    )
    parser.add_argument("--listen", default="127.0.0.1:50051", help="host:port or unix:/path (default %(default)s)")
    parser.add_argument("--grace", type=float, default=1.0, help="seconds open streams get on SIGTERM")
    parser.add_argument("--routed", action="store_true",
                        help="answer request messages with a constant pool metadata + route-cache clear "
                        "(needed behind envoy/envoy-native.yaml, whose routes require the processor's pool)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(args.listen, args.grace, args.routed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
