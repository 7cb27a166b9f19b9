"""docker-compose.yml runs exactly the commands and configs that the demo and these tests run."""

from __future__ import annotations

from typing import Any

import yaml

from extproc.devstack import commands
from extproc.devstack.envoy_config import REPO_ROOT


def _services() -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services: dict[str, Any] = data["services"]
    return services


def _endpoints() -> dict[str, tuple[str, int]]:
    config = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text())
    out = {}
    for cluster in config["static_resources"]["clusters"]:
        sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        out[cluster["name"]] = (sock["socket_address"]["address"], sock["socket_address"]["port_value"])
    return out


def test_compose_services_run_the_stack_commands() -> None:
    services = _services()
    assert services["processor"]["command"] == commands.processor_argv(
        policy="/app/policies/example.yaml",
        listen="0.0.0.0:50051",
        redis="redis://redis:6379/0",
        usage_log="/app/var/usage.jsonl",
    )
    for pool in ("h100", "a100", "cheap"):
        assert services[f"model-{pool}"]["command"] == commands.fake_model_argv(
            pool=pool, host="0.0.0.0", port=8000
        )
    assert services["envoy"]["command"] == commands.envoy_argv(config="/app/envoy/envoy.yaml")
    assert services["redis"]["command"] == commands.redis_argv(port=6379)


def test_shipped_envoy_config_points_at_the_compose_services() -> None:
    services = _services()
    endpoints = _endpoints()
    assert endpoints["tokenmeter_processor"] == ("processor", 50051)
    assert endpoints["h100_pool"] == ("model-h100", 8000)
    assert endpoints["a100_pool"] == ("model-a100", 8000)
    assert endpoints["cheap_pool"] == ("model-cheap", 8000)
    for host, _ in endpoints.values():
        assert host in services
