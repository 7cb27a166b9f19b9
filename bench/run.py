"""One command, one process tree on loopback: Envoy alone (a) vs Envoy + a do-nothing grpc.aio
processor (n) vs Envoy + processor (b, c streaming).

    python -m bench.run [--quick] [--out bench/out]

Starts redis-server, one fake model server per pool of bench/policy.yaml (bench/upstream.py), the
processor (`tokenmeter serve` with bench/policy.yaml), the null processor
(bench/null_processor.py), Envoy with the one configuration generated from the policy
(extproc.envoy.config, as `tokenmeter envoy-config` renders it), a second Envoy from the same
config without the processor (no ext_proc filter, no settle access log) and a third one with the
same config pointed at the null processor (bench/stack.py), then measures, in order:

1. 1-connection sequential latency (a, n, b);
2. saturation with wrk -t1 -c32 (fake server direct, a, n, b);
3. open-loop latency at fixed rates 200, 500 and 1,000 req/s (a, n, b);
4. streaming (a, c): per-chunk one-way lag, time to first event, processor CPU per stream;
5. 10N requests through (n): null-processor CPU per request and ext_proc messages per request;
6. N then 10N requests through (b): processor CPU per request, Redis round trips, RSS flatness;
7. processor RSS while up to 10,000 streams are held open (HTTP/2 downstream, bench/hold.py).

Writes <out>/results.json, <out>/results.md and <out>/bench.png, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
import uvloop

from bench import load, procstat, report
from bench.hold import HoldStats, hold_streams
from bench.load import BENCH_KEY, Run, chat_body, http_request
from bench.profile import Profiler, summarize
from bench.stack import DIRECT_PREFIX, BenchStack
from bench.wrk import WrkResult, ensure_wrk, run_wrk, write_script
from extproc.devstack.binaries import find_envoy, find_redis_server
from extproc.devstack.ports import free_port
from extproc.devstack.stack import StackOptions

HERE = Path(__file__).resolve().parent
BENCH_POLICY = HERE / "policy.yaml"
# Envoy's configuration is generated from the policy (extproc.envoy.config): there is one. The
# option is kept so that older command lines still parse.
ENVOY_CONFIG = "generated"
ENVOY_CONFIG_NOTE = "generated from bench/policy.yaml (extproc.envoy.config, as `tokenmeter envoy-config`)"
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    quick: bool
    warmup: int = 400
    seq_n: int = 2000
    wrk_s: int = 10
    rates: tuple[int, ...] = (200, 500, 1000)
    open_s: float = 10.0
    stream_rate: float = 50.0
    stream_s: float = 10.0
    stream_tokens: int = 20
    seq_streams: int = 40
    chunk_delay_ms: float = 5.0
    flat_n: int = 3000
    flat_concurrency: int = 16
    hold_points: tuple[int, ...] = (0, 1000, 2500, 5000, 7500, 10000)
    hold_connections: int = 10

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            warmup=200,
            seq_n=500,
            seq_streams=15,
            rates=(200, 1000),
            wrk_s=3,
            open_s=3.0,
            stream_s=3.0,
            flat_n=500,
            hold_points=(0, 500, 1000, 2000),
            hold_connections=4,
        )


def processor_extra(processors: int) -> tuple[str, ...]:
    """The processor runs as deployed: with its Prometheus endpoint (one process: one port)."""
    return ("--metrics-port", str(free_port())) if processors <= 1 else ()


def add_envoy_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--envoy-config generated`: the only one left (envoy/envoy-native.yaml and envoy-observe.yaml
    were retired when the config became generated from the policy)."""
    parser.add_argument("--envoy-config", choices=(ENVOY_CONFIG,), default=ENVOY_CONFIG,
                        help="Envoy config for (a), (n), (b): the one generated from the policy (the only choice)")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- accounting


