"""A do-nothing ext_proc server: the floor any Python grpc.aio processor can reach.

Every ProcessingRequest gets the cheapest reply the generated Envoy config (extproc.envoy.config)
can act on, taken from a table of response messages built once at import: request messages
(the buffered body, or the headers of a request without a body) get an empty body/headers reply
with a constant ``tokenmeter:pool`` metadata (the config's routes send a request upstream only
with the processor's pool) and a route-cache clear; response headers/body and trailers get an
empty reply of their kind. No header mutation beyond an empty one, no body edit, no admission, no
mode_override, never ``request_drain``. The stream handler has the same shape as the real
processor's (extproc/service/server.py: an async generator over the request iterator, ending the
stream once the last message Envoy sends is answered: the request body, or request headers that end
the stream; the end of the response body when the first message's protocol_config says the response
body is sent too) and the server the same gRPC options, so what remains is grpc.aio's per-stream and
per-message cost (HTTP/2, completion queue, asyncio tasks, protobuf parse of the request and
serialization of the reply). It also reads Envoy's gRPC settle access log and drops every entry,
and answers Envoy's gRPC health checks (SERVING) as the real processor does.

The benchmark (bench/run.py, setup "(n)") puts it behind a second copy of the generated config.

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
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("bench.null_processor")

# Same channel options as the real processor (extproc/service/server.py).
SERVER_OPTIONS = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]

# The reply for each kind of ProcessingRequest (the name of the field set in its `request` oneof).
# Built once and never mutated: the hot path allocates no response message.
EMPTY: dict[str, pb.ProcessingResponse] = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}

# extproc.service.metadata.NAMESPACE, spelled out: the null processor imports nothing of extproc (a
# larger heap costs every garbage collection); bench.instructions checks the two agree.
NAMESPACE = "tokenmeter"
NULL_POOL = "cheap"
HEALTH_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_BODY_NONE = ProcessingMode.NONE


def _routed(kind: str) -> pb.ProcessingResponse:
    """The empty reply plus a constant `tokenmeter:pool` and a route-cache clear (the generated
    config also re-routes on its own, route_cache_action CLEAR; the flag costs a few bytes)."""
    md = struct_pb2.Struct()
    md.fields[NAMESPACE].struct_value.update({"pool": NULL_POOL})
    common = pb.CommonResponse(clear_route_cache=True, header_mutation=pb.HeaderMutation())
    if kind == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=md)
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=md)


RESPONSES: dict[str, pb.ProcessingResponse] = {
    **EMPTY,
    "request_headers": _routed("request_headers"),
    "request_body": _routed("request_body"),
}


def response_for(request: pb.ProcessingRequest, table: dict[str, pb.ProcessingResponse] = RESPONSES
                 ) -> pb.ProcessingResponse | None:
    """The precompiled reply for this request's kind; None for an empty request."""
    kind = request.WhichOneof("request")
    return table.get(kind) if kind is not None else None


def is_last(request: pb.ProcessingRequest, response_too: bool) -> bool:
    """The last message Envoy sends. With the generated config (request headers skipped, body
    buffered, nothing of the response: `response_too` False) the body, or the headers of a request
    without one (GET and the like, whose route asks for the headers). With a config that also sends
    the response body (bench.null_floor's variants), the end of the response body."""
    kind = request.WhichOneof("request")
    if response_too:
        return kind == "response_body" and bool(request.response_body.end_of_stream)
    if kind == "request_body":
        return True
    return kind == "request_headers" and bool(request.request_headers.end_of_stream)


class NullProcessor:
    """The ExternalProcessor service: `Process` is all that grpc's generated handler looks up."""

    def __init__(self) -> None:
        self.unknown = 0

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        response_too = False
        async for request in request_iterator:
            if request.HasField("protocol_config"):  # on the first message, as the real processor reads it
                response_too = request.protocol_config.response_body_mode != _BODY_NONE
            resp = response_for(request)
            if resp is None:  # no kind set: nothing to answer (Envoy never sends this)
                self.unknown += 1
                continue
            yield resp
            # Like the real processor, end the stream once the last message Envoy sends is answered.
            if is_last(request, response_too):
                return


class NullAccessLog:
    """Reads Envoy's gRPC settle access log stream and drops every entry."""

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als.StreamAccessLogsResponse()


async def serve(listen: str, grace_s: float = 1.0) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(), server)
    als_grpc.add_AccessLogServiceServicer_to_server(NullAccessLog(), server)
    # Envoy's active health check of the processor cluster (extproc.envoy.config), as the real one
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", HEALTH_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
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
    # before the one generated config, routing was optional (--routed); it is what the config needs now
    parser.add_argument("--routed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(args.listen, args.grace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
