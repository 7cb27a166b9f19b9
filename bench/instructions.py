"""Instructions the processor executes per request, gRPC included: a count that host noise cannot move.

    .venv/bin/python -m bench.instructions [--requests 300 900] [--null]

CPU time on a shared 2-vCPU VM moves by 20-30 % between runs of the same code (bench/RESULTS.md),
which hides changes of a few percent. This runs the processor (`tokenmeter serve`, or with --null
bench/null_processor.py) under valgrind's callgrind, which counts the instructions it executes in
user space (system calls are not counted), and drives it the way envoy-native.yaml does, from this
process over gRPC: per request one ext_proc stream with the body and the attributes, the reply read,
the stream closed; every 100 requests one access log message with their entries (the reply's
metadata plus the counted usage). It does so for each count in --requests, one processor run each,
and reports (total difference) / (request difference): the per-request count, start-up excluded.
The limiter's deadline is raised for the run (the processor runs ~50x slower under valgrind).
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
import yaml
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench.hotpath import access_log_entry, envoy_request
from bench.load import chat_body
from bench.run import BENCH_POLICY
from extproc.devstack.ports import free_port, wait_for_port
from extproc.devstack.redis_proc import start_redis_server
from extproc.service.metadata import SETTLE_LOG_NAME

BATCH = 100


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
        argv = [sys.executable, "-m", "bench.null_processor", "--routed", "--listen", listen]
    else:
        policy = yaml.safe_load(BENCH_POLICY.read_text())
        policy["redis"]["deadline_ms"] = 10_000
        policy_path = tmp / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
        tokenmeter = str(Path(sys.executable).parent / "tokenmeter")
        argv = [tokenmeter, "serve", "--policy", str(policy_path), "--listen", listen, "--redis", redis_url,
                "--usage-log", str(tmp / "usage.jsonl"), "--grace", "60"]
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
    parser.add_argument("--null", action="store_true", help="measure bench/null_processor.py --routed instead")
    args = parser.parse_args(argv)
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
