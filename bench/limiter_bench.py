"""Limiter benchmark: one RedisLimiter against one real redis-server (or a cluster).

Measures, for a 4-scope path (tenant, project, team, key: tokens/min + requests/min each, a monthly
token quota on the tenant) and two pools:
  * admission decisions/s and latency at several concurrencies (uvloop, one process, one limiter);
  * Redis round trips per admission (the limiter's own counter);
  * server time per decision and per settlement (INFO commandstats usec_per_call, reset per phase);
  * memory per key (MEMORY USAGE ... SAMPLES 0) for every key kind the limiter writes.

    .venv/bin/python bench/limiter_bench.py [--seconds 5] [--concurrency 1,16,64] [--cluster]

Loopback only; bounded in time; starts and stops its own redis-server(s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from extproc.devstack.redis_proc import start_redis_server
from extproc.limiter import PoolCeiling, RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.redis_backend import counter_key, pool_key, reservation_key

BIG = 10**12
SCOPES = (
    ScopeLimit.of("tenant:acme", tokens_per_minute=BIG, requests_per_minute=BIG, quota_tokens=BIG),
    ScopeLimit.of("project:acme/chatbot", tokens_per_minute=BIG, requests_per_minute=BIG),
    ScopeLimit.of("team:acme/chatbot/support", tokens_per_minute=BIG, requests_per_minute=BIG),
    ScopeLimit.of("key:acme-web", tokens_per_minute=BIG, requests_per_minute=BIG),
)
POOLS = (PoolCeiling("h100", BIG), PoolCeiling("a10", None))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def evalsha_usec(nodes: list[Redis]) -> float:
    """Server time spent in EVALSHA since the last reset, summed over the nodes (INFO commandstats)."""
    total = 0.0
    for node in nodes:
        info: dict[str, Any] = await node.info("commandstats")
        total += float(info.get("cmdstat_evalsha", {}).get("usec", 0))
    return total


async def reset_stats(nodes: list[Redis]) -> None:
    for node in nodes:
        await node.config_resetstat()


async def admission_run(
    limiter: RedisLimiter, concurrency: int, seconds: float
) -> tuple[int, list[float], list[str]]:
    latencies: list[float] = []
    ids: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            rid = f"b{w}-{n}-{uuid.uuid4().hex[:8]}"
            n += 1
            t0 = time.perf_counter()
            d = await limiter.reserve(Reservation(rid, "acme", SCOPES, 1200, POOLS))
            latencies.append(time.perf_counter() - t0)
            if d.degraded or not d.allowed:
                raise RuntimeError(f"unexpected decision {d}")
            ids.append(rid)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies), latencies, ids


async def settle_run(limiter: RedisLimiter, ids: list[str]) -> float:
    t0 = time.perf_counter()
    for rid in ids:
        limiter.settle("acme", rid, 700)
    await limiter.flush()
    return time.perf_counter() - t0


async def throughput(
    url: str, node_urls: list[str], seconds: float, concurrencies: list[int]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    nodes = [Redis.from_url(u) for u in node_urls]
    try:
        for c in concurrencies:
            for node in nodes:
                await node.flushall()
            limiter = RedisLimiter.from_url(url, deadline_ms=1000)
            await limiter.start()
            # warm up: connections for every worker, the script cache
            await admission_run(limiter, c, 0.3)
            limiter.round_trips = 0
            await reset_stats(nodes)
            t0 = time.perf_counter()
            n, lat, ids = await admission_run(limiter, c, seconds)
            elapsed = time.perf_counter() - t0
            reserve_usec = await evalsha_usec(nodes)
            trips = limiter.round_trips / n
            await reset_stats(nodes)
            settle_s = await settle_run(limiter, ids)
            settle_usec = await evalsha_usec(nodes)
            rows.append(
                {
                    "concurrency": c,
                    "decisions": n,
                    "decisions/s": n / elapsed,
                    "p50 ms": statistics.median(lat) * 1000,
                    "p99 ms": pct(lat, 0.99) * 1000,
                    "round trips/decision": trips,
                    "server µs/decision": reserve_usec / n,
                    "settles/s (queued, pipelined)": len(ids) / settle_s,
                    "server µs/settle": settle_usec / len(ids),
                }
            )
            await limiter.aclose()
    finally:
        for node in nodes:
            await node.aclose()
    return rows


async def memory(url: str) -> tuple[list[dict[str, Any]], list[tuple[str, int, str]]]:
    """MEMORY USAGE ... SAMPLES 0 of the window ZSETs at several sizes, and of the other key kinds."""
    windows: list[dict[str, Any]] = []
    others: list[tuple[str, int, str]] = []
    admin = Redis.from_url(url)
    limiter = RedisLimiter.from_url(url, deadline_ms=1000)
    tenant = "acme"

    async def usage(key: str) -> int:
        return int(await admin.memory_usage(key, samples=0) or 0)

    try:
        await admin.flushall()
        scope = ScopeLimit.of(
            "key:acme-web",
            tokens_per_minute=BIG,
            requests_per_minute=BIG,
            requests_per_hour=BIG,
            quota_tokens=BIG,
        )
        # the counters: minute (tokens/min and requests/min), hour, the month's quota
        counters = dict.fromkeys(r.counter for r in scope.rules)
        minute, hour, quota = (counter_key(tenant, scope.scope, c) for c in counters)
        done = 0
        prev = (0, 0, 0)
        for n in (1, 10, 100, 127, 128, 1000, 10000):
            while done < n:
                rid = str(uuid.uuid4())  # a 36-character request id, as x-request-id usually is
                await limiter.reserve(Reservation(rid, tenant, (scope,), 1200, ()))
                done += 1
            m_b, h_b = await usage(minute), await usage(hour)
            pn, pm, ph = prev
            windows.append(
                {
                    "entries": n,
                    "minute ZSET bytes": m_b,
                    "bytes/entry (marginal)": (m_b - pm) / (n - pn) if pn else float("nan"),
                    "hour ZSET bytes": h_b,
                    "hour bytes/entry (marginal)": (h_b - ph) / (n - pn) if pn else float("nan"),
                }
            )
            prev = (n, m_b, h_b)
        others.append(("quota HASH {p, e, i, o, r}", await usage(quota), "one per scope with a quota"))
        await admin.flushall()
        rid = str(uuid.uuid4())
        await limiter.reserve(Reservation(rid, tenant, SCOPES, 1200, POOLS))
        others.append(
            (
                "reservation record, 4 scopes + pool",
                await usage(reservation_key(tenant, rid)),
                "one per unsettled request; deleted by settle",
            )
        )
        others.append(("pool minute window ZSET, 1 entry", await usage(pool_key("h100")), "as a scope's"))
    finally:
        await limiter.aclose()
        await admin.aclose()
    return windows, others


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = list(rows[0])
    fmt = [f"{{:>{max(len(c), 10)}}}" for c in cols]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for c, f in zip(cols, fmt, strict=True):
            v = r[c]
            cells.append(f.format(f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"))
        print("| " + " | ".join(cells) + " |")


@contextlib.asynccontextmanager
async def target(cluster: bool) -> AsyncIterator[tuple[str, list[str]]]:
    """(the limiter's URL, each node's plain URL)."""
    if cluster:
        from extproc.devstack.redis_cluster import start_redis_cluster

        c = start_redis_cluster(3)
        try:
            yield c.url, [n.url for n in c.nodes]
        finally:
            c.stop()
    else:
        server = start_redis_server()
        try:
            yield server.url, [server.url]
        finally:
            server.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per concurrency (max 60)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--cluster", action="store_true", help="a 3-node Redis Cluster instead of one server")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    seconds = min(60.0, args.seconds)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    async with target(args.cluster) as (url, node_urls):
        admin = Redis.from_url(node_urls[0])
        info = await admin.info("server")
        await admin.aclose()
        where = f"a {len(node_urls)}-node cluster" if args.cluster else "one redis-server"
        print(
            f"redis {info['redis_version']} ({where}), one RedisLimiter (uvloop), "
            f"4 scopes x (tpm + rpm) + tenant quota + 2 pools, {seconds:.0f}s per row\n"
        )
        print_table(await throughput(url, node_urls, seconds, concurrencies))
        if not args.no_memory and not args.cluster:
            windows, others = await memory(url)
            print('\nMEMORY USAGE <key> SAMPLES 0 (members: "1200|0|<uuid4>", and the "#i", "#o" totals)\n')
            print_table(windows)
            print("\n| key | bytes | note |\n|---|---|---|")
            for name, size, note in others:
                print(f"| {name} | {size:,} | {note} |")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
