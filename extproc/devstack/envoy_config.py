"""Render the shipped Envoy config for a local run.

`envoy/envoy.yaml` is written for docker-compose (service hostnames). A local run (demo, tests,
benchmarks) changes only addresses: the listener and admin ports, and the endpoints of the
processor and pool clusters. Everything else (filters, routes, access log) is the shipped file,
so what the tests exercise is what operators deploy.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"
OBSERVE_CONFIG = REPO_ROOT / "envoy" / "envoy-observe.yaml"
METER_FILTER = "tokenmeter.meter"


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


def observe_variant(config: Mapping[str, Any]) -> dict[str, Any]:
    """envoy.yaml with the response path metered by a second, observability-mode ext_proc filter.

    Envoy then never waits for the processor on the response path (no added latency per chunk);
    the price: the meter's replies are not read, so Envoy's access log has no token counts (the usage
    records do). envoy/envoy-observe.yaml is exactly this function's output (a test checks it).
    """
    out: dict[str, Any] = copy.deepcopy(dict(config))
    hcm = out["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    admission = filters[0]["typed_config"]
    admission["processing_mode"]["response_body_mode"] = "NONE"
    admission.pop("response_attributes", None)
    meter = {
        "@type": admission["@type"],
        "grpc_service": copy.deepcopy(admission["grpc_service"]),
        "observability_mode": True,
        # A meter that cannot reach the processor must not fail a response already admitted.
        "failure_mode_allow": True,
        "stat_prefix": "meter",
        "processing_mode": {
            "request_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            # Headers too: the meter is not waited for, and a response without a body then still
            # reaches it (status and end of stream) and gets its record.
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "response_trailer_mode": "SKIP",
        },
        "forward_rules": {"allowed_headers": {"patterns": [{"exact": ":status"}]}},
        "metadata_options": {"forwarding_namespaces": {"untyped": ["tokenmeter"]}},
    }
    filters.insert(1, {"name": METER_FILTER, "typed_config": meter})
    return out


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


_OBSERVE_HEADER = """\
# Token Meter, low-latency variant: like envoy.yaml, but the response body is metered by a second
# ext_proc filter in observability mode, so Envoy never waits for the processor on the response path.
# Trade-off: Envoy's access log has no token counts (the processor's usage records do).
# GENERATED from envoy.yaml by extproc.devstack.envoy_config.observe_variant; tests check they match.
#   .venv/bin/python -c 'from extproc.devstack.envoy_config import write_observe_config; write_observe_config()'
"""


def write_observe_config() -> Path:
    config = observe_variant(yaml.safe_load(SHIPPED_CONFIG.read_text()))
    OBSERVE_CONFIG.write_text(_OBSERVE_HEADER + yaml.safe_dump(config, sort_keys=False, width=200))
    return OBSERVE_CONFIG