class Meter:
    """CPU seconds of every process of the stack (and this client), snapshotted around a run."""

    def __init__(self, stack: BenchStack) -> None:
        # all processor processes (--processors N) count as one "processor", the same for the null ones
        self.pids: dict[str, list[int]] = {}
        for p in stack.procs:
            name = next((g for g in ("processor", "null-processor") if p.name.startswith(g)), p.name)
            self.pids.setdefault(name, []).append(p.popen.pid)
        if stack.redis is not None:
            self.pids["redis"] = [stack.redis.proc.pid]
        self.pids["client"] = [os.getpid()]

    def snap(self) -> dict[str, float]:
        out = {"_t": time.monotonic(), "_busy": procstat.system_busy_seconds()}
        for name, pids in self.pids.items():
            try:
                out[name] = sum(procstat.cpu_seconds(pid) for pid in pids) if name != "client" else _self_cpu()
            except OSError:
                out[name] = math.nan
        return out

    @staticmethod
    def per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        return {
            k: round((after[k] - before[k]) * 1000 / n, 4) if n else math.nan for k in before if not k.startswith("_")
        }

    @staticmethod
    def foreign_cores(before: dict[str, float], after: dict[str, float]) -> float:
        """CPUs used by processes outside this benchmark (other work on the machine), on average."""
        ours = sum(after[k] - before[k] for k in before if not k.startswith("_") and not math.isnan(after[k]))
        wall = after["_t"] - before["_t"]
        return max(0.0, (after["_busy"] - before["_busy"] - ours) / wall) if wall > 0 else math.nan


def _self_cpu() -> float:
    """This process and its reaped children (wrk runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class RedisStats:
    """Round trips (total_reads_processed) and commands (INFO commandstats) between two snapshots."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.r.ping()
        self.background_reads_per_s = 0.0

    def snap(self) -> dict[str, Any]:
        info = self.r.info("all")
        cmds = {k[len("cmdstat_") :]: v["calls"] for k, v in info.items() if k.startswith("cmdstat_")}
        return {"t": time.monotonic(), "reads": info["total_reads_processed"], "cmds": cmds}

    def calibrate(self, seconds: float = 2.0) -> None:
        a = self.snap()
        time.sleep(seconds)
        b = self.snap()
        self.background_reads_per_s = max(0.0, (b["reads"] - a["reads"] - 1) / (b["t"] - a["t"]))

    def delta(self, a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, Any]:
        background = self.background_reads_per_s * (b["t"] - a["t"])
        reads = b["reads"] - a["reads"] - 1 - background  # minus the INFO call of the second snapshot
        cmds = {
            k: b["cmds"].get(k, 0) - a["cmds"].get(k, 0)
            for k in b["cmds"]
            if k not in ("info", "ping") and b["cmds"].get(k, 0) - a["cmds"].get(k, 0) > 0
        }
        per = {k: round(v / n, 2) for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])} if n else {}
        scripts = sum(v for k, v in per.items() if k in ("evalsha", "eval", "fcall", "evalsha_ro", "eval_ro"))
        # commandstats also counts the commands a Lua script runs (redis.call), so only the script
        # calls are known to be client commands; total_reads_processed counts the reads (batches).
        return {
            "requests": n,
            "round_trips_per_request": reads / n if n else math.nan,
            "script_calls_per_request": scripts,
            "commands_incl_in_script_per_request": round(sum(per.values()), 2),
            "commands_per_request": per,
            "commands_text": f"EVALSHA/EVAL {scripts:g}; {sum(per.values()):g} commands incl. those run inside scripts",
            "background_reads_per_s": round(self.background_reads_per_s, 2),
        }


# --------------------------------------------------------------------------- phases


