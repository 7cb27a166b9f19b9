from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.envoy_config import NATIVE_CONFIG, OBSERVE_CONFIG, SHIPPED_CONFIG
from extproc.devstack.stack import Stack, StackOptions

E2E_POLICY = Path(__file__).parent / "policy.yaml"


@pytest.fixture(scope="session", params=[SHIPPED_CONFIG, OBSERVE_CONFIG, NATIVE_CONFIG],
    ids=["envoy", "envoy-observe", "envoy-native"],
)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real Envoy + processor + redis-server + two fake model pools, shared by the e2e tests; once with
    each shipped Envoy config (the response path blocking-and-answered, observed, or metered by Envoy)."""
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path_factory.mktemp("stack"), envoy_config=request.param)
    with Stack(opts) as s:
        yield s
