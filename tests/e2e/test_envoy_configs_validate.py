"""Every Envoy config we ship, and the loopback rendering the tests run, passes `envoy --mode validate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.devstack import envoy_config
from extproc.devstack.binaries import find_envoy
from extproc.devstack.envoy_config import REPO_ROOT, Endpoint

SHIPPED = sorted((REPO_ROOT / "envoy").glob("*.yaml"))


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_envoy_config_is_valid(path: Path) -> None:
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_rendered_loopback_config_is_valid(tmp_path: Path) -> None:
    config = envoy_config.render(
        listen_port=18080,
        admin_port=19901,
        clusters={
            "tokenmeter_processor": [Endpoint(uds=str(tmp_path / "tm.sock"))],
            "h100_pool": [Endpoint("127.0.0.1", 18001)],
            "cheap_pool": [Endpoint("127.0.0.1", 18002)],
        },
        access_log_path=str(tmp_path / "access.log"),
    )
    result = _validate(envoy_config.write(config, tmp_path / "envoy.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_config_fails_validation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO_ROOT / "envoy" / "envoy.yaml").read_text().replace("cluster: h100_pool", "cluster: 7"))
    assert _validate(bad).returncode != 0


def test_istio_envoyfilter_patch_is_a_valid_envoy_filter(tmp_path: Path) -> None:
    """The filter the Istio EnvoyFilter inserts is validated by Envoy inside the shipped bootstrap,
    and it matches the shipped filter (same processing mode and header rules)."""
    import yaml

    patch = yaml.safe_load((REPO_ROOT / "envoy" / "istio" / "envoyfilter.yaml").read_text())
    istio_filter = patch["spec"]["configPatches"][0]["patch"]["value"]
    config = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    shipped_filter = hcm["http_filters"][0]
    for field in ("processing_mode", "forward_rules", "metadata_options", "failure_mode_allow", "response_attributes"):
        assert istio_filter["typed_config"][field] == shipped_filter["typed_config"][field], field
    vhost_patch = patch["spec"]["configPatches"][1]["patch"]["value"]
    shipped_vhost = hcm["route_config"]["virtual_hosts"][0]
    assert vhost_patch["response_headers_to_add"] == shipped_vhost["response_headers_to_add"]
    hcm["http_filters"][0] = istio_filter
    config["static_resources"]["clusters"][0]["name"] = "outbound|50051||tokenmeter.tokenmeter.svc.cluster.local"
    path = tmp_path / "istio-equivalent.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_observe_variant_is_generated_from_the_main_config() -> None:
    import yaml

    shipped = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text())
    observe = yaml.safe_load((REPO_ROOT / "envoy" / "envoy-observe.yaml").read_text())
    assert observe == envoy_config.observe_variant(shipped), "regenerate: see the header of envoy-observe.yaml"


def test_native_variant_is_generated_from_the_main_config() -> None:
    import yaml

    shipped = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text())
    native = yaml.safe_load((REPO_ROOT / "envoy" / "envoy-native.yaml").read_text())
    assert native == envoy_config.native_variant(shipped), "regenerate: see the header of envoy-native.yaml"


def test_native_variant_asks_envoy_for_every_attribute_the_processor_reads() -> None:
    from extproc.service import processor

    native = envoy_config.native_variant(envoy_config.render(listen_port=1, admin_port=2, clusters={}))
    hcm = native["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    assert set(ext_proc["typed_config"]["request_attributes"]) == set(processor._ATTRIBUTE_HEADERS)