class Bench:
    def __init__(self, stack: BenchStack, cfg: Config, out: Path, runner: asyncio.Runner) -> None:
        self.stack, self.cfg, self.out, self.runner = stack, cfg, out, runner
        self.meter = Meter(stack)
        self.redis = RedisStats(stack.redis.url) if stack.redis else None
        self.ports = {"a": stack.alone_port, "n": stack.null_port, "b": stack.envoy_port, "c": stack.envoy_port}
        self.admin = {"n": stack.null_admin_port, "b": stack.admin_port}
        self.body = chat_body(stream=False, max_tokens=16)
        self.stream_body = chat_body(stream=True, max_tokens=cfg.stream_tokens)
        self.runs: dict[str, Run] = {}
        self.results: dict[str, Any] = {"notes": []}
        self.cpu: dict[str, dict[str, float]] = {}
        self.results["cpu"] = self.cpu
        self.foreign: dict[str, float] = {}  # CPUs used by other processes on the machine, per run
        self.results["foreign_cores"] = self.foreign
        self.start_snap = self.meter.snap()

    def processor_rss(self) -> int:
        return sum(procstat.rss_bytes(p.popen.pid) for p in self.stack.procs if p.name.startswith("processor"))

    def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def raw(self, target: str, *, stream: bool = False) -> bytes:
        return http_request(self.ports[target], self.stream_body if stream else self.body)

    def measured(self, name: str, n_of: Callable[[T], int], fn: Callable[[], T]) -> T:
        before, opens = self.meter.snap(), self.circuit_opens()
        result = fn()
        after = self.meter.snap()
        self.cpu[name] = Meter.per_request(before, after, n_of(result))
        self.foreign[name] = round(Meter.foreign_cores(before, after), 2)
        self.note_circuit(name, opens)
        return result

    def circuit_opens(self) -> int:
        """How often the processor logged that its Redis limiter circuit opened (fail-open admission)."""
        n = 0
        for p in self.stack.procs:
            if p.name.startswith("processor"):
                try:
                    n += p.log_path.read_text(errors="replace").lower().count("circuit open")
                except OSError:
                    pass
        return n

    def note_circuit(self, phase: str, before: int) -> None:
        n = self.circuit_opens() - before
        if n > 0:
            self.results["notes"].append(
                f"{phase}: the processor's Redis limiter circuit opened {n} time(s) (Redis deadline exceeded "
                "under overload; admission then fails open without Redis for a moment)"
            )

    def check_alive(self) -> None:
        for p in self.stack.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.log_tail()}")

    def warmup(self) -> None:
        for t in ("a", "n", "b"):
            run = self.arun(load.closed_loop(self.ports[t], self.raw(t), n=self.cfg.warmup, concurrency=8, target=t))
            log(f"warmup ({t}): {run.ok}/{run.sent} ok, statuses {run.statuses}")
            if run.ok < run.sent * 0.9:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in self.stack.procs)
                raise RuntimeError(f"target ({t}) is not answering 2xx: {run.statuses}\n{tails}")
        s = self.arun(load.closed_loop(self.ports["c"], self.raw("c", stream=True), n=20, concurrency=4, target="c"))
        if s.ok < s.sent or not s.chunk_lag_ms:
            raise RuntimeError(f"streaming through (c) failed: {s.statuses}, stamped chunks {len(s.chunk_lag_ms)}")

    def sequential(self) -> None:
        """One connection, one request at a time; Redis round trips per request (no batching across
        requests at concurrency 1), then the same for sequential streams through (c)."""
        out = {}
        for t in ("a", "n", "b"):
            before = self.redis.snap() if self.redis and t == "b" else None
            run = self.arun(load.sequential(self.ports[t], self.raw(t), self.cfg.seq_n, target=t))
            if before is not None and self.redis:
                time.sleep(0.3)
                self.results.setdefault("redis", {})["b"] = self.redis.delta(before, self.redis.snap(), run.ok)
            self.runs[f"seq_{t}"] = run
            out[t] = report.run_summary(run)
            log(f"sequential ({t}): p50 {out[t]['p50_ms']:.3f} ms p99 {out[t]['p99_ms']:.3f} ms")
        self.results["seq"] = out
        if self.redis:
            before = self.redis.snap()
            run = self.arun(
                load.sequential(self.ports["c"], self.raw("c", stream=True), self.cfg.seq_streams, target="c")
            )
            time.sleep(0.3)
            self.results["redis"]["c"] = self.redis.delta(before, self.redis.snap(), run.ok)
        rt = self.results.get("redis", {})
        log(
            "redis round trips: "
            + "; ".join(f"({k}) {v['round_trips_per_request']:.2f}/req, {v['commands_text']}" for k, v in rt.items())
        )

    def saturation(self, wrk: str | None) -> None:
        path = "/v1/chat/completions"
        targets = {
            "direct": (self.stack.pool_ports["h100"], path),  # the fake server without Envoy
            "a direct_response": (self.ports["a"], DIRECT_PREFIX.rstrip("/") + path),  # no upstream
            "a": (self.ports["a"], path),
            "n": (self.ports["n"], path),
            "b": (self.ports["b"], path),
        }
        out: dict[str, Any] = {}
        script = write_script(self.body, BENCH_KEY, self.stack.run_dir) if wrk else None
        for name, (port, path) in targets.items():
            url = f"http://127.0.0.1:{port}{path}"
            key = name.replace(" ", "_")
            if wrk and script:
                res: WrkResult = self.measured(
                    f"saturation_{key}",
                    lambda r: r.requests,
                    lambda url=url, name=name: run_wrk(  # type: ignore[misc]
                        wrk, url, script, target=name, duration_s=self.cfg.wrk_s
                    ),
                )
                out[name] = {
                    "rps": res.rps,
                    "requests": res.requests,
                    "errors": res.errors,
                    "p50_ms": res.p50_ms,
                    "p99_ms": res.p99_ms,
                    "command": res.command,
                }
            else:
                n = int(self.cfg.wrk_s * 1500)
                run = self.measured(
                    f"saturation_{key}",
                    lambda r: r.ok,
                    lambda port=port, n=n, key=key: self.arun(  # type: ignore[misc]
                        load.closed_loop(port, http_request(port, self.body), n=n, concurrency=32, target=key)
                    ),
                )
                s = report.run_summary(run)
                out[name] = {
                    "rps": run.rate,
                    "requests": run.sent,
                    "errors": run.errors,
                    "p50_ms": s["p50_ms"],
                    "p99_ms": s["p99_ms"],
                    "command": "python closed loop c=32",
                }
            log(f"saturation ({name}): {out[name]['rps']:,.0f} req/s, errors {out[name]['errors']}")
            self.check_alive()
        self.results["saturation"] = out

    def open_loop(self) -> None:
        out: dict[str, dict[str, Any]] = {}
        for rate in self.cfg.rates:
            out[str(rate)] = {}
            for t in ("a", "n", "b"):
                run = self.measured(
                    f"open{rate}_{t}",
                    lambda r: r.ok,
                    lambda t=t, rate=rate: self.arun(  # type: ignore[misc]
                        load.open_loop(self.ports[t], self.raw(t), rate=rate, duration_s=self.cfg.open_s, target=t)
                    ),
                )
                self.runs[f"open{rate}_{t}"] = run
                if run.errors:
                    self.results["notes"].append(
                        f"open loop {rate}/s ({t}): {run.errors} of {run.sent} not 2xx, statuses {run.statuses} "
                        "(504 = Envoy's ext_proc message_timeout 0.5 s; they are in the latency percentiles)"
                    )
                s = out[str(rate)][t] = report.run_summary(run)
                log(
                    f"open {rate}/s ({t}): ok {run.ok}/{run.sent}, p50 {s['p50_ms']:.3f} p99 {s['p99_ms']:.3f} ms,"
                    f" send lag p99 {s['send_lag_p99_ms']:.3f} ms"
                )
                self.check_alive()
        self.results["open"] = out

    def streaming(self) -> None:
        out: dict[str, Any] = {}
        for t in ("a", "c"):
            run = self.measured(
                f"stream_{t}",
                lambda r: r.ok,
                lambda t=t: self.arun(  # type: ignore[misc]
                    load.open_loop(
                        self.ports[t],
                        self.raw(t, stream=True),
                        rate=self.cfg.stream_rate,
                        duration_s=self.cfg.stream_s,
                        target=t,
                        max_conns=64,
                    )
                ),
            )
            self.runs[f"stream_{t}"] = run
            s = out[t] = report.run_summary(run)
            log(
                f"stream ({t}): ok {run.ok}/{run.sent}, chunks {s.get('chunks')}, per-chunk lag p50 "
                f"{s.get('chunk_lag_p50_ms', math.nan):.3f} p99 {s.get('chunk_lag_p99_ms', math.nan):.3f} ms"
            )
            self.check_alive()
        self.results["stream"] = out

    def ext_proc_stats(self, t: str) -> dict[str, int]:
        """Envoy's ext_proc filter counters (streams_started, stream_msgs_sent, ...) of target t."""
        url = f"http://127.0.0.1:{self.admin[t]}/stats?format=json&filter=ext_proc"
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.loads(r.read())["stats"]
        return {s["name"].rsplit(".", 1)[-1]: int(s["value"]) for s in stats if isinstance(s.get("value"), int)}

    def messages_per_request(self, t: str, before: dict[str, int], n: int) -> dict[str, float]:
        after = self.ext_proc_stats(t)
        return {k: round((after[k] - before.get(k, 0)) / n, 3) for k in after if n and after[k] - before.get(k, 0)}

    def null_fixed_count(self) -> None:
        """10N requests through (n), as many and at the same concurrency as (b)'s fixed count: the
        null processor's CPU per request and the ext_proc messages Envoy exchanges per request."""
        n = 10 * self.cfg.flat_n
        stats = self.ext_proc_stats("n")
        run = self.measured(
            "fixed_n",
            lambda r: r.ok,
            lambda: self.arun(
                load.closed_loop(
                    self.ports["n"], self.raw("n"), n=n, concurrency=self.cfg.flat_concurrency, target="n"
                )
            ),
        )
        self.results.setdefault("ext_proc_messages", {})["n"] = self.messages_per_request("n", stats, run.ok)
        log(
            f"null fixed count: {run.ok} ok of {n}; null processor CPU "
            f"{self.cpu['fixed_n']['null-processor']:.3f} ms/req; ext_proc per request "
            f"{self.results['ext_proc_messages']['n']}"
        )
        self.check_alive()

    def fixed_count(self) -> None:
        """N requests (CPU, Redis), then up to 10N in N-steps with RSS after each (flatness)."""
        n = self.cfg.flat_n
        raw, port = self.raw("b"), self.ports["b"]
        samples: list[tuple[int, int]] = [(0, self.processor_rss())]
        rbefore = self.redis.snap() if self.redis else None
        cpu_before = self.meter.snap()
        stats = self.ext_proc_stats("b")
        ok = 0
        opens = self.circuit_opens()
        for step in range(1, 11):
            run = self.arun(load.closed_loop(port, raw, n=n, concurrency=self.cfg.flat_concurrency, target="b"))
            ok += run.ok
            if step == 1:
                self.cpu["fixed_first_n"] = Meter.per_request(cpu_before, self.meter.snap(), run.ok)
                if rbefore is not None and self.redis:
                    time.sleep(0.3)
                    under_load = self.redis.delta(rbefore, self.redis.snap(), run.ok)
                    self.results.setdefault("redis", {})["b_under_load"] = under_load
            samples.append((step * n, self.processor_rss()))
        cpu_after = self.meter.snap()
        self.results.setdefault("ext_proc_messages", {})["b"] = self.messages_per_request("b", stats, ok)
        self.cpu["fixed"] = Meter.per_request(cpu_before, cpu_after, ok)
        self.foreign["fixed"] = round(Meter.foreign_cores(cpu_before, cpu_after), 2)
        self.note_circuit("fixed count", opens)
        stream = self.results.get("stream", {}).get("c", {})
        if stream.get("chunks") and stream.get("ok") and "stream_c" in self.cpu:
            # a stream costs one admission (as a request) plus its extra body chunks
            extra = stream["chunks"] / stream["ok"]  # stamped events after the first, per stream
            per_chunk = (self.cpu["stream_c"]["processor"] - self.cpu["fixed"]["processor"]) / extra
            self.results["processor_cpu_per_extra_chunk_ms"] = per_chunk
        rss_n, rss_10n = samples[1][1], samples[-1][1]
        per_req = (rss_10n - rss_n) / (9 * n)
        fit = report.slope([(float(x), float(y)) for x, y in samples[1:]])
        self.results["memory_flat"] = {
            "n": n,
            "ok": ok,
            "samples": samples,
            "rss_n": rss_n,
            "rss_10n": rss_10n,
            "growth_bytes": rss_10n - rss_n,
            "growth_per_request_bytes": per_req,
            "slope_bytes_per_request": fit,
            "flat": per_req <= 100,
        }
        log(
            f"fixed count: {ok} ok of {10 * n}; processor CPU {self.cpu['fixed']['processor']:.3f} ms/req; "
            f"RSS {rss_n / 2**20:.1f} -> {rss_10n / 2**20:.1f} MiB"
        )
        self.check_alive()

    def profile(self) -> None:
        """py-spy on the processor during a closed-loop run through (b) (separate from the CPU figures)."""
        prof = Profiler(self.stack.proc("processor").popen.pid, self.out / "processor-pyspy.txt")
        if not prof.start():
            self.results["notes"].append(f"--profile: {prof.error}")
            log(f"profile skipped: {prof.error}")
            return
        time.sleep(1.0)
        n = self.cfg.flat_n * 3
        self.arun(
            load.closed_loop(self.ports["b"], self.raw("b"), n=n, concurrency=self.cfg.flat_concurrency, target="b")
        )
        prof.stop()
        if prof.error:
            self.results["notes"].append(f"--profile: {prof.error}")
            return
        md = summarize(prof.raw)
        (self.out / "processor-profile.md").write_text(md)
        self.results["notes"].append(f"processor profile (py-spy, {n} requests): {self.out / 'processor-profile.md'}")
        log(f"profile written to {self.out / 'processor-profile.md'}")

    def hold(self) -> None:
        cfg = self.cfg
        log("restarting fake model servers with a 600 s chunk delay to hold streams open")
        self.stack.restart_upstreams(chunk_delay_ms=600_000)
        # a few requests to let Envoy drop pooled connections to the old upstream processes
        self.arun(load.closed_loop(self.ports["b"], self.raw("b"), n=50, concurrency=4, target="b"))
        epid = self.stack.proc("envoy").popen.pid
        upid = self.stack.proc("model-h100").popen.pid
        points: list[dict[str, Any]] = []
        body = chat_body(stream=True, max_tokens=1)
        opens = self.circuit_opens()

        async def checkpoint(target: int, st: HoldStats) -> None:
            await asyncio.sleep(1.0)
            p = {
                "target": target,
                "open": st.open,
                "sent": st.sent,
                "refused": st.refused,
                "reset": st.reset,
                "ended": st.ended,
                "rss_processor": self.processor_rss(),
                "rss_envoy": procstat.rss_bytes(epid),
                "rss_upstream": procstat.rss_bytes(upid),
            }
            points.append(p)
            log(
                f"hold: {st.open} open ({st.refused} refused, {st.reset} reset, {st.ended} ended); processor "
                f"RSS {p['rss_processor'] / 2**20:.1f} MiB, Envoy {p['rss_envoy'] / 2**20:.1f} MiB"
            )

        stats = self.arun(
            hold_streams(
                self.ports["c"],
                body,
                BENCH_KEY,
                checkpoints=cfg.hold_points,
                on_checkpoint=checkpoint,
                connections=cfg.hold_connections,
            )
        )
        time.sleep(3.0)
        after_close = self.processor_rss()
        # Round 2: the same number of streams again. A peak near round 1's means the memory kept after
        # closing is reused (allocator retention), a higher one that something is kept per stream.
        peak = max(p["open"] for p in points)
        again: list[dict[str, Any]] = []

        async def checkpoint2(target: int, st: HoldStats) -> None:
            await asyncio.sleep(1.0)
            again.append({"open": st.open, "rss_processor": self.processor_rss()})

        self.arun(
            hold_streams(
                self.ports["c"],
                body,
                BENCH_KEY,
                checkpoints=[peak],
                on_checkpoint=checkpoint2,
                connections=cfg.hold_connections,
            )
        )
        time.sleep(3.0)
        after_close2 = self.processor_rss()
        self.note_circuit("open streams", opens)
        fit = report.slope([(float(p["open"]), float(p["rss_processor"])) for p in points])
        efit = report.slope([(float(p["open"]), float(p["rss_envoy"])) for p in points])
        self.results["hold"] = {
            "points": points,
            "max_open": max(p["open"] for p in points),
            "rss_idle": points[0]["rss_processor"],
            "rss_max": max(p["rss_processor"] for p in points),
            "rss_after_close": after_close,
            "round2_open": again[0]["open"] if again else 0,
            "round2_rss_max": again[0]["rss_processor"] if again else 0,
            "round2_rss_after_close": after_close2,
            "per_stream_bytes": fit,
            "envoy_per_stream_bytes": efit,
            "sent": stats.sent,
            "refused": stats.refused,
            "reset": stats.reset,
            "ended": stats.ended,
        }
        log(
            f"hold: processor {fit / 1024:.1f} KiB/stream, Envoy {efit / 1024:.1f} KiB/stream; RSS 3 s after "
            f"closing: {after_close / 2**20:.1f} MiB; round 2 at {peak} streams: "
            f"{(again[0]['rss_processor'] if again else 0) / 2**20:.1f} MiB, after closing "
            f"{after_close2 / 2**20:.1f} MiB"
        )
        self.check_alive()


