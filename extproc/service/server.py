"""The gRPC server: a thin loop that hands each ext_proc stream to a StreamProcessor, and Envoy's
access log stream to the AccessLogReceiver.

Also serves the standard gRPC health service. SIGTERM/SIGINT: report NOT_SERVING, stop accepting,
let open streams finish (bounded grace), apply queued settlements, flush usage records, exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.alerts.config import alert_sink
from extproc.audit import AuditLog, BreakerState
from extproc.audit import breaker as audit_breaker
from extproc.limiter import limiter_from_url
from extproc.policy import PolicyStore
from extproc.records.sink import JsonlSink
from extproc.service.access_log import AccessLogReceiver
from extproc.service.processor import Context, StreamProcessor
from extproc.service.seal import Seal
from extproc.service.telemetry import Telemetry
from extproc.settings import Settings

log = logging.getLogger("tokenmeter.server")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.open_streams = 0

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        proc = StreamProcessor(self.ctx)
        graceful = False
        self.open_streams += 1
        try:
            async for request in request_iterator:
                yield await proc.handle(request)
                if proc.exchange_over:
                    # Nothing more will come that needs an answer: end the stream from this side.
                    # (Ended by Envoy's half-close instead, grpc.aio keeps ~120 B per stream.)
                    graceful = True
                    return
            graceful = True  # Envoy half-closed: the exchange ended normally, not by a reset
        finally:
            self.open_streams -= 1
            proc.close(graceful=graceful)


# Envoy's access log stream never ends by itself. Once every request
# admitted here has ended, wait this long for stray entries (Envoy flushes every 0.1 s there), then
# stop instead of holding shutdown for the whole grace period.
ACCESS_LOG_LINGER_S = 0.3

# One of several replicas keeps serving this long after it reports NOT_SERVING, so that Envoy's
# health check (every 0.5 s in the generated configuration, extproc.envoy.config) moves new
# requests to the others before this one stops accepting them: a rolling restart fails nothing.
HEALTH_NOTICE_S = 1.2


async def _drain(server: grpc.aio.Server, processor: ExternalProcessor, grace_s: float, replicas: int) -> None:
    """Shut down within `grace_s` without losing what was admitted here.

    Admitted requests end in Envoy's access log entry, which can only arrive while this server still
    serves: Envoy ends its access log stream as soon as the server stops (GOAWAY). A lone processor
    (`replicas == 1`) therefore keeps serving (and stays in Envoy's rotation: there is no other)
    until the requests it admitted have ended; what is still open at the end of the grace period is
    left to the processor that receives its access log entry (or to ledger recovery from Envoy's
    file access log): recording it here at its reservation would record it a second time when its
    real end arrives. With several replicas the entries may go to any of them, so it does not wait
    for its own; it serves on for HEALTH_NOTICE_S while Envoy's health check moves new requests
    elsewhere. Then it stops taking calls, lets open ext_proc streams finish, and ends the access
    log stream.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    ctx = processor.ctx
    if replicas == 1:
        # Polled (ASYNC110): a counter owned by other code paths, every 20 ms, during shutdown only.
        while len(ctx.inflight) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await asyncio.sleep(min(ACCESS_LOG_LINGER_S, max(0.0, deadline - loop.time())))  # stray entries
    else:
        await asyncio.sleep(min(HEALTH_NOTICE_S, max(0.0, deadline - loop.time())))
    stopping = asyncio.ensure_future(server.stop(max(0.0, deadline - loop.time())))
    while processor.open_streams and not stopping.done() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    if not stopping.done():
        await server.stop(0)  # ends what is left: the access log stream
    await stopping
    left = len(ctx.inflight)
    if replicas == 1 and left:
        # Not settled at their reservation here: their access log entries reach whichever processor
        # serves next (and Envoy's file access log has them whatever happens: tokenmeter ledger
        # recover), which records them once, at what they used.
        log.warning("drain: %d requests admitted here had not ended; their access log entries will end them", left)


ServeOptions = Settings  # the process settings (extproc.settings)


def _telemetry(metrics_port: int | None) -> Telemetry:
    """OTel instruments; with a metrics port, exported for Prometheus on 127.0.0.1:<port>/metrics."""
    if metrics_port is None:
        return Telemetry()
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    start_http_server(metrics_port, addr="127.0.0.1")  # its own thread, off the event loop
    return Telemetry(provider.get_meter("tokenmeter"))


# Python's cyclic GC in the processor, measured in steady state over ~20,000 requests (bench/gc_pauses,
# bench/RESULTS.md): with the defaults, a full collection scans everything imported at start and
# pauses the event loop ~30 ms; frozen after start-up, full collections take ~1 ms. A young
# generation of 2,000 objects (default 700) then halves the total time spent collecting, with
# pauses of at most ~2 ms (20,000: pauses of ~8-13 ms).
GC_THRESHOLDS = (2_000, 10, 10)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()  # what exists now (modules, the policy, grpc's objects) is never scanned again
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(opts: ServeOptions) -> None:
    audit = AuditLog(opts.audit_log) if opts.audit_log else None
    if audit is not None:
        audit.start()  # before the policy store: its first load is the first event
    store = PolicyStore(opts.policy, audit=audit)  # refuses to start on a malformed policy (PolicyError)
    policy = store.current
    limiter = limiter_from_url(
        opts.redis,
        deadline_ms=opts.redis_deadline_ms,
        max_wait_ms=opts.redis_max_wait_ms,
        on_failure=str(opts.redis_failure_mode),
        replicas_hint=opts.replicas_hint,
        window_scale=opts.window_scale,
    )
    breaker = getattr(limiter, "breaker", None)
    if audit is not None and breaker is not None:  # the circuit opening and closing go to the audit trail
        breaker.on_change = lambda state, why: audit.record(audit_breaker(BreakerState(state), why))
    start = getattr(limiter, "start", None)
    if start is not None:
        try:
            await start()  # load scripts (and learn a cluster's topology) before the first request
        except Exception as exc:  # Redis down at boot: serve anyway, per the failure policy
            log.warning("redis not reachable at start (%s); admission follows on_failure=%s until it is",
                        type(exc).__name__, opts.redis_failure_mode)
    sink = JsonlSink(opts.usage_log)
    sink.start()
    seal = Seal.from_file(opts.settle_secret_file) if opts.settle_secret_file else None
    telemetry = _telemetry(opts.metrics_port)
    alerts = alert_sink(opts, telemetry)  # log line and metric; the webhook's task when configured
    await alerts.start()
    ctx = Context(store, limiter, sink, telemetry, seal=seal, audit=audit, alerts=alerts)

    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
        ]
    )
    processor = ExternalProcessor(ctx)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    # Requests end (and settle) through Envoy's gRPC access log.
    als_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(ctx), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(opts.listen)
    if bound == 0 and not opts.listen.startswith("unix:"):
        raise OSError(f"cannot listen on {opts.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reload_task = asyncio.create_task(store.run(opts.reload_interval), name="policy-reload")
    tune_gc()
    log.info(
        "tokenmeter serving on %s (policy %s version %s, limiter %s)",
        opts.listen, opts.policy, policy.version, "redis" if opts.redis else "in-memory",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: read the policy file now, even an edit its stat does not show (logged and audited like a
    # file change); the handler only wakes the reload task, which does the reading off the loop.
    loop.add_signal_handler(signal.SIGHUP, store.request_reload, "SIGHUP")
    await stop.wait()

    log.info("shutting down: draining open streams (grace %.1fs)", opts.grace_seconds)
    # Envoy's health check asks for SERVICE_NAME: one of several replicas leaves the rotation at once.
    # A lone processor stays in it (Envoy has nowhere else to send requests, nor the access log
    # entries that end what it admitted); "" (readiness probes) reports NOT_SERVING either way.
    draining = ("", SERVICE_NAME) if opts.replicas_hint > 1 else ("",)
    for name in draining:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await _drain(server, processor, opts.grace_seconds, opts.replicas_hint)
    reload_task.cancel()
    await limiter.flush()
    await limiter.aclose()
    await sink.aclose()
    await alerts.aclose()  # the webhook gets a bounded time for what is queued
    if audit is not None:
        await audit.aclose()
    log.info("stopped")
