"""Budget-aware routing with the example policy: h100 up to its tokens-per-minute ceiling, then cheap."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.devstack.stack import DEFAULT_POLICY, Stack, StackOptions
from tests.e2e.client import chat, fake_stats

ACME_BATCH = "tm-demo-acme-batch"  # demo key of policies/example.yaml (h100 ceiling 3000 tokens/min)


@pytest.fixture(scope="module")
def example_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(StackOptions(policy=DEFAULT_POLICY, run_dir=tmp_path_factory.mktemp("overflow"))) as s:
        yield s


def test_overflow_beyond_the_h100_ceiling_is_served_by_the_cheap_pool(example_stack: Stack) -> None:
    pools = []
    for _ in range(12):
        reply = chat(example_stack.base_url, ACME_BATCH, max_tokens=400)
        assert reply.status == 200, reply.body
        pools.append(reply.headers["x-fake-pool"])
    first_cheap = pools.index("cheap")
    assert first_cheap >= 1, pools
    assert set(pools[:first_cheap]) == {"h100"}
    assert set(pools[first_cheap:]) == {"cheap"}, "once h100 is at its ceiling, overflow stays on cheap"
    h100 = fake_stats(example_stack.pool_ports["h100"])
    # Reserved (prompt estimate + 400) per request never pushes h100 past 3000 tokens in the minute.
    assert h100["prompt_tokens"] + h100["completion_tokens"] <= 3000
    assert fake_stats(example_stack.pool_ports["cheap"])["requests"] == 12 - first_cheap


def test_routing_follows_the_processor_even_when_the_client_asks_for_h100(example_stack: Stack) -> None:
    reply = chat(example_stack.base_url, ACME_BATCH, max_tokens=400, extra_headers={"x-tokenmeter-pool": "h100"})
    assert reply.status == 200
    assert reply.headers["x-fake-pool"] == "cheap"

