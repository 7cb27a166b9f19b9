"""The benchmark's process tree: one devstack `Stack` plus an Envoy without the processor and an
Envoy with a do-nothing processor.

The three Envoys run side by side in the same run, all rendered from the one generated
configuration (extproc.envoy.config, for bench/policy.yaml, as `tokenmeter envoy-config` and the
e2e tests render it):

* ``envoy`` (b, c): the generated config for loopback, exactly as the demo and the e2e tests run
  it (extproc.devstack.envoy_config.render_local).
* ``envoy-alone`` (a): the same config with the processor removed: no ext_proc filters, no gRPC
  settle access log, no processor cluster, and the routes replaced by one route to ``h100_pool``
  (where the processor sends all benchmark traffic), plus a ``/direct/`` prefix answered by Envoy
  itself (direct_response), used only as a reference for the fake server's share of the CPU.
  Everything else (listener, the other filters as generated: compressor, header mutation, buffer,
  Lua (which runs on no route here), json/sse_to_metadata; the file access log, HCM settings, pool
  clusters) is identical, so (a) and (b) differ only by the processor and its settle log.
* ``envoy-null`` (n): the very same config as (b), except that the processor cluster points at
  bench/null_processor.py (a do-nothing grpc.aio ext_proc server: the floor of any Python
  processor; it answers with a constant ``tokenmeter:pool`` = cheap, since the routes send a
  request upstream only with the processor's pool) and every pool cluster at the fake server that
  (b) and (a) use, so (n) and (b) differ only in the processor. The null processor also reads (and
  drops) Envoy's gRPC settle access log. With ``--processors N`` / ``--uds`` the null processors are
  as many and reached the same way.

Deviations from the generated config, applied to all three: the pool clusters' circuit breakers
are raised from 10,000 to 100,000 so that the 10,000-open-streams test is not cut by them. All
Envoys run with ``--concurrency 1``.

The upstreams are the fake model server with send-time stamps on streamed events
(bench/upstream.py), one per pool of the policy, with a chunk delay that `restart_upstreams` can
change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.devstack import commands, envoy_config
from extproc.devstack.envoy_config import PROCESSOR_CLUSTER, Endpoint, pool_cluster
from extproc.devstack.ports import free_port
from extproc.devstack.redis_proc import start_redis_server
from extproc.devstack.stack import Proc, Stack

BENCH_POOL = "h100"
# Envoy alone also answers requests under this prefix itself (direct_response), with a body like
# the fake server's reply: the ceiling of Envoy alone without the fake server's cost on the same CPUs.
DIRECT_PREFIX = "/direct/"
DIRECT_BODY = (
    '{"id":"chatcmpl-direct","object":"chat.completion","created":0,"model":"bench-model","choices":'
    '[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 '
    'tok9 tok10 tok11 tok12 tok13 tok14 tok15"},"logprobs":null,"finish_reason":"length"}],"usage":'
    '{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}}'
)
RAISED_BREAKER = 100_000


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def raise_pool_breakers(config: dict[str, Any]) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"].endswith("_pool"):
            for t in cluster.get("circuit_breakers", {}).get("thresholds", []):
                for k in ("max_connections", "max_pending_requests", "max_requests"):
                    t[k] = RAISED_BREAKER


def _is_ext_proc(http_filter: dict[str, Any]) -> bool:
    kind = str(http_filter.get("typed_config", {}).get("@type", ""))
    return kind.endswith("ext_proc.v3.ExternalProcessor")


def _uses_processor(access_log: dict[str, Any]) -> bool:
    """The gRPC settle access log, whose messages go to the processor cluster."""
    grpc = access_log.get("typed_config", {}).get("common_config", {}).get("grpc_service", {})
    return bool(grpc.get("envoy_grpc", {}).get("cluster_name") == PROCESSOR_CLUSTER)


def without_ext_proc(config: dict[str, Any], cluster: str = pool_cluster(BENCH_POOL)) -> dict[str, Any]:
    """Envoy alone: the rendered config minus the processor (its ext_proc filters, its settle access
    log and its cluster), all routes to one cluster."""
    out = copy.deepcopy(config)
    hcm = _hcm(out)
    before = len(hcm["http_filters"])
    hcm["http_filters"] = [f for f in hcm["http_filters"] if not _is_ext_proc(f)]
    if len(hcm["http_filters"]) == before:
        raise ValueError("the generated Envoy config has no ext_proc filter to remove")
    hcm["access_log"] = [log for log in hcm.get("access_log", []) if not _uses_processor(log)]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        vhost["routes"] = [
            {
                # a reference point without any upstream: Envoy answers itself (see DIRECT_PREFIX)
                "match": {"prefix": DIRECT_PREFIX},
                "direct_response": {"status": 200, "body": {"inline_string": DIRECT_BODY}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            },
            {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}},
        ]
    out["static_resources"]["clusters"] = [
        c for c in out["static_resources"]["clusters"] if c["name"] != PROCESSOR_CLUSTER
    ]
    return out


def with_null_processor(
    config: dict[str, Any], processor: list[Endpoint], *, upstream: Endpoint
) -> dict[str, Any]:
    """Setup (n): the rendered config with only endpoints changed: the processor cluster to the null
    processor(s), every pool cluster to `upstream` (the null processor routes every request to the
    cheap pool). Filters, routes, access logs, timeouts: untouched."""
    out = copy.deepcopy(config)
    clusters = {c["name"]: c for c in out["static_resources"]["clusters"]}
    if PROCESSOR_CLUSTER not in clusters:
        raise ValueError(f"the generated Envoy config has no {PROCESSOR_CLUSTER} cluster")
    for name, endpoints in [(PROCESSOR_CLUSTER, processor)] + [
        (n, [upstream]) for n in clusters if n.endswith("_pool")
    ]:
        clusters[name]["type"] = "STATIC"
        clusters[name]["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": e.to_address()}} for e in endpoints]}],
        }
    return out


def _null_name(i: int) -> str:
    return "null-processor" if i == 0 else f"null-processor-{i + 1}"


@dataclass
class BenchStack(Stack):
    chunk_delay_ms: float = 5.0
    alone_port: int = 0
    alone_admin_port: int = 0
    null_port: int = 0
    null_admin_port: int = 0
    null_processor_ports: list[int] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def start(self) -> None:
        if self.opts.use_redis:
            self.redis = start_redis_server()
        for pool in self.pools:
            self.pool_ports[pool] = free_port()
            self._spawn_upstream(pool)
        self.start_processor()
        self.start_null_processors()
        self._start_envoys()
        for pool, port in self.pool_ports.items():
            self._wait_http(f"http://127.0.0.1:{port}/healthz", f"model-{pool}")

    def _spawn_upstream(self, pool: str) -> Proc:
        argv = commands.fake_model_argv(pool=pool, host="127.0.0.1", port=self.pool_ports[pool])
        argv = [a if a != "extproc.fakes.model_server" else "bench.upstream" for a in argv]
        return self._spawn(f"model-{pool}", [*argv, "--chunk-delay-ms", str(self.chunk_delay_ms)])

    def start_null_processors(self) -> None:
        """The do-nothing processors of setup (n), as many as the real ones and reached the same way."""
        self.null_processor_ports = [free_port() for _ in range(self.opts.processors)]
        n = len(self.null_processor_ports)
        self.start_listeners(
            [_null_name(i) for i in range(n)],
            self.null_processor_ports,
            [self._null_socket(i) for i in range(n)],
            lambda listen: ["python", "-m", "bench.null_processor", "--listen", listen],
        )

    def null_processor_endpoints(self) -> list[Endpoint]:
        n = len(self.null_processor_ports)
        return self.listener_endpoints(self.null_processor_ports, [self._null_socket(i) for i in range(n)])

    def _null_socket(self, i: int) -> Path:
        return self.run_dir / f"null-processor-{i + 1}.sock"

    def restart_upstreams(self, chunk_delay_ms: float) -> None:
        """Restart the fake model servers on the same ports with another chunk delay."""
        self.chunk_delay_ms = chunk_delay_ms
        for pool in self.pool_ports:
            old = self.proc(f"model-{pool}")
            old.stop()
            self.procs.remove(old)
            self._spawn_upstream(pool)
        for pool, port in self.pool_ports.items():
            self._wait_http(f"http://127.0.0.1:{port}/healthz", f"model-{pool}")

    def _render(self) -> dict[str, Any]:
        """The generated config for loopback as the e2e tests render it (pool breakers raised)."""
        config = self.render_envoy_config(str(self.run_dir / "access.jsonl"))
        raise_pool_breakers(config)
        return config

    def _start_envoys(self) -> None:
        self.envoy_port, self.admin_port = free_port(), free_port()
        self.alone_port, self.alone_admin_port = free_port(), free_port()
        full = self._render()
        alone = without_ext_proc(full)
        alone["admin"]["address"] = Endpoint("127.0.0.1", self.alone_admin_port).to_address()
        alone_listener = alone["static_resources"]["listeners"][0]
        alone_listener["address"] = Endpoint("127.0.0.1", self.alone_port).to_address()
        for log in _hcm(alone).get("access_log", []):
            if "path" in log.get("typed_config", {}):
                log["typed_config"]["path"] = str(self.run_dir / "access-alone.jsonl")
        null = with_null_processor(
            full,
            self.null_processor_endpoints(),
            upstream=Endpoint("127.0.0.1", self.pool_ports[BENCH_POOL]),
        )
        self.null_port, self.null_admin_port = free_port(), free_port()
        null["admin"]["address"] = Endpoint("127.0.0.1", self.null_admin_port).to_address()
        null["static_resources"]["listeners"][0]["address"] = Endpoint("127.0.0.1", self.null_port).to_address()
        for log in _hcm(null).get("access_log", []):
            if "path" in log.get("typed_config", {}):
                log["typed_config"]["path"] = str(self.run_dir / "access-null.jsonl")
        self.configs = {"envoy": full, "envoy-alone": alone, "envoy-null": null}
        admins = {"envoy": self.admin_port, "envoy-alone": self.alone_admin_port, "envoy-null": self.null_admin_port}
        for name, admin in admins.items():
            path = envoy_config.write(self.configs[name], self.run_dir / f"{name}.yaml")
            argv = commands.envoy_argv(config=str(path), concurrency=self.opts.envoy_concurrency)
            self._spawn(name, [*argv, "--use-dynamic-base-id"])
            self._wait_http(f"http://127.0.0.1:{admin}/ready", name)
