"""A concurrency slot outlives the processor replica that admitted its request: the request goes on,
holds the slot on the other replica, and its end (reported by Envoy to the surviving replica)
releases it. Its own stack, since a replica is killed."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import yaml

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy.keys import hash_key
from tests.e2e.client import Reply, chat, open_stream, wait_for
from tests.e2e.conftest import E2E_POLICY

pytestmark = pytest.mark.e2e

KEY = "e2e-one-slot-key"


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("release")
    doc = yaml.safe_load(E2E_POLICY.read_text())
    doc["keys"].append({"id": "one-slot", "sha256": hash_key(KEY), "tenant": "acme", "project": "chat",
                        "limits": {"concurrent_requests": 1}})
    policy = run / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    with Stack(StackOptions(policy=policy, run_dir=run / "run", processors=2)) as s:
        yield s


def test_the_slot_is_released_after_the_admitting_replica_is_killed(stack: Stack) -> None:
    stream = open_stream(stack.base_url, KEY, max_tokens=30, text="a b", extra_headers={"x-fake-chunk-delay-ms": "100"})
    assert stream.status == 200
    admitted_by = stream.headers["x-tokenmeter-request-id"].split("-", 1)[0]
    # the request id's prefix ends with the replica's pid in hex
    victim = next(p for p in stack.procs if p.name.startswith("processor") and admitted_by.endswith(f"{p.popen.pid:x}"))
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(timeout=10)

    probes: list[Reply] = []

    def refused_for_the_slot() -> bool:
        probe = chat(stack.base_url, KEY, max_tokens=1, text="a b")
        probes.append(probe)
        assert probe.status != 200, "admitted while the first request was still streaming"
        return probe.status == 429  # the survivor's answer (Envoy fails closed on the dead one)

    assert wait_for(refused_for_the_slot), [(p.status, p.body) for p in probes]
    assert b"requests in flight (limit 1)" in probes[-1].body

    done = stream.finish()
    assert done.complete and done.body.rstrip().endswith(b"data: [DONE]")  # the request outlived its replica

    def admitted() -> bool:
        probe = chat(stack.base_url, KEY, max_tokens=1, text="a b")
        probes.append(probe)
        return probe.status == 200

    assert wait_for(admitted, timeout=10.0), [(p.status, p.body) for p in probes[-3:]]
