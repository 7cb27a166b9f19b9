"""What the processor derives from the live policy for a caller (scope path, pool ceilings) is
computed once per policy, and follows a reload at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from extproc.limiter.types import Decision, Measure, Reservation
from extproc.policy import load_policy
from extproc.policy.model import Limits, Policy
from extproc.service.processor import Context, StreamProcessor
from tests.unit.recorders import ListSink
from tests.unit.test_native_admission_and_settlement import CHAT, body_only

POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"


class Live:
    def __init__(self, policy: Policy) -> None:
        self.current = policy


class Recording:
    def __init__(self) -> None:
        self.reserved: list[Reservation] = []

    async def reserve(self, r: Reservation) -> Decision:
        self.reserved.append(r)
        return Decision(allowed=True, pool=r.pools[0].name if r.pools else None)

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_a_reloaded_policy_changes_the_limits_of_the_next_request() -> None:
    live = Live(load_policy(POLICY))
    limiter = Recording()
    ctx = Context(live, limiter, ListSink())
    await StreamProcessor(ctx).handle(body_only(CHAT))
    await StreamProcessor(ctx).handle(body_only(CHAT))
    first, second = limiter.reserved
    assert first.scopes is second.scopes  # derived once for the key, not per request

    keys = dict(live.current.keys_by_sha256)
    digest, key = next((d, k) for d, k in keys.items() if k.key_id == "e2e-basic")
    keys[digest] = replace(key, limits=Limits.of(tokens_per_minute=12_345))
    live.current = replace(live.current, version="edited", keys_by_sha256=keys)
    await StreamProcessor(ctx).handle(body_only(CHAT))
    third = limiter.reserved[2]
    key_scope = next(s for s in third.scopes if s.scope == "key:e2e-basic")
    assert [(r.measure, r.limit, r.window_s) for r in key_scope.rules] == [(Measure.TOKENS, 12_345, 60.0)]
