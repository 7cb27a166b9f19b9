"""Tail latency at a fixed rate, repeated: the open-loop phase of bench.run on its own.

    .venv/bin/python -m bench.tail [--rate 1000] [--seconds 10] [--repeat 3] [--targets anb]

Starts the same stack as bench.run (Envoy alone, Envoy + null processor, Envoy + processor) and
fires the same open-loop load at (a), (n) and (b) in turn, `--repeat` times, so that a change on
the hot path can be compared on p99 without a whole bench run. Prints one line per run and the
median of each target's p50/p99 over the repeats. CPU per request of the processor is reported
as in bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

import uvloop

from bench import load, report
from bench.load import chat_body, http_request
from bench.run import BENCH_POLICY, Meter, add_envoy_config_argument, log, processor_extra, raise_nofile
from bench.stack import BenchStack
from extproc.devstack.stack import StackOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    add_envoy_config_argument(parser)
    parser.add_argument("--targets", default="anb", help="which setups, e.g. 'b' (default anb)")
    parser.add_argument("--out", default="/tmp/bench-tail")
    args = parser.parse_args(argv)
    raise_nofile()
    opts = StackOptions(policy=BENCH_POLICY, run_dir=Path(args.out) / "run", processor_extra=processor_extra(1))
    stack = BenchStack(opts)
    body = chat_body(stream=False, max_tokens=16)
    p50: dict[str, list[float]] = {"a": [], "n": [], "b": []}
    p99: dict[str, list[float]] = {"a": [], "n": [], "b": []}
    with stack, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        ports = {t: p for t, p in (("a", stack.alone_port), ("n", stack.null_port), ("b", stack.envoy_port))
                 if t in args.targets}
        meter = Meter(stack)
        for t, port in ports.items():  # warm up
            runner.run(load.closed_loop(port, http_request(port, body), n=300, concurrency=8, target=t))
        for i in range(args.repeat):
            for t, port in ports.items():
                before = meter.snap()
                run = runner.run(load.open_loop(port, http_request(port, body), rate=args.rate,
                                                duration_s=args.seconds, target=t))
                cpu = Meter.per_request(before, meter.snap(), run.ok)
                s = report.run_summary(run)
                p50[t].append(s["p50_ms"])
                p99[t].append(s["p99_ms"])
                log(f"#{i + 1} ({t}) ok {run.ok}/{run.sent} p50 {s['p50_ms']:.3f} p99 {s['p99_ms']:.3f} "
                    f"max {s['max_ms']:.1f} ms, send lag p99 {s['send_lag_p99_ms']:.3f} ms, "
                    "CPU ms/req " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items() if v >= 0.01))
    for t in (t for t in p50 if p50[t]):
        log(f"({t}) median over {args.repeat}: p50 {statistics.median(p50[t]):.3f} ms, "
            f"p99 {statistics.median(p99[t]):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
