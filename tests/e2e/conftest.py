from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.stack import Stack, StackOptions

E2E_POLICY = Path(__file__).parent / "policy.yaml"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real Envoy (the configuration generated from the e2e policy) + processor + redis-server + a
    fake model server per pool, shared by the e2e tests."""
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path_factory.mktemp("stack"))
    with Stack(opts) as s:
        yield s
