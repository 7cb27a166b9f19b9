"""The processor's own CPU per request, without gRPC or Envoy: what our code costs on top of the floor.

    .venv/bin/python -m bench.hotpath [--requests 20000] [--concurrency 16] [--memory] [--repeat 3]

Instructions per request, steady where CPU time is not (a shared VM): run it under callgrind twice,
and divide the difference of the totals by the difference of the requests (bench/RESULTS.md):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python -m bench.hotpath \
        --warmup 200 --repeat 1 --deadline-ms 5000 --requests 500     # then --requests 1500

In one process on uvloop, with a real redis-server (or the in-memory limiter with --memory) and the
real JSONL sink, it runs what the processor runs per request behind the generated Envoy config
(extproc.envoy.config):

  admission   parse the ProcessingRequest Envoy sends (the body, credentials as attributes),
              StreamProcessor.handle (identity, body parse, one EVALSHA, metadata), serialize
              the reply;
  settlement  parse an HTTPAccessLogEntry carrying that reply's metadata and the counted usage,
              settle_entry (limiter settle, usage record), in batches of 100 as Envoy sends them
              (admit 100, settle them, and so on), until the settlements reached Redis and the
              records were written. The background work in between (the settle pipeline to Redis,
              the sink's writes) counts as settlement when it runs in the settle phase, and as
              admission when it runs while the next batch is admitted: the sum is what matters.

It reports CPU time (this process only; redis-server's is not counted) per request for each, the
median over --repeat rounds. The full-stack numbers (gRPC, Envoy, the other processes) come from
bench.run; this one is steady enough to compare changes of a few microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import uvloop
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.load import BENCH_KEY, chat_body
from bench.run import BENCH_POLICY
from extproc.devstack.redis_proc import start_redis_server
from extproc.limiter import limiter_from_url
from extproc.policy import load_policy
from extproc.records.sink import JsonlSink
from extproc.service.access_log import settle_entry
from extproc.service.metadata import ATTRIBUTE_HEADERS, NAMESPACE, USAGE_NAMESPACE
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from extproc.service.server import tune_gc
from extproc.settings import Settings

ATTRS = "envoy.filters.http.ext_proc"


def envoy_request(body: bytes, n: int) -> bytes:
    """What the generated config has Envoy send: the buffered body alone, with its request_attributes
    (ATTRIBUTE_HEADERS: path, method, credentials, content type, Envoy's request id). Envoy leaves
    out an attribute that does not evaluate, as `request.headers['x-api-key']` of a request without
    that header."""
    headers = {
        ":path": "/v1/chat/completions",
        ":method": "POST",
        "x-request-id": f"envoy-{n}",
        "authorization": f"Bearer {BENCH_KEY}",
        "content-type": "application/json",
    }
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    req.attributes[ATTRS].update({attr: headers[h] for attr, h in ATTRIBUTE_HEADERS.items() if h in headers})
    req.protocol_config.request_body_mode = ProcessingMode.BUFFERED
    req.protocol_config.response_body_mode = ProcessingMode.NONE
    raw: bytes = req.SerializeToString()
    return raw


def access_log_entry(reply: pb.ProcessingResponse, envoy_id: str = "envoy-x") -> alog.HTTPAccessLogEntry:
    """What Envoy logs for an admitted request: the reply's metadata and the counted usage."""
    entry = alog.HTTPAccessLogEntry()
    entry.request.request_id = envoy_id
    md = entry.common_properties.metadata.filter_metadata
    if reply.dynamic_metadata.fields[NAMESPACE].struct_value.fields:
        md[NAMESPACE].CopyFrom(reply.dynamic_metadata.fields[NAMESPACE].struct_value)
    md[USAGE_NAMESPACE].update({"prompt_tokens": 12, "completion_tokens": 16})
    entry.response.response_code.value = 200
    entry.response.response_body_bytes = 420
    entry.common_properties.start_time.GetCurrentTime()
    entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(3)
    return entry


async def one_round(ctx: Context, raw: bytes, n: int, concurrency: int) -> tuple[float, float]:
    """n requests in batches of 100 (as Envoy flushes its access log): admit a batch, `concurrency`
    at a time, then settle it. Returns CPU microseconds per request for each."""
    admission = settlement = 0.0
    done = 0

    async def worker(count: int, out: list[pb.ProcessingResponse]) -> None:
        for _ in range(count):
            proc = StreamProcessor(ctx)
            reply = await proc.handle(pb.ProcessingRequest.FromString(raw))
            reply.SerializeToString()
            proc.close(graceful=True)
            out.append(reply)

    while done < n:
        replies: list[pb.ProcessingResponse] = []
        t0 = time.process_time()
        await asyncio.gather(*[worker(100 // concurrency + (i < 100 % concurrency), replies)
                               for i in range(concurrency)])
        admission += time.process_time() - t0
        if replies[0].WhichOneof("response") != "request_body":
            raise SystemExit(f"the request was not admitted: {replies[0]}")
        entries = [access_log_entry(r).SerializeToString() for r in replies]  # Envoy's work, not timed
        t0 = time.process_time()
        for e in entries:
            settle_entry(ctx, alog.HTTPAccessLogEntry.FromString(e))
        await asyncio.sleep(0)
        settlement += time.process_time() - t0
        done += len(replies)
    t0 = time.process_time()
    await ctx.limiter.flush()
    await asyncio.sleep(0.25)  # the sink's flush interval: its last batch written
    settlement += time.process_time() - t0
    return admission / done * 1e6, settlement / done * 1e6


async def run(redis_url: str | None, args: argparse.Namespace, usage_log: Path) -> None:
    policy = load_policy(BENCH_POLICY)
    # as `tokenmeter serve` by default (--redis-deadline-ms, --redis-failure-mode: extproc.settings)
    limiter = limiter_from_url(redis_url, deadline_ms=args.deadline_ms or Settings.redis_deadline_ms,
                               on_failure=str(Settings.redis_failure_mode))
    start = getattr(limiter, "start", None)
    if start is not None:
        await start()
    sink = JsonlSink(usage_log)
    sink.start()
    ctx = Context(FixedPolicy(policy), limiter, sink)
    raw = envoy_request(chat_body(stream=False, max_tokens=16), 1)
    await one_round(ctx, raw, args.warmup, args.concurrency)
    adm: list[float] = []
    stl: list[float] = []
    for i in range(args.repeat):
        a, s = await one_round(ctx, raw, args.requests, args.concurrency)
        adm.append(a)
        stl.append(s)
        print(f"round {i + 1}: admission {a:.1f} us/request, settlement {s:.1f} us/request", flush=True)
    await sink.aclose()
    await limiter.aclose()
    out = {"limiter": "memory" if redis_url is None else "redis", "requests": args.requests,
           "concurrency": args.concurrency, "admission_us": round(statistics.median(adm), 1),
           "settlement_us": round(statistics.median(stl), 1)}
    print(orjson.dumps(out).decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2000, help="requests before the measured rounds")
    parser.add_argument("--memory", action="store_true", help="the in-memory limiter instead of redis-server")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep Python's GC settings (default: tuned as `tokenmeter serve` does)")
    parser.add_argument("--deadline-ms", type=float, default=0,
                        help="the limiter's deadline (default: tokenmeter serve's); raise it under valgrind")
    args = parser.parse_args(argv)
    if not args.default_gc:
        tune_gc()
    with tempfile.TemporaryDirectory(prefix="tm-hotpath-") as tmp:
        usage_log = Path(tmp) / "usage.jsonl"
        if args.memory:
            uvloop.run(run(None, args, usage_log))
            return 0
        redis = start_redis_server(workdir=tmp)
        try:
            uvloop.run(run(redis.url, args, usage_log))
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
