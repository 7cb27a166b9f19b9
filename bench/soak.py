"""Memory over many requests: the processor's RSS while a long run goes through Envoy.

    python -m bench.soak [--requests 1000000] [--out bench/out]

One stack (as bench/run.py's (b): real Envoy with the config generated from the policy, the processor,
redis-server, fake model servers, bench/policy.yaml: every request takes the full admission path
and is admitted). wrk (16 connections) runs in 15 s segments until the request count is reached;
after each segment the processor's RSS (all its threads) is sampled. The growth is the
least-squares slope of RSS over requests after the first 10 % (warm-up: allocator arenas, caches,
the policy's scope caches fill). Writes <out>/soak.md and <out>/soak.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import procstat
from bench.load import BENCH_KEY, chat_body
from bench.run import BENCH_POLICY, ENVOY_CONFIG_NOTE, add_envoy_config_argument, raise_nofile
from bench.wrk import ensure_wrk, run_wrk, write_script
from extproc.devstack.stack import Stack, StackOptions

HERE = Path(__file__).resolve().parent


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per request."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    add_envoy_config_argument(parser)
    parser.add_argument("--segment-s", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    wrk, note = ensure_wrk()
    if wrk is None:
        raise SystemExit(f"bench.soak needs wrk ({note})")
    opts = StackOptions(policy=BENCH_POLICY, run_dir=out / "soak-run")
    points: list[tuple[int, int]] = []
    started = time.monotonic()
    with Stack(opts) as stack:
        pid = stack.proc("processor").popen.pid
        script = write_script(chat_body(stream=False, max_tokens=16), BENCH_KEY, stack.run_dir)
        url = f"{stack.base_url}/v1/chat/completions"
        total = errors = 0
        points.append((0, procstat.rss_bytes(pid)))
        while total < args.requests:
            r = run_wrk(wrk, url, script, target="soak", connections=16, duration_s=args.segment_s)
            total += r.requests
            errors += r.errors + r.non_2xx
            points.append((total, procstat.rss_bytes(pid)))
            print(f"[soak] {total:,} requests, {r.rps:,.0f} req/s, processor RSS "
                  f"{points[-1][1] / 2**20:.1f} MiB, errors {errors}", flush=True)
    warm = [p for p in points if p[0] >= args.requests * 0.1]
    per_req = slope(warm)
    rss_mib = [(n, round(b / 2**20, 2)) for n, b in points]
    result: dict[str, Any] = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "envoy_config": ENVOY_CONFIG_NOTE,
        "requests": total,
        "errors": errors,
        "seconds": round(time.monotonic() - started, 1),
        "rss_mib": rss_mib,
        "slope_bytes_per_request_after_warmup": round(per_req, 2),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Command: `{result['command']}` ({result['seconds']} s, {total:,} requests, {errors} errors)",
        "",
        "| requests | processor RSS MiB |",
        "|---|---|",
        *[f"| {n:,} | {mib} |" for n, mib in rss_mib],
        "",
        f"Growth after the first 10 %: {per_req:.1f} bytes/request (least squares).",
    ]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
