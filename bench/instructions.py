"""Instructions the processor executes per request, gRPC included: a count that host noise cannot move.

    .venv/bin/python -m bench.instructions [--requests 300 900] [--null]

CPU time on a shared 2-vCPU VM moves by 20-30 % between runs of the same code (bench/RESULTS.md),
which hides changes of a few percent. This runs the processor (`tokenmeter serve`, or with --null
bench/null_processor.py) under valgrind's callgrind, which counts the instructions it executes in
user space (system calls are not counted), and drives it the way the generated Envoy config
(extproc.envoy.config) does, from this process over gRPC: per request one ext_proc stream with the
buffered body and the config's request_attributes (checked against the config at start), the reply
read, the stream closed; every 100 requests one access log message with their entries (the reply's
metadata plus the counted usage) on the settle log's stream. It does so for each count in
--requests, one processor run each, and reports (total difference) / (request difference): the
per-request count, start-up excluded. The limiter's deadline is raised for the run (the processor
runs ~50x slower under valgrind).
Needs valgrind (apt-get install valgrind). TM_CALLGRIND_OUT=/tmp/cg.%p.out keeps callgrind's profiles
(callgrind_annotate; the difference of the two runs' per-function counts is per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench import null_processor
from bench.hotpath import ATTRS, access_log_entry, envoy_request
from bench.load import chat_body
from bench.run import BENCH_POLICY
from extproc.devstack.ports import free_port, wait_for_port
from extproc.devstack.redis_proc import start_redis_server
from extproc.envoy.config import Deployment, http_filters, settle_access_log
from extproc.service.metadata import NAMESPACE, SETTLE_LOG_NAME

BATCH = 100
# The processing mode this driver reproduces: one message per request, the buffered body.
ONE_MESSAGE = {
    "request_header_mode": "SKIP",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def check_config() -> None:
    """Fail if the generated config asks Envoy for another exchange than the one driven here."""
    # the admission filter (a pool whose servers report no usage also gets the processor on the
    # response, through a second ext_proc filter: bench/policy.yaml has none)
    ext_proc = [f["typed_config"] for f in http_filters(Deployment()) if f["name"] == "envoy.filters.http.ext_proc"]
    if len(ext_proc) != 1:
        raise SystemExit(f"the generated config has {len(ext_proc)} admission ext_proc filters, this driver expects 1")
    mode, attributes = ext_proc[0]["processing_mode"], ext_proc[0].get("request_attributes", [])
    if mode != ONE_MESSAGE:
        raise SystemExit(f"the generated config's processing mode changed: {mode}")
    sent = pb.ProcessingRequest.FromString(envoy_request(b"{}", 0)).attributes[ATTRS].fields
    if set(sent) - set(attributes) or set(attributes) - set(sent) - {"request.headers['x-api-key']"}:
        raise SystemExit(f"the config's request_attributes {attributes} are not what is sent here: {sorted(sent)}")
    if settle_access_log()["typed_config"]["common_config"]["log_name"] != SETTLE_LOG_NAME:
        raise SystemExit("the config's settle access log is not the one the processor reads")
    if null_processor.NAMESPACE != NAMESPACE:
        raise SystemExit(f"bench/null_processor.py writes metadata to {null_processor.NAMESPACE!r}, not {NAMESPACE!r}")


async def drive(port: int, n: int) -> int:
    body = chat_body(stream=False, max_tokens=16)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 120)
        ext = pb_grpc.ExternalProcessorStub(channel)
        logs = als_grpc.AccessLogServiceStub(channel)
        queue: asyncio.Queue[als.StreamAccessLogsMessage | None] = asyncio.Queue()

        async def messages() -> object:
            first = True
            while (msg := await queue.get()) is not None:
                if first:
                    msg.identifier.log_name = SETTLE_LOG_NAME
                    first = False
                yield msg

        log_call = asyncio.ensure_future(logs.StreamAccessLogs(messages()))
        ok = 0
        batch = als.StreamAccessLogsMessage()
        for i in range(n):
            envoy_id = f"envoy-{i}"
            call = ext.Process(iter([pb.ProcessingRequest.FromString(envoy_request(body, i))]))
            async for reply in call:
                ok += reply.WhichOneof("response") == "request_body"
                batch.http_logs.log_entry.append(access_log_entry(reply, envoy_id))
            if len(batch.http_logs.log_entry) == BATCH:
                await queue.put(batch)
                batch = als.StreamAccessLogsMessage()
        if batch.http_logs.log_entry:
            await queue.put(batch)
        await queue.put(None)
        await log_call
        return ok


def run_once(n: int, null: bool, tmp: Path, redis_url: str) -> int:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    if null:
        argv = [sys.executable, "-m", "bench.null_processor", "--listen", listen]
    else:
        tokenmeter = str(Path(sys.executable).parent / "tokenmeter")
        argv = [tokenmeter, "serve", "--policy", str(BENCH_POLICY), "--listen", listen, "--redis", redis_url,
                "--redis-deadline-ms", "10000", "--usage-log", str(tmp / "usage.jsonl"), "--grace", "60"]
    out = tmp / f"valgrind-{n}.txt"
    profile = os.environ.get("TM_CALLGRIND_OUT", "/dev/null")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={profile}",
                             f"--log-file={out}", *argv], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=120)
        ok = uvloop.run(drive(port, n))
        if ok != n:
            raise SystemExit(f"{n - ok} of {n} requests were not admitted")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    found = re.search(r"Collected : (\d+)", out.read_text())
    if found is None:
        raise SystemExit(f"no instruction count in {out}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, nargs=2, default=(300, 900), metavar=("N1", "N2"))
    parser.add_argument("--null", action="store_true", help="measure bench/null_processor.py instead")
    args = parser.parse_args(argv)
    check_config()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    n1, n2 = args.requests
    with tempfile.TemporaryDirectory(prefix="tm-instr-") as tmp:
        redis = start_redis_server(workdir=tmp)
        try:
            counts = [run_once(n, args.null, Path(tmp), redis.url) for n in (n1, n2)]
        finally:
            redis.stop()
    per = (counts[1] - counts[0]) / (n2 - n1)
    who = "null processor" if args.null else "processor"
    print(f"{who}: {per:,.0f} instructions per request ({n1}: {counts[0]:,}, {n2}: {counts[1]:,}; pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