# --------------------------------------------------------------------------- main


def wait_quiet(max_s: float, threshold: float = 0.15, window_s: float = 3.0) -> None:
    deadline = time.monotonic() + max_s
    while True:
        a = procstat.system_busy_seconds()
        time.sleep(window_s)
        busy = (procstat.system_busy_seconds() - a) / window_s
        if busy < threshold:
            log(f"machine quiet ({busy:.2f} CPUs busy)")
            return
        if time.monotonic() > deadline:
            log(f"machine still busy ({busy:.2f} CPUs) after {max_s:.0f} s: running anyway")
            return
        log(f"waiting for a quiet machine: {busy:.2f} CPUs busy")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout
    except OSError:
        return "?"
    for line in out.splitlines():
        if "version" in line.lower() or line.startswith("Redis"):
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else "?"


def _envoy_version() -> str:
    line = _version([find_envoy(), "--version"])
    m = re.search(r"version: \S+?/(\d[\w.]*)/(\S+)", line)
    return f"Envoy {m.group(1)} ({m.group(2)})" if m else line


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 100 s in all)")
    parser.add_argument("--out", default=str(HERE / "out"), help="output directory (default bench/out)")
    parser.add_argument("--profile", action="store_true", help="also sample the processor with py-spy")
    parser.add_argument("--processors", type=int, default=1, help="processor processes behind Envoy (default 1)")
    parser.add_argument("--uds", action="store_true", help="Envoy reaches the processor over a Unix socket")
    add_envoy_config_argument(parser)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be idle (< 0.15 CPUs busy over 3 s)",
    )
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    started = time.monotonic()
    nofile = raise_nofile()
    wrk, wrk_note = ensure_wrk()
    log(f"{wrk_note}; open-file limit {nofile}")
    hold_points = cfg.hold_points
    if nofile < max(hold_points) + 1000:  # Envoy and the fake server: one socket per open stream each
        cap = max(100, nofile - 1000)
        cfg = Config(**{**cfg.__dict__, "hold_points": tuple(p for p in hold_points if p <= cap)})
    meta = {
        "command": shlex.join(["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "quick": cfg.quick,
        "processors": max(1, args.processors),
        "processor_transport": "unix socket" if args.uds else "TCP loopback",
        "envoy_config": ENVOY_CONFIG_NOTE,
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "envoy_version": _envoy_version(),
        "redis_version": " ".join(_version([find_redis_server(), "--version"]).split()[:3]),
        "python": platform.python_version(),
        "wrk": wrk_note,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    run_dir = out / "run"
    opts = StackOptions(
        policy=BENCH_POLICY,
        run_dir=run_dir,
        processors=max(1, args.processors),
        processor_uds=args.uds,
        processor_extra=processor_extra(args.processors),
    )
    stack = BenchStack(opts, chunk_delay_ms=cfg.chunk_delay_ms)
    with stack, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        log(
            f"stack up in {run_dir}: envoy :{stack.envoy_port}, envoy-alone :{stack.alone_port}, "
            f"envoy-null :{stack.null_port}"
        )
        bench = Bench(stack, cfg, out, runner)
        if bench.redis:
            bench.redis.calibrate(1.0 if cfg.quick else 2.0)
        bench.warmup()
        bench.sequential()
        bench.saturation(wrk)
        bench.open_loop()
        bench.streaming()
        bench.null_fixed_count()
        bench.fixed_count()
        if args.profile:
            bench.profile()
        if cfg.hold_points != hold_points:
            bench.results["notes"].append(
                f"open-file limit {nofile}: open-stream checkpoints capped at {max(cfg.hold_points)}"
            )
        bench.hold()
        results = bench.results
        whole = Meter.foreign_cores(bench.start_snap, bench.meter.snap())
        meta["foreign_cores"] = round(whole, 2)
        busy = {k: v for k, v in bench.foreign.items() if v >= 0.2}
        if busy:
            results["notes"].insert(
                0,
                "OTHER WORK ON THE MACHINE during: "
                + ", ".join(f"{k} ({v:.2f} CPUs)" for k, v in busy.items())
                + " - numbers of these runs are disturbed; rerun on a quiet machine",
            )
    meta["elapsed_s"] = time.monotonic() - started
    results["meta"] = meta
    results["notes"] += [
        "latency from the scheduled send time (open loop); scheduler lateness is in send_lag_* in results.json",
        "per-chunk lag = client receive time - fake server's send stamp (CLOCK_MONOTONIC), token events only",
        "all processes (client, 3 Envoys, processor, null processor, Redis, fake servers) share the same CPUs",
    ]
    png = report.plot(results, bench.runs, out / "bench.png")
    md = report.markdown(results, png.relative_to(Path.cwd()) if png.is_relative_to(Path.cwd()) else png)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
