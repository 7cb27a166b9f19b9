"""The limiter on a real 3-primary Redis Cluster: the tenant's scopes on the tenant's shard in one call,
the pool choice as a second call on the pool's shard, settlement on both, failures in between.

(The behaviour suite in test_limiter_conformance.py also runs against the cluster.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
from redis.asyncio import Redis, RedisCluster

from extproc.devstack.redis_cluster import RedisClusterProcess, start_redis_cluster
from extproc.limiter import PoolCeiling, RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.redis_backend import counter_key, pool_key, reservation_key

TENANT = "acme"
SCOPES = (
    ScopeLimit.of("tenant:acme", tokens_per_minute=100_000, requests_per_minute=1000, quota_tokens=10**9),
    ScopeLimit.of("project:acme/chatbot", tokens_per_minute=50_000),
    ScopeLimit.of("key:acme-web", tokens_per_minute=20_000, requests_per_hour=1000),
)
MINUTE, HOUR, MONTH = "w60000", "w3600000", "qmonth"  # the counters of those rules


def keys_of(scope: ScopeLimit) -> list[str]:
    return sorted({counter_key(TENANT, scope.scope, rule.counter) for rule in scope.rules})


def owner_port(client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


@pytest.fixture
async def cluster_client(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url.replace("redis+cluster://", "redis://"))
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


async def remote_pool(client: RedisCluster) -> str:
    """A pool name whose key lives on another shard than the tenant's keys."""
    tenant_port = owner_port(client, reservation_key(TENANT, "x"))
    for i in range(100):
        if owner_port(client, pool_key(f"gpu{i}")) != tenant_port:
            return f"gpu{i}"
    raise AssertionError("no pool name on another shard")


async def window(client: RedisCluster | Redis, key: str) -> tuple[int, int]:
    """(sum of the entry costs (input + output), entries) of a minute window."""
    members = [m for m in cast(list[bytes], await client.zrange(key, 0, -1)) if not m.startswith(b"#")]
    return sum(int(m.split(b"|")[0]) + int(m.split(b"|")[1]) for m in members), len(members)


async def test_the_tenant_is_one_call_on_its_shard_and_the_pool_one_more_on_its_own(
    redis_cluster_url: str, cluster_client: RedisCluster
) -> None:
    pool = await remote_pool(cluster_client)
    lim = RedisLimiter.from_url(redis_cluster_url, deadline_ms=2000)
    try:
        await lim.start()
        d = await lim.reserve(Reservation("r1", TENANT, SCOPES, 1000, (PoolCeiling(pool, 10_000),)))
        assert d.allowed and d.pool == pool and not d.degraded
        assert lim.round_trips == 2
        d = await lim.reserve(Reservation("r2", TENANT, SCOPES, 1000, (PoolCeiling("overflow", None),)))
        assert d.allowed and d.pool == "overflow" and lim.round_trips == 3  # no ceiling: no pool call
        tenant_port = owner_port(cluster_client, reservation_key(TENANT, "r1"))
        for s in SCOPES:
            for key in keys_of(s):
                assert owner_port(cluster_client, key) == tenant_port
                assert await cluster_client.exists(key) == 1
        assert owner_port(cluster_client, pool_key(pool)) != tenant_port
        assert await window(cluster_client, pool_key(pool)) == (1000, 1)
        assert await window(cluster_client, counter_key(TENANT, "key:acme-web", MINUTE)) == (2000, 2)
    finally:
        await lim.aclose()


