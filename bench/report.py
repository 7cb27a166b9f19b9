"""Summaries, the comparison table with pass/fail per target, and the PNG plot (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import Run


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on sorted data; NaN when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return math.nan
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else math.nan


def run_summary(run: Run) -> dict[str, Any]:
    d: dict[str, Any] = {
        "target": run.target,
        "mode": run.mode,
        "sent": run.sent,
        "ok": run.ok,
        "errors": run.errors,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "rate": round(run.rate, 1),
        "p50_ms": pct(run.latency_ms, 50),
        "p90_ms": pct(run.latency_ms, 90),
        "p99_ms": pct(run.latency_ms, 99),
        "max_ms": max(run.latency_ms, default=math.nan),
    }
    if run.send_lag_ms:
        d["send_lag_p50_ms"] = pct(run.send_lag_ms, 50)
        d["send_lag_p99_ms"] = pct(run.send_lag_ms, 99)
        d["service_p50_ms"] = pct(run.service_ms, 50)
        d["service_p99_ms"] = pct(run.service_ms, 99)
    if run.chunk_lag_ms:
        d["chunks"] = len(run.chunk_lag_ms)
        d["chunk_lag_p50_ms"] = pct(run.chunk_lag_ms, 50)
        d["chunk_lag_p99_ms"] = pct(run.chunk_lag_ms, 99)
        d["first_event_lag_p50_ms"] = pct(run.first_event_lag_ms, 50)
        d["ttfb_p50_ms"] = pct(run.ttfb_ms, 50)
        d["ttfb_p99_ms"] = pct(run.ttfb_ms, 99)
    return d


# --------------------------------------------------------------------------- table


@dataclass
class Row:
    metric: str
    a: str
    b: str
    c: str
    added: str
    target: str
    verdict: str
    n: str = ""  # (n) Envoy + the null processor (bench/null_processor.py)
    floor: str = ""  # (n) - (a): what any grpc.aio processor adds
    over: str = ""  # (b) - (n): what our processor adds over that floor


def _f(x: Any, nd: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) else f"{x}{unit}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**pass**" if ok else "**MISS**")


def _g(d: dict[str, Any], *path: str) -> Any:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _sub(x: Any, y: Any) -> float | None:
    if x is None or y is None or math.isnan(x) or math.isnan(y):
        return None
    return float(x - y)


def targets(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    sat_a, sat_b = _g(r, "saturation", "a", "rps"), _g(r, "saturation", "b", "rps")
    sat_n = _g(r, "saturation", "n", "rps")
    ratio = sat_b / sat_a if sat_a and sat_b is not None else None
    rows.append(
        Row(
            "saturation req/s (wrk -t1 -c32)",
            _f(sat_a, 0),
            _f(sat_b, 0),
            "",
            f"(b)/(a) = {_f(ratio, 2)}",
            "(b) ≥ 1/4 of (a)",
            _verdict(None if ratio is None else ratio >= 0.25),
            n=_f(sat_n, 0),
            floor=f"(n)/(a) = {_f(sat_n / sat_a, 2)}" if sat_a and sat_n is not None else "",
            over=f"(b)/(n) = {_f(sat_b / sat_n, 2)}" if sat_n and sat_b is not None else "",
        )
    )
    for label, key in (("p50", "p50_ms"), ("p99", "p99_ms")):
        a, b, n = _g(r, "seq", "a", key), _g(r, "seq", "b", key), _g(r, "seq", "n", key)
        add = _sub(b, a)
        is_target = key == "p50_ms"
        rows.append(
            Row(
                f"1 connection, sequential: {label} ms",
                _f(a, 3),
                _f(b, 3),
                "",
                _f(add, 3),
                "added p50 ≤ 0.5 ms (low load)" if is_target else "",
                _verdict(None if add is None or not is_target else add <= 0.5),
                n=_f(n, 3),
                floor=_f(_sub(n, a), 3),
                over=_f(_sub(b, n), 3),
            )
        )
    for rate in r.get("open", {}):
        for label, key in (("p50", "p50_ms"), ("p99", "p99_ms")):
            a, b = _g(r, "open", rate, "a", key), _g(r, "open", rate, "b", key)
            n = _g(r, "open", rate, "n", key)
            add = _sub(b, a)
            is_target = rate == "1000" and key == "p99_ms"
            rows.append(
                Row(
                    f"open loop {rate} req/s: {label} ms",
                    _f(a, 3),
                    _f(b, 3),
                    "",
                    _f(add, 3),
                    "added p99 ≤ 2 ms at 1,000 req/s" if is_target else "",
                    _verdict(None if add is None or not is_target else add <= 2.0),
                    n=_f(n, 3),
                    floor=_f(_sub(n, a), 3),
                    over=_f(_sub(b, n), 3),
                )
            )
        a, b, n = _g(r, "open", rate, "a"), _g(r, "open", rate, "b"), _g(r, "open", rate, "n")
        if a and b and "send_lag_p50_ms" in a:
            rows.append(
                Row(
                    f"open loop {rate} req/s: client scheduler lateness p50 / p99 ms (included above)",
                    f"{_f(a['send_lag_p50_ms'], 3)} / {_f(a['send_lag_p99_ms'], 3)}",
                    f"{_f(b['send_lag_p50_ms'], 3)} / {_f(b['send_lag_p99_ms'], 3)}",
                    "",
                    "",
                    "",
                    "-",
                    n=f"{_f(n['send_lag_p50_ms'], 3)} / {_f(n['send_lag_p99_ms'], 3)}"
                    if n and "send_lag_p50_ms" in n
                    else "",
                )
            )
    sa, sc = _g(r, "stream", "a"), _g(r, "stream", "c")
    if sa and sc:
        add = _sub(sc.get("chunk_lag_p50_ms"), sa.get("chunk_lag_p50_ms"))
        rows.append(
            Row(
                "stream: per-chunk lag p50 ms (server write → client read)",
                _f(sa.get("chunk_lag_p50_ms"), 3),
                "",
                _f(sc.get("chunk_lag_p50_ms"), 3),
                _f(add, 3),
                "added ≤ 0.2 ms per chunk (p50)",
                _verdict(None if add is None else add <= 0.2),
            )
        )
        rows.append(
            Row(
                "stream: per-chunk lag p99 ms",
                _f(sa.get("chunk_lag_p99_ms"), 3),
                "",
                _f(sc.get("chunk_lag_p99_ms"), 3),
                _f(_sub(sc.get("chunk_lag_p99_ms"), sa.get("chunk_lag_p99_ms")), 3),
                "",
                "-",
            )
        )
        rows.append(
            Row(
                "stream: time to first event p50 ms",
                _f(sa.get("ttfb_p50_ms"), 3),
                "",
                _f(sc.get("ttfb_p50_ms"), 3),
                _f(_sub(sc.get("ttfb_p50_ms"), sa.get("ttfb_p50_ms")), 3),
                "",
                "-",
            )
        )
    for run, label in (
        ("b", "Redis round trips per request (1 connection)"),
        ("c", "Redis round trips per stream (1 connection)"),
        ("b_under_load", "Redis reads per request at 16 connections (batched)"),
    ):
        rt = _g(r, "redis", run)
        if rt:
            v = _f(rt["round_trips_per_request"], 2)
            rows.append(
                Row(
                    label,
                    "0",
                    v if run != "c" else "",
                    v if run == "c" else "",
                    rt["commands_text"],
                    "",
                    "-",
                )
            )
    msgs = r.get("ext_proc_messages", {})
    if msgs:

        def per_req(t: str) -> str:
            m = msgs.get(t) or {}
            if "streams_started" not in m:
                return ""
            return f"{_f(m.get('stream_msgs_sent', 0.0), 2)} / {_f(m.get('stream_msgs_received', 0.0), 2)}"

        rows.append(
            Row(
                "ext_proc gRPC messages per request, Envoy → processor / back (Envoy stats)",
                "0",
                per_req("b"),
                "",
                "",
                "",
                "-",
                n=per_req("n"),
            )
        )
    cpu = r.get("cpu", {})
    if cpu:
        cpu_n, cpu_b = _g(cpu, "fixed_n", "null-processor"), _g(cpu, "fixed", "processor")
        rows.append(
            Row(
                "processor CPU per request, ms (closed loop, 16 connections, 10N requests)",
                "",
                _f(cpu_b, 3),
                _f(_g(cpu, "stream_c", "processor"), 3) + " per stream",
                "",
                "",
                "-",
                n=_f(cpu_n, 3),
                over=_f(_sub(cpu_b, cpu_n), 3),
            )
        )
        rates = [k for k in r.get("open", {}) if f"open{k}_n" in cpu and f"open{k}_b" in cpu]
        if rates:
            at_n = [_g(cpu, f"open{k}_n", "null-processor") for k in rates]
            at_b = [_g(cpu, f"open{k}_b", "processor") for k in rates]
            rows.append(
                Row(
                    f"processor CPU per request at the same rates, open loop {' / '.join(rates)} req/s, ms",
                    "",
                    " / ".join(_f(x, 3) for x in at_b),
                    "",
                    "",
                    "",
                    "-",
                    n=" / ".join(_f(x, 3) for x in at_n),
                    over=" / ".join(_f(_sub(b, n), 3) for n, b in zip(at_n, at_b, strict=True)),
                )
            )
        per_chunk = r.get("processor_cpu_per_extra_chunk_ms")
        if per_chunk is not None:
            rows.append(
                Row("processor CPU per extra streamed chunk, ms (approx.)", "", "", _f(per_chunk, 3), "", "", "-")
            )
        env_a, env_n = _g(cpu, "open1000_a", "envoy-alone"), _g(cpu, "open1000_n", "envoy-null")
        env_b = _g(cpu, "open1000_b", "envoy")
        rows.append(
            Row(
                "Envoy CPU per request, ms (open loop 1000 req/s)",
                _f(env_a, 3),
                _f(env_b, 3),
                _f(_g(cpu, "stream_c", "envoy"), 3) + " per stream",
                _f(_sub(env_b, env_a), 3),
                "",
                "-",
                n=_f(env_n, 3),
                floor=_f(_sub(env_n, env_a), 3),
                over=_f(_sub(env_b, env_n), 3),
            )
        )
        fenv_n, fenv_b = _g(cpu, "fixed_n", "envoy-null"), _g(cpu, "fixed", "envoy")
        if fenv_n is not None and fenv_b is not None:
            rows.append(
                Row(
                    "Envoy CPU per request, ms (16 connections, same runs as the processor CPU row)",
                    "",
                    _f(fenv_b, 3),
                    "",
                    "",
                    "",
                    "-",
                    n=_f(fenv_n, 3),
                    over=_f(_sub(fenv_b, fenv_n), 3),
                )
            )
    mf = r.get("memory_flat")
    if mf:
        rows.append(
            Row(
                f"processor RSS after N={mf['n']:,} → 10N requests, MiB",
                "",
                f"{mf['rss_n'] / 2**20:.1f} → {mf['rss_10n'] / 2**20:.1f}",
                "",
                f"{mf['growth_bytes'] / 2**10:+,.0f} KiB; slope {mf['slope_bytes_per_request']:.0f} B/req",
                "flat: growth N→10N ≤ 100 B/request",
                _verdict(mf["flat"]),
            )
        )
    h = r.get("hold")
    if h:
        rows.append(
            Row(
                f"processor RSS under {h['max_open']:,} open streams, MiB",
                "",
                "",
                f"{h['rss_idle'] / 2**20:.1f} → {h['rss_max'] / 2**20:.1f}",
                f"{h['per_stream_bytes'] / 1024:.1f} KiB per open stream (slope); Envoy "
                f"{h['envoy_per_stream_bytes'] / 1024:.1f} KiB; {h['refused']} refused, {h['reset']} reset",
                "≤ a few KB per open stream (≤ 4 KiB)",
                _verdict(h["per_stream_bytes"] <= 4096),
            )
        )
        if "round2_rss_max" in h:
            rows.append(
                Row(
                    "processor RSS after closing them / same again / closed again, MiB",
                    "",
                    "",
                    f"{h['rss_after_close'] / 2**20:.1f} / {h['round2_rss_max'] / 2**20:.1f} / "
                    f"{h['round2_rss_after_close'] / 2**20:.1f}",
                    f"round-2 peak {(h['round2_rss_max'] - h['rss_max']) / 2**20:+.1f} MiB vs round 1",
                    "",
                    "-",
                )
            )
    return rows


def table(r: dict[str, Any]) -> str:
    head = (
        "| metric | (a) Envoy alone | (n) + null processor | (b) + processor | (c) + processor, streaming "
        "| added: (b) - (a), (c) - (a) | grpc.aio floor: (n) - (a) | added over the grpc.aio floor: (b) - (n) "
        "| target | met |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {x.metric} | {x.a} | {x.n} | {x.b} | {x.c} | {x.added} | {x.floor} | {x.over} | {x.target} "
        f"| {x.verdict} |\n"
        for x in targets(r)
    )
    return head + body


def markdown(r: dict[str, Any], png: Path | None) -> str:
    m = r["meta"]
    lines = [
        f"Command: `{m['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['envoy_version']}, {m['redis_version']}, "
        f"Python {m['python']}; wrk: {m['wrk']}  ",
        f"Other processes on the machine used {m.get('foreign_cores', math.nan):.2f} CPUs on average during the run  ",
        f"Mode: {'quick' if m['quick'] else 'full'}; run took {m['elapsed_s']:.0f} s; {m['date']}  ",
        f"Processor: {m.get('processors', 1)} process(es), "
        f"Envoy reaches it over {m.get('processor_transport', 'TCP')}; "
        f"Envoy config {m.get('envoy_config', 'envoy/envoy.yaml')}",
        "",
        table(r),
    ]
    sat = r.get("saturation", {})
    if sat:
        lines.append(
            "Saturation detail (wrk): "
            + "; ".join(
                f"{k}: {v['rps']:,.0f} req/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, errors {v['errors']}"
                for k, v in sat.items()
            )
        )
        lines.append("")
    if png is not None:
        lines.append(f"Plot: `{png}`")
    notes = r.get("notes", [])
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def plot(r: dict[str, Any], runs: dict[str, Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    ax = axes[0][0]
    groups = [("seq", "1 conn")] + [(f"open{k}", f"{k}/s") for k in r.get("open", {})]
    labels: list[str] = []
    bars: dict[str, list[float]] = {f"({t}) {q}": [] for t in "anb" for q in ("p50", "p99")}
    for key, label in groups:
        got = {t: runs.get(f"{key}_{t}") for t in "anb"}
        if got["a"] is None or got["b"] is None:
            continue
        labels.append(label)
        for t, run in got.items():
            for q in (50, 99):
                bars[f"({t}) p{q}"].append(pct(run.latency_ms, q) if run else math.nan)
    xs = range(len(labels))
    w = 0.13
    colors = {"(a)": "C0", "(n)": "C1", "(b)": "C2"}
    for i, (name, ys) in enumerate(bars.items()):
        ax.bar(
            [x + (i - 2.5) * w for x in xs],
            ys,
            w,
            label=name,
            color=colors[name[:3]],
            alpha=1.0 if name.endswith("p50") else 0.55,
        )
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.set_title("Latency: Envoy alone (a), + null processor (n), + processor (b)")
    ax.legend(fontsize=7, ncol=3)

    ax = axes[0][1]
    sat = r.get("saturation", {})
    names = list(sat)
    colors = {"direct": "#999", "a direct_response": "#bbb", "a": "C0", "n": "C1", "b": "C2"}
    ax.bar(names, [sat[n]["rps"] for n in names], color=[colors.get(n, "C1") for n in names])
    for i, n in enumerate(names):
        ax.text(i, sat[n]["rps"], f"{sat[n]['rps']:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("requests/s")
    ax.set_title("Saturation (wrk -t1 -c32, non-streaming)")

    ax = axes[0][2]
    for key, label, style in (
        ("open1000_a", "(a) 1000/s", ("C0", "-")),
        ("open1000_n", "(n) 1000/s", ("C1", "-")),
        ("open1000_b", "(b) 1000/s", ("C2", "-")),
        ("open200_a", "(a) 200/s", ("C0", "--")),
        ("open200_n", "(n) 200/s", ("C1", "--")),
        ("open200_b", "(b) 200/s", ("C2", "--")),
    ):
        run = runs.get(key)
        if run and run.latency_ms:
            s = sorted(run.latency_ms)
            ax.plot(s, [i / len(s) for i in range(len(s))], label=label, color=style[0], linestyle=style[1])
    ax.set_xscale("log")
    ax.set_xlabel("latency from scheduled send, ms")
    ax.set_ylabel("fraction")
    ax.set_title("Open-loop latency CDF")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    for key, label in (("stream_a", "(a) Envoy alone"), ("stream_c", "(c) + processor")):
        run = runs.get(key)
        if run and run.chunk_lag_ms:
            s = sorted(run.chunk_lag_ms)
            ax.plot(s, [i / len(s) for i in range(len(s))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("per-chunk lag (server write → client read), ms")
    ax.set_title("Streaming: per-chunk lag CDF")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    mf = r.get("memory_flat")
    if mf:
        pts = mf["samples"]
        ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], "o-")
        ax.set_xlabel("requests through (b) in this phase")
        ax.set_ylabel("processor RSS, MiB")
        ys = [p[1] / 2**20 for p in pts]
        ax.set_ylim(min(ys) - 4, max(ys) + 4)
        ax.set_title("Processor memory over requests (flat?)")
        ax.grid(alpha=0.3)

    ax = axes[1][2]
    h = r.get("hold")
    if h:
        pts = h["points"]
        ax.plot([p["open"] for p in pts], [p["rss_processor"] / 2**20 for p in pts], "o-", label="processor")
        ax.plot([p["open"] for p in pts], [p["rss_envoy"] / 2**20 for p in pts], "s--", label="Envoy")
        ax.set_xlabel("open streams")
        ax.set_ylabel("RSS, MiB")
        ax.set_title(f"Memory under open streams (processor {h['per_stream_bytes'] / 1024:.1f} KiB/stream)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    fig.suptitle(f"Token Meter benchmark — {r['meta']['date']} — {r['meta']['nproc']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
