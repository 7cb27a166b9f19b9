"""Several processor replicas (RedisLimiter instances, each with its own connection pools) racing on one
real redis-server (and on a real 3-node Redis Cluster): every window stays exact, every settlement exact."""

from __future__ import annotations

import asyncio
import random
from typing import cast

import pytest

from extproc.limiter import Decision, PoolCeiling, RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.redis_backend import Client, counter_key, pool_key, redis_client

REPLICAS = 4
N = 200
TENANT = "acme"
TENANT_TPM = 20_000
KEY_TPM = 6_000
TENANT_RPM = 150
POOL_TPM = 12_000


MINUTE = "w60000"  # the counter of tokens/min and requests/min


async def window_cost(client: Client, key: str) -> tuple[int, int]:
    """(sum of the costs (input + output) of the entries in a token window, the running total kept beside
    it: the members "#i" and "#o", stored as -1 - total)."""
    entries = cast(list[tuple[bytes, float]], await client.zrange(key, 0, -1, withscores=True))
    totals = {m: -1 - int(score) for m, score in entries if m.startswith(b"#")}
    running = totals.get(b"#i", 0) + totals.get(b"#o", 0)
    cost = 0
    for m, _ in entries:
        if not m.startswith(b"#"):
            inp, out, _rid = m.split(b"|", 2)
            cost += int(inp) + int(out)
    return cost, running


@pytest.fixture(params=["redis", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url"))


def plan(seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [(f"r{i}", f"key:k{i % 5}", rng.randint(50, 400)) for i in range(N)]


async def test_concurrent_replicas_never_admit_more_than_the_limit_and_settle_exactly(url: str) -> None:
    replicas = [RedisLimiter.from_url(url, deadline_ms=5000) for _ in range(REPLICAS)]
    client = redis_client(url, timeout_s=5.0)
    tenant = ScopeLimit.of("tenant:acme", tokens_per_minute=TENANT_TPM, requests_per_minute=TENANT_RPM)
    pools = (PoolCeiling("h100", POOL_TPM), PoolCeiling("a10", None))
    requests = plan(seed=7)
    try:
        async def one(i: int, rid: str, key: str, tokens: int) -> Decision:
            scopes = (tenant, ScopeLimit.of(key, tokens_per_minute=KEY_TPM))
            return await replicas[i % REPLICAS].reserve(Reservation(rid, TENANT, scopes, tokens, pools))

        decisions = await asyncio.gather(*(one(i, *req) for i, req in enumerate(requests)))
        assert not any(d.degraded for d in decisions)
        admitted = [(req, d) for req, d in zip(requests, decisions, strict=True) if d.allowed]
        denied = [d for d in decisions if not d.allowed]
        assert admitted and denied, "the demand must exceed the limits for this test to mean anything"
        assert sum(d.allowed for d in decisions) <= TENANT_RPM

        # every window holds exactly what was admitted into it, never more than its limit
        tenant_cost, tenant_running = await window_cost(client, counter_key(TENANT, "tenant:acme", MINUTE))
        assert tenant_cost == tenant_running == sum(t for (_, _, t), _ in admitted) <= TENANT_TPM
        for k in {key for _, key, _ in requests}:
            cost, running = await window_cost(client, counter_key(TENANT, k, MINUTE))
            assert cost == running == sum(t for (_, key, t), _ in admitted if key == k) <= KEY_TPM
        h100_cost, h100_running = await window_cost(client, pool_key("h100"))
        assert h100_cost == h100_running == sum(t for (_, _, t), d in admitted if d.pool == "h100")
        assert h100_cost <= POOL_TPM
        assert {d.pool for _, d in admitted} <= {"h100", "a10"}
        # a denial is always for a reason that holds: a full window, never a lost race with a ghost
        assert {d.denied_kind for d in denied} <= {"tokens", "requests"}

        # settle from the replicas' queues with known actual counts (some refunds, some debt)
        rng = random.Random(11)
        actual = {rid: rng.randint(0, 600) for (rid, _, _), _ in admitted}
        for i, ((rid, _, _), _) in enumerate(admitted):
            replicas[i % REPLICAS].settle(TENANT, rid, actual[rid])
        await asyncio.gather(*(r.flush() for r in replicas))
        assert all(r.settle_queue_depth == 0 for r in replicas)
        assert sum(r.settled for r in replicas) == len(admitted)

        tenant_cost, tenant_running = await window_cost(client, counter_key(TENANT, "tenant:acme", MINUTE))
        assert tenant_cost == tenant_running == sum(actual.values())
        for k in {key for _, key, _ in requests}:
            cost, running = await window_cost(client, counter_key(TENANT, k, MINUTE))
            assert cost == running == sum(actual[rid] for (rid, key, _), _ in admitted if key == k)
        h100_cost, h100_running = await window_cost(client, pool_key("h100"))
        on_h100 = [rid for (rid, _, _), d in admitted if d.pool == "h100"]
        assert h100_cost == h100_running == sum(actual[rid] for rid in on_h100)
        # every reservation record is gone: a second settlement is a no-op
        assert await client.keys("tm:{t:acme}:res:*") == []
        assert not await replicas[0].settle_now(TENANT, admitted[0][0][0], 1)
    finally:
        for r in replicas:
            await r.aclose()
        await client.aclose()


async def test_concurrent_reservations_across_tenants_share_the_pool_ceiling_exactly(url: str) -> None:
    replicas = [RedisLimiter.from_url(url, deadline_ms=5000) for _ in range(REPLICAS)]
    client = redis_client(url, timeout_s=5.0)
    pools = (PoolCeiling("h100", 5_000), PoolCeiling("a10", 5_000))
    try:
        async def one(i: int) -> Decision:
            tenant = f"t{i % 7}"
            scope = ScopeLimit.of(f"tenant:{tenant}", tokens_per_minute=100_000)
            return await replicas[i % REPLICAS].reserve(Reservation(f"r{i}", tenant, (scope,), 300, pools))

        decisions = await asyncio.gather(*(one(i) for i in range(N)))
        by_pool = {p: sum(300 for d in decisions if d.pool == p) for p in ("h100", "a10")}
        assert by_pool == {"h100": 4_800, "a10": 4_800}  # 16 fit in each pool, not one more
        assert sum(not d.allowed for d in decisions) == N - 32
        assert all(d.denied_kind == "pool" for d in decisions if not d.allowed)
        for p in ("h100", "a10"):
            assert await window_cost(client, pool_key(p)) == (4_800, 4_800)
    finally:
        for r in replicas:
            await r.aclose()
        await client.aclose()