async def test_when_no_pool_has_room_the_tenants_reservation_is_given_back(
    redis_cluster_url: str, cluster_client: RedisCluster
) -> None:
    pool = await remote_pool(cluster_client)
    pools = (PoolCeiling(pool, 1000),)
    lim = RedisLimiter.from_url(redis_cluster_url, deadline_ms=2000)
    try:
        await lim.start()
        assert (await lim.reserve(Reservation("r1", TENANT, SCOPES, 800, pools))).allowed
        trips = lim.round_trips
        d = await lim.reserve(Reservation("r2", TENANT, SCOPES, 800, pools))
        assert not d.allowed and (d.denied_scope, d.denied_kind) == ("pool", "pool")
        assert 0 < d.retry_after_seconds <= 60
        assert d.tokens is not None and d.tokens.remaining == 20_000 - 800  # as if r2 never happened
        assert lim.round_trips - trips == 3  # tenant, pool (full), cancel on the tenant's shard
        for s in SCOPES:
            assert await window(cluster_client, counter_key(TENANT, s.scope, MINUTE)) in ((800, 1), (0, 0))
        assert await window(cluster_client, counter_key(TENANT, "tenant:acme", MINUTE)) == (800, 1)
        assert await cluster_client.zcount(counter_key(TENANT, "key:acme-web", HOUR), 0, "+inf") == 1  # one entry
        assert await cluster_client.hmget(counter_key(TENANT, "tenant:acme", MONTH), ["i", "o", "r"]) == [
            b"800", b"0", b"1"]
        assert await cluster_client.exists(reservation_key(TENANT, "r2")) == 0
    finally:
        await lim.aclose()


async def test_settlement_reaches_the_tenants_and_the_pools_shards_once(
    redis_cluster_url: str, cluster_client: RedisCluster
) -> None:
    pool = await remote_pool(cluster_client)
    pools = (PoolCeiling(pool, 10_000),)
    lim = RedisLimiter.from_url(redis_cluster_url, deadline_ms=2000)
    try:
        for i in range(10):
            assert (await lim.reserve(Reservation(f"r{i}", TENANT, SCOPES, 900, pools))).pool == pool
        for i in range(10):
            lim.settle(TENANT, f"r{i}", 100 + i)
        await lim.flush()
        assert lim.settled == 10 and lim.settle_queue_depth == 0
        expected = (sum(100 + i for i in range(10)), 10)
        assert await window(cluster_client, counter_key(TENANT, "key:acme-web", MINUTE)) == expected
        assert await window(cluster_client, pool_key(pool)) == expected
        assert await lim.settle_now(TENANT, "r0", 5000) is False
        assert await window(cluster_client, pool_key(pool)) == expected
    finally:
        await lim.aclose()


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcess]:
    cluster = start_redis_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_hung_pool_shard_fails_open_and_what_was_reserved_is_undone(
    own_cluster: RedisClusterProcess,
) -> None:
    admin = RedisCluster.from_url(own_cluster.url.replace("redis+cluster://", "redis://"))
    await admin.initialize()
    pool = await remote_pool(admin)
    pool_node = next(n for n in own_cluster.nodes if n.port == owner_port(admin, pool_key(pool)))
    pools = (PoolCeiling(pool, 100_000),)
    lim = RedisLimiter.from_url(own_cluster.url, deadline_ms=150, settle_timeout_s=0.2)
    try:
        await lim.start()  # topology discovery and scripts before the first (deadline-bound) call
        assert not (await lim.reserve(Reservation("r0", TENANT, SCOPES, 100, pools))).degraded
        pool_node.pause()  # shorter than the cluster's node timeout (2 s): no failover business
        started = time.monotonic()
        d = await lim.reserve(Reservation("r1", TENANT, SCOPES, 500, pools))
        assert time.monotonic() - started < 0.5
        assert d.allowed and d.degraded and lim.fail_open_decisions == 1
        await asyncio.sleep(0.3)
        pool_node.resume()
        await lim.flush()
        assert lim.settle_queue_depth == 0
        # the tenant's shard reserved r1 and the pool's shard ran it late: both were cancelled
        assert await window(admin, counter_key(TENANT, "key:acme-web", MINUTE)) == (100, 1)
        assert await window(admin, pool_key(pool)) == (100, 1)
    finally:
        pool_node.resume()
        await lim.aclose()
        await admin.aclose()
