"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from extproc.devstack.redis_cluster import RedisClusterProcess, start_redis_cluster
from extproc.devstack.redis_proc import RedisProcess, start_redis_server


def _flushall(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One real redis-server for the session (stopped at the end)."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, free to be stopped, paused and restarted."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> Iterator[str]:
    """The session redis-server's URL, emptied (FLUSHALL) before each test."""
    _flushall(redis_server.url)
    yield redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    """A real 3-primary Redis Cluster for the session (started only by tests that ask for it)."""
    cluster = start_redis_cluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcess) -> Iterator[str]:
    """``redis+cluster://...`` of the session cluster, every primary emptied before each test."""
    for node in redis_cluster.nodes:
        _flushall(node.url)
    yield redis_cluster.url
