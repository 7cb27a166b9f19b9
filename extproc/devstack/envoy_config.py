"""The shipped Envoy configuration, rendered for a local run (demo, tests, benchmarks).

The product's configuration is generated from a policy (extproc.envoy.config, `tokenmeter
envoy-config`); `envoy/envoy.yaml` is that output for `policies/example.yaml`, as docker-compose
runs it. A local run renders the same generator's output with loopback addresses only: the
listener and admin ports, the processor's address and each pool's endpoints. Everything else
(filters, routes, access logs) is what operators deploy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extproc.envoy.config import PROCESSOR_CLUSTER, Deployment, Endpoint, pool_cluster, render, write
from extproc.policy import load_policy

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_POLICY = REPO_ROOT / "policies" / "example.yaml"
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"
ISTIO_CONFIG = REPO_ROOT / "envoy" / "istio" / "envoyfilter.yaml"

__all__ = [
    "ISTIO_CONFIG", "PROCESSOR_CLUSTER", "REPO_ROOT", "SHIPPED_CONFIG", "SHIPPED_POLICY", "Endpoint",
    "pool_cluster", "render_local", "write",
]


def render_local(
    policy: Path,
    *,
    listen_port: int,
    admin_port: int,
    processor: Sequence[Endpoint],
    pools: Mapping[str, Sequence[Endpoint]],
    access_log_path: str | None = None,
) -> dict[str, Any]:
    """The generated configuration for `policy`, with loopback addresses."""
    return render(load_policy(policy), Deployment(
        listen_address="127.0.0.1",
        listen_port=listen_port,
        admin_port=admin_port,
        processor=tuple(processor),
        pool_endpoints={name: tuple(eps) for name, eps in pools.items()},
        access_log_path=access_log_path,
    ))
