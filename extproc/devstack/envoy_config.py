"""Render the shipped Envoy config for a local run.

`envoy/envoy.yaml` is written for docker-compose (service hostnames). A local run (demo, tests,
benchmarks) changes only addresses: the listener and admin ports, and the endpoints of the
processor and pool clusters. Everything else (filters, routes, access log) is the shipped file,
so what the tests exercise is what operators deploy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"


@dataclass(frozen=True)
class Endpoint:
    """A host:port endpoint, or a Unix domain socket path when `uds` is set."""

    host: str = "127.0.0.1"
    port: int = 0
    uds: str | None = None

    def to_address(self) -> dict[str, Any]:
        if self.uds:
            return {"pipe": {"path": self.uds}}
        return {"socket_address": {"address": self.host, "port_value": self.port}}

    @property
    def is_static(self) -> bool:
        if self.uds:
            return True
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def render(
    *,
    listen_port: int,
    admin_port: int,
    clusters: Mapping[str, Sequence[Endpoint]],
    source: Path = SHIPPED_CONFIG,
    access_log_path: str | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["admin"]["address"] = Endpoint("127.0.0.1", admin_port).to_address()
    resources = config["static_resources"]
    listener = resources["listeners"][0]
    listener["address"] = Endpoint("127.0.0.1", listen_port).to_address()
    if access_log_path is not None:
        _log_to_file(listener, access_log_path)
    by_name = {c["name"]: c for c in resources["clusters"]}
    for name, endpoints in clusters.items():
        if name not in by_name:
            raise KeyError(f"{source} has no cluster named {name!r}")
        cluster = by_name[name]
        cluster["type"] = "STATIC" if all(e.is_static for e in endpoints) else "STRICT_DNS"
        cluster["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": e.to_address()}} for e in endpoints]}
            ],
        }
    return config


def _log_to_file(listener: dict[str, Any], path: str) -> None:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for log in hcm.get("access_log", []):
        if log["name"] == "envoy.access_loggers.stdout":
            fmt = log["typed_config"]["log_format"]
            log["name"] = "envoy.access_loggers.file"
            log["typed_config"] = {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": fmt,
            }


def write(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path
