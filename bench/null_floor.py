"""The grpc.aio floor by ext_proc messages per request: the null processor behind Envoy configs that
differ only in how many messages each request exchanges with it.

    python -m bench.null_floor [--quick] [--out bench/out] [--wait-quiet SECONDS]

One fake model server (bench/upstream.py), one null processor (bench/null_processor.py) and one
Envoy per variant, each the config generated from bench/policy.yaml (extproc.envoy.config) as
setup (n) of bench/run.py (bench.stack.with_null_processor), then changed only in the ext_proc
filter:

* ``alone``: no processor (no ext_proc filter, no settle access log: setup (a));
* ``generated``: as generated (setup (n)): one message per request, the buffered body with the
  path, method and credentials as attributes; Envoy meters the response;
* ``+ headers + response``: request headers sent too, and the response headers and the streamed
  response body (the exchange of the retired default config, whose processor metered the
  response): what the one message per request saves at the floor.

Per variant: 1-connection sequential latency, wrk saturation, and, over a fixed number of requests
at 16 connections, CPU per request of the null processor and of Envoy and the ext_proc messages
per request from Envoy's own counters. Writes <out>/null-floor.md and <out>/null-floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from bench import load, procstat, report
from bench.load import BENCH_KEY, chat_body, http_request
from bench.run import BENCH_POLICY
from bench.stack import BENCH_POOL, raise_pool_breakers, with_null_processor, without_ext_proc
from bench.wrk import ensure_wrk, run_wrk, write_script
from extproc.devstack import commands, envoy_config
from extproc.devstack.envoy_config import Endpoint
from extproc.devstack.ports import free_port
from extproc.devstack.stack import Stack, StackOptions
from extproc.policy import load_policy

HERE = Path(__file__).resolve().parent
ADMISSION_FILTER = "envoy.filters.http.ext_proc"


def _ext_proc_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The admission ext_proc filter (not the response meter, which no bench pool turns on)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["typed_config"] for f in hcm["http_filters"] if f["name"] == ADMISSION_FILTER]


def variants(generated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"alone": without_ext_proc(generated), "generated": copy.deepcopy(generated)}
    metered = copy.deepcopy(generated)
    for f in _ext_proc_filters(metered):
        f["processing_mode"].update({
            "request_header_mode": "SEND", "response_header_mode": "SEND", "response_body_mode": "STREAMED"})
    out["+ headers + response"] = metered
    return out


def ext_proc_counters(admin_port: int) -> dict[str, int]:
    """Envoy's ext_proc counters summed over all ext_proc filters (stat prefixes) of one Envoy."""
    url = f"http://127.0.0.1:{admin_port}/stats?format=json&filter=ext_proc"
    with urllib.request.urlopen(url, timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    out: dict[str, int] = {}
    for s in stats:
        if isinstance(s.get("value"), int):
            key = s["name"].rsplit(".", 1)[-1]
            out[key] = out.get(key, 0) + int(s["value"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.null_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--out", default=str(HERE / "out"), help="output directory (default bench/out)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS", help="as bench.run's")
    args = parser.parse_args(argv)
    if args.wait_quiet > 0:
        from bench.run import wait_quiet

        wait_quiet(args.wait_quiet)
    seq_n, rounds, fixed_n, wrk_s = (500, 1, 3000, 3) if args.quick else (1000, 4, 10000, 10)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wrk, wrk_note = ensure_wrk()
    stack = Stack(StackOptions(use_redis=False, run_dir=out / "null-floor-run"))
    results: dict[str, Any] = {"command": " ".join(["python -m bench.null_floor", *(argv or [])]), "variants": {}}
    try:
        upstream_port, null_port = free_port(), free_port()
        argv_up = commands.fake_model_argv(pool=BENCH_POOL, host="127.0.0.1", port=upstream_port)
        argv_up = [a if a != "extproc.fakes.model_server" else "bench.upstream" for a in argv_up]
        stack._spawn("model", argv_up)
        stack._spawn("null-processor", ["python", "-m", "bench.null_processor", "--listen", f"127.0.0.1:{null_port}"])
        stack._wait_port(null_port, "null-processor")
        stack._wait_http(f"http://127.0.0.1:{upstream_port}/healthz", "model")
        upstream = Endpoint("127.0.0.1", upstream_port)
        rendered = envoy_config.render_local(
            BENCH_POLICY,
            listen_port=free_port(),
            admin_port=free_port(),
            processor=[Endpoint("127.0.0.1", null_port)],
            pools={p.name: [upstream] for p in load_policy(BENCH_POLICY).pools},
            access_log_path=str(stack.run_dir / "access.jsonl"),
        )
        raise_pool_breakers(rendered)
        generated = with_null_processor(rendered, [Endpoint("127.0.0.1", null_port)], upstream=upstream)
        ports: dict[str, tuple[int, int, int]] = {}
        for i, (name, config) in enumerate(variants(generated).items()):
            port, admin = free_port(), free_port()
            config["admin"]["address"] = Endpoint("127.0.0.1", admin).to_address()
            listener = config["static_resources"]["listeners"][0]
            listener["address"] = Endpoint("127.0.0.1", port).to_address()
            for log in listener["filter_chains"][0]["filters"][0]["typed_config"].get("access_log", []):
                if "path" in log.get("typed_config", {}):
                    log["typed_config"]["path"] = str(stack.run_dir / f"access-{i}.jsonl")
            path = envoy_config.write(config, stack.run_dir / f"envoy-{i}.yaml")
            stack._spawn(f"envoy-{i}", [*commands.envoy_argv(config=str(path)), "--use-dynamic-base-id"])
            stack._wait_http(f"http://127.0.0.1:{admin}/ready", f"envoy-{i}")
            ports[name] = (port, admin, i)
        body = chat_body(stream=False, max_tokens=16)
        script = write_script(body, BENCH_KEY, stack.run_dir) if wrk else None
        pids = {"null-processor": stack.proc("null-processor").popen.pid}

        def ours() -> float:
            t = os.times()
            return sum(procstat.cpu_seconds(p.popen.pid) for p in stack.procs) + t.user + t.system

        def other_cpus(busy0: float, ours0: float, t0: float) -> float:
            return (procstat.system_busy_seconds() - busy0 - (ours() - ours0)) / (time.monotonic() - t0)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for name, (port, _admin, _i) in ports.items():
                warm = runner.run(load.closed_loop(port, http_request(port, body), n=300, concurrency=8, target=name))
                if warm.ok < warm.sent:
                    raise RuntimeError(f"{name}: warmup not all 2xx: {warm.statuses}")
            # Latency: the variants interleaved in rounds, so that drift on the machine hits them alike.
            p50s: dict[str, list[float]] = {name: [] for name in ports}
            p99s: dict[str, list[float]] = {name: [] for name in ports}
            busy0, ours0, t0 = procstat.system_busy_seconds(), ours(), time.monotonic()
            for _ in range(rounds):
                for name, (port, _admin, _i) in ports.items():
                    run = runner.run(load.sequential(port, http_request(port, body), seq_n, target=name))
                    p50s[name].append(report.pct(run.latency_ms, 50))
                    p99s[name].append(report.pct(run.latency_ms, 99))
            results["latency_other_cpus"] = round(max(0.0, other_cpus(busy0, ours0, t0)), 2)
            for name, (port, admin, i) in ports.items():
                raw = http_request(port, body)
                envoy_pid = stack.proc(f"envoy-{i}").popen.pid
                busy0, ours0, t0 = procstat.system_busy_seconds(), ours(), time.monotonic()
                c0 = ext_proc_counters(admin) if name != "alone" else {}
                cpu0 = {k: procstat.cpu_seconds(p) for k, p in {**pids, "envoy": envoy_pid}.items()}
                fixed = runner.run(load.closed_loop(port, raw, n=fixed_n, concurrency=16, target=name))
                cpu1 = {k: procstat.cpu_seconds(p) for k, p in {**pids, "envoy": envoy_pid}.items()}
                c1 = ext_proc_counters(admin) if name != "alone" else {}
                other = other_cpus(busy0, ours0, t0)

                def per_request(
                    counter: str, c0: dict[str, int] = c0, c1: dict[str, int] = c1, n: int = fixed.ok
                ) -> float:
                    return (c1.get(counter, 0) - c0.get(counter, 0)) / n

                v: dict[str, Any] = {
                    "seq_p50_ms": statistics.median(p50s[name]),
                    "seq_p50_ms_rounds": p50s[name],
                    "seq_p99_ms": statistics.median(p99s[name]),
                    "seq_p99_ms_rounds": p99s[name],
                    "cpu_ms_per_request": {k: (cpu1[k] - cpu0[k]) * 1000 / fixed.ok for k in cpu0},
                    "streams_per_request": per_request("streams_started"),
                    "msgs_sent_per_request": per_request("stream_msgs_sent"),
                    "msgs_received_per_request": per_request("stream_msgs_received"),
                    "fixed_ok": fixed.ok,
                    # CPUs used by processes outside this benchmark during the CPU run
                    "other_cpus": round(max(0.0, other), 2),
                }
                if wrk and script:
                    res = run_wrk(
                        wrk, f"http://127.0.0.1:{port}/v1/chat/completions", script, target=name, duration_s=wrk_s
                    )
                    v["saturation_rps"], v["saturation_errors"] = res.rps, res.errors
                results["variants"][name] = v
                print(f"[null-floor {time.strftime('%H:%M:%S')}] {name}: {json.dumps(v)}", flush=True)
    finally:
        stack.close()
    results["wrk"] = wrk_note
    base = results["variants"]["alone"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        "| Envoy config (null processor) | ext_proc streams / messages per request (Envoy → processor / back) "
        "| 1 conn p50 ms (rounds: min..max) | added p50 ms | 1 conn p99 ms | saturation req/s "
        "| null processor CPU ms/req | Envoy CPU ms/req | other work on the machine, CPUs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        msgs = (
            f"{v['streams_per_request']:.2f} / {v['msgs_sent_per_request']:.2f} / {v['msgs_received_per_request']:.2f}"
            if name != "alone"
            else "0"
        )
        lines.append(
            f"| {name} | {msgs} | {v['seq_p50_ms']:.3f} ({min(v['seq_p50_ms_rounds']):.3f}.."
            f"{max(v['seq_p50_ms_rounds']):.3f}) | {v['seq_p50_ms'] - base['seq_p50_ms']:+.3f} "
            f"| {v['seq_p99_ms']:.3f} | {v.get('saturation_rps', float('nan')):,.0f} "
            f"| {v['cpu_ms_per_request']['null-processor']:.3f} | {v['cpu_ms_per_request']['envoy']:.3f} "
            f"| {v['other_cpus']:.2f} |"
        )
    lines += [
        "",
        f"Latency: {rounds} round(s) of {seq_n} sequential requests per variant, variants interleaved; median of "
        f"the rounds' p50 and p99. Other work on the machine during them: {results['latency_other_cpus']:.2f} CPUs. "
        f"CPU and messages: {fixed_n:,} requests at 16 connections. Saturation: wrk -t1 -c32 -d{wrk_s}s "
        f"({results['wrk']}).",
    ]
    md = "\n".join(lines) + "\n"
    (out / "null-floor.md").write_text(md)
    (out / "null-floor.json").write_text(json.dumps(results, indent=1))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
