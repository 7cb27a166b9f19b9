"""The one Envoy configuration: generated from the policy by `tokenmeter envoy-config`, shipped
current, and valid to Envoy (`envoy --mode validate`) standalone, on loopback and as Istio's filters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.devstack.binaries import find_envoy
from extproc.devstack.envoy_config import ISTIO_CONFIG, REPO_ROOT, SHIPPED_CONFIG, SHIPPED_POLICY, render_local
from extproc.envoy.config import AUTHORIZER_CLUSTER, Endpoint, pool_cluster, write
from extproc.service.metadata import ATTRIBUTE_HEADERS
from tests.e2e.test_jwt_identity import JWKS
from tests.unit.policy_files import trusted_headers_section

THREE_POOLS = """\
version: "three"
pools:
  - {name: h100, tokens_per_minute: 1000, endpoints: ["gpu-a:8000", "gpu-b:8000"]}
  - {name: a100, tokens_per_minute: 5000, endpoints: ["10.0.0.7:9000"]}
  - {name: cpu, endpoints: ["cpu-pool:8000"]}
tenants: {acme: {projects: {chat: {}}}}
keys:
  - {id: k, sha256: "b75e14d5d5d23f8c5401adbabaf6150a5f7bd0f450b9bb193eba9d0938bbee84", tenant: acme, project: chat}
"""


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", "envoy-config", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_the_shipped_configs_are_what_the_generator_renders_from_the_example_policy() -> None:
    standalone = _cli("--policy", "policies/example.yaml")
    assert standalone.returncode == 0, standalone.stderr
    assert SHIPPED_CONFIG.read_text() == standalone.stdout, (
        "regenerate: tokenmeter envoy-config --policy policies/example.yaml -o envoy/envoy.yaml")
    istio = _cli("--policy", "policies/example.yaml", "--istio")
    assert istio.returncode == 0, istio.stderr
    assert ISTIO_CONFIG.read_text() == istio.stdout, (
        "regenerate: tokenmeter envoy-config --policy policies/example.yaml --istio -o envoy/istio/envoyfilter.yaml")
    assert sorted(p.name for p in (REPO_ROOT / "envoy").glob("*.yaml")) == ["envoy.yaml"], "one configuration"


def test_shipped_config_is_valid() -> None:
    result = _validate(SHIPPED_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_every_pool_of_the_policy_gets_a_cluster_and_its_routes(tmp_path: Path) -> None:
    policy = tmp_path / "three.yaml"
    policy.write_text(THREE_POOLS)
    out = tmp_path / "envoy.yaml"
    result = _cli("--policy", str(policy), "--processor", "unix:/run/tm.sock", "-o", str(out))
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"tokenmeter_processor", "h100_pool", "a100_pool", "cpu_pool"}
    h100_hosts = [e["endpoint"]["address"]["socket_address"]["address"]
                  for e in clusters["h100_pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert h100_hosts == ["gpu-a", "gpu-b"] and clusters["h100_pool"]["type"] == "STRICT_DNS"
    assert clusters["a100_pool"]["type"] == "STATIC"
    routed = [r["route"]["cluster"] for r in _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
              if "dynamic_metadata" in r["match"]]
    assert routed == [pool_cluster(p) for p in ("h100", "h100", "a100", "a100", "cpu", "cpu")]
    assert _validate(out).returncode == 0


def test_a_pool_without_endpoints_is_refused_with_its_name(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(THREE_POOLS.replace(', endpoints: ["cpu-pool:8000"]', ""))
    result = _cli("--policy", str(policy))
    assert result.returncode == 2 and "pool 'cpu' has no endpoints" in result.stderr


def test_rendered_loopback_config_is_valid(tmp_path: Path) -> None:
    config = render_local(
        SHIPPED_POLICY,
        listen_port=18080,
        admin_port=19901,
        processor=[Endpoint(uds=str(tmp_path / "tm.sock"))],
        pools={"h100": [Endpoint("127.0.0.1", 18001)], "a100": [Endpoint("127.0.0.1", 18003)],
               "cheap": [Endpoint("127.0.0.1", 18002)]},
        access_log_path=str(tmp_path / "access.log"),
    )
    result = _validate(write(config, tmp_path / "envoy.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_config_fails_validation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SHIPPED_CONFIG.read_text().replace("cluster: h100_pool", "cluster: 7"))
    assert _validate(bad).returncode != 0


def test_the_istio_envoyfilter_carries_the_same_filters_and_they_validate(tmp_path: Path) -> None:
    """Istio renders the filters, the settle access log and the routes of the standalone config; put
    back into a bootstrap (with Istio's cluster names), Envoy accepts them."""
    (envoy_filter,) = yaml.safe_load_all(ISTIO_CONFIG.read_text())
    patches = envoy_filter["spec"]["configPatches"]
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    hcm = _hcm(config)
    inserted = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert [f["name"] for f in inserted] == [f["name"] for f in hcm["http_filters"][:-1]]
    hcm["http_filters"][:-1] = inserted
    (merge,) = [p["patch"]["value"] for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    hcm["access_log"][1:] = merge["typed_config"]["access_log"]
    (vhost,) = [p["patch"]["value"] for p in patches if p["applyTo"] == "VIRTUAL_HOST"]
    hcm["route_config"]["virtual_hosts"][0].update(vhost)
    istio_clusters = {"outbound|50051||tokenmeter.tokenmeter.svc.cluster.local": "tokenmeter_processor",
                      "outbound|8000||model-h100": "h100_pool", "outbound|8000||model-a100": "a100_pool",
                      "outbound|8000||model-cheap": "cheap_pool"}
    for cluster in config["static_resources"]["clusters"]:
        renamed = next(k for k, v in istio_clusters.items() if v == cluster["name"])
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = renamed
    path = tmp_path / "istio-equivalent.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_is_asked_for_every_attribute_the_processor_reads() -> None:
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    ext_proc = next(f for f in _hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    assert set(ext_proc["typed_config"]["request_attributes"]) == set(ATTRIBUTE_HEADERS)


@pytest.mark.parametrize("flag", ["--istio", None])
def test_a_bad_policy_is_reported_with_file_and_line(tmp_path: Path, flag: str | None) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text(THREE_POOLS.replace("tokens_per_minute: 5000", "tokens_per_minute: -5"))
    result = _cli("--policy", str(policy), *([flag] if flag else []))
    assert result.returncode == 2 and f"{policy}:" in result.stderr


def test_the_response_meter_is_rendered_only_for_a_pool_that_reports_no_usage(tmp_path: Path) -> None:
    shipped = [f["name"] for f in _hcm(yaml.safe_load(SHIPPED_CONFIG.read_text()))["http_filters"]]
    assert "tokenmeter.meter" not in shipped  # every pool of the example reports usage
    policy = tmp_path / "counted.yaml"
    counted = 'endpoints: ["cpu-pool:8000"], reports_usage: false'
    policy.write_text(THREE_POOLS.replace('endpoints: ["cpu-pool:8000"]', counted))
    out = tmp_path / "envoy.yaml"
    assert _cli("--policy", str(policy), "-o", str(out)).returncode == 0
    assert "tokenmeter.meter" in [f["name"] for f in _hcm(yaml.safe_load(out.read_text()))["http_filters"]]


# -- identity: trusted headers (ext_authz), alone and with JWT issuers ------------------------

_SUBJECTS = "      - {sub: alice, limits: {tokens_per_minute: 1000}}\n"
_JWT = """
  jwt:
    - name: corp
      issuer: "https://idp.example"
      jwks: '{jwks}'
      tenant_claim: org
      default_project: chat
"""


def _identity_policy(tmp_path: Path, *, jwt: bool, authorizer: str) -> Path:
    """The example policy (acme/chat and its pools) with `identity.trusted_headers` (and a JWT issuer)."""
    text = THREE_POOLS + trusted_headers_section(authorizer, _SUBJECTS)
    text += _JWT.format(jwks=json.dumps(JWKS)) if jwt else ""
    path = tmp_path / "identity.yaml"
    path.write_text(text)
    return path


def _clusters_renamed(standalone: Any, istio: Any, out: dict[str, str]) -> dict[str, str]:
    """Standalone cluster name -> Istio's, read off the same filters and routes rendered both ways."""
    if isinstance(standalone, dict) and isinstance(istio, dict):
        for key, value in standalone.items():
            if key in ("cluster", "cluster_name") and isinstance(value, str) and isinstance(istio.get(key), str):
                out[value] = istio[key]
            elif key in istio:
                _clusters_renamed(value, istio[key], out)
    elif isinstance(standalone, list) and isinstance(istio, list):
        for a, b in zip(standalone, istio, strict=False):
            _clusters_renamed(a, b, out)
    return out


@pytest.mark.parametrize("jwt", [False, True], ids=["trusted-headers", "jwt-and-trusted-headers"])
def test_a_config_with_trusted_headers_is_valid(tmp_path: Path, jwt: bool) -> None:
    policy = _identity_policy(tmp_path, jwt=jwt, authorizer="authz.internal:9000")
    out = tmp_path / "envoy.yaml"
    result = _cli("--policy", str(policy), "-o", str(out))
    assert result.returncode == 0, result.stderr
    names = [f["name"] for f in _hcm(yaml.safe_load(out.read_text()))["http_filters"]]
    assert "envoy.filters.http.ext_authz" in names and ("envoy.filters.http.jwt_authn" in names) == jwt
    result = _validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("jwt", [False, True], ids=["trusted-headers", "jwt-and-trusted-headers"])
def test_the_istio_filters_with_trusted_headers_validate(tmp_path: Path, jwt: bool) -> None:
    """As the shipped Istio filters: put back into a bootstrap with Istio's cluster names (the
    authenticator's too), Envoy accepts them."""
    policy = _identity_policy(tmp_path, jwt=jwt, authorizer="sso.auth.svc.cluster.local:8080")
    standalone, istio = _cli("--policy", str(policy)), _cli("--policy", str(policy), "--istio")
    assert standalone.returncode == istio.returncode == 0, standalone.stderr + istio.stderr
    config = yaml.safe_load(standalone.stdout)
    (envoy_filter,) = yaml.safe_load_all(istio.stdout)
    patches = envoy_filter["spec"]["configPatches"]
    hcm = _hcm(config)
    inserted = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert [f["name"] for f in inserted] == [f["name"] for f in hcm["http_filters"][:-1]]
    (vhost,) = [p["patch"]["value"] for p in patches if p["applyTo"] == "VIRTUAL_HOST"]
    renamed = _clusters_renamed([hcm["http_filters"][:-1], hcm["route_config"]["virtual_hosts"][0]["routes"]],
                                [inserted, vhost["routes"]], {})
    assert renamed[AUTHORIZER_CLUSTER] == "outbound|8080||sso.auth.svc.cluster.local"
    hcm["http_filters"][:-1] = inserted
    (merge,) = [p["patch"]["value"] for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    hcm["access_log"][1:] = merge["typed_config"]["access_log"]
    hcm["route_config"]["virtual_hosts"][0].update(vhost)
    for cluster in config["static_resources"]["clusters"]:
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = renamed[cluster["name"]]
    path = tmp_path / "istio-equivalent.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
