"""Budget-aware routing through real Envoy, two processor replicas and Redis: each model goes to the
first pool that serves it and has headroom under its tokens-per-minute ceiling; a pool that spilled
takes traffic again only below its low line (hysteresis); fair shares lend an idle owner's guarantee
and give it back when the owner returns; and when every pool is full, the client gets a 429 with an
honest Retry-After, or waits up to `routing.max_wait_ms` for room.

The processors run with `--window-scale 0.05`, so a pool's minute lasts POOL_MINUTE_S seconds. Every
request here sends the text "a b": the processor's admission estimate of its prompt (1 token + 4 per
message) is what the fake server counts (2 words + 3 per message), so a request reserves exactly what
it uses, `prompt + max_tokens`, and the pool arithmetic below is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy import hash_key
from tests.e2e.client import Reply, chat_model, fake_served, open_stream, usage_records, wait_for, wait_record

WINDOW_SCALE = 0.05
POOL_MINUTE_S = 60 * WINDOW_SCALE
TEXT = "a b"
PROMPT = 5  # what TEXT reserves and what the fake server counts for it

H100, A100 = 2000, 2800  # ceilings (tokens per minute); cheap has none
OWNER_GUARANTEE, OWNER_MAX = 1000, 1500  # 50 % and 75 % of h100

BIG, SMALL, UNIT = 600, 150, 200  # reserved tokens per request

PLAIN, OWNER, BORROWER = "rt-plain-key", "rt-owner-key", "rt-borrower-key"
WAITER = "rt-waiter-key"

POLICY = f"""\
# Budget-aware routing (tests/e2e/test_routing.py): h100 for rt-llama only, a100, and the cheap
# overflow pool; rt-orphan is served by no pool.
version: "routing-1"
mode: enforce
request:
  default_max_tokens: 64
  max_tokens_cap: 2048
models: ["rt-llama", "rt-mini", "rt-orphan"]
pools:
  - name: h100
    tokens_per_minute: {H100}
    endpoints: ["model-h100:8000"]
    models: ["rt-llama"]
    shares:
      owner: {{guaranteed: "50%", max: "75%"}}
  - name: a100
    tokens_per_minute: {A100}
    endpoints: ["model-a100:8000"]
    models: ["rt-llama", "rt-mini"]
  - name: cheap
    endpoints: ["model-cheap:8000"]
    models: ["rt-llama", "rt-mini"]
routing: {{hysteresis_percent: 10}}
tenants:
  plain: {{projects: {{batch: {{}}}}}}
  owner: {{projects: {{batch: {{}}}}}}
  borrower: {{projects: {{batch: {{}}}}}}
keys:
  - {{id: rt-plain, sha256: "{hash_key(PLAIN)}", tenant: plain, project: batch}}
  - {{id: rt-owner, sha256: "{hash_key(OWNER)}", tenant: owner, project: batch}}
  - {{id: rt-borrower, sha256: "{hash_key(BORROWER)}", tenant: borrower, project: batch}}
"""

GPU = 1200  # ceiling of each of the two pools of the policy without overflow
MAX_WAIT_MS = 1500

NO_OVERFLOW_POLICY = f"""\
# Two pools with ceilings and no overflow pool; a bounded wait for room; the pool is not shown.
version: "routing-wait-1"
models: ["rt-llama"]
pools:
  - name: gpu1
    tokens_per_minute: {GPU}
    endpoints: ["model-gpu1:8000"]
  - name: gpu2
    tokens_per_minute: {GPU}
    endpoints: ["model-gpu2:8000"]
routing: {{hysteresis_percent: 0, max_wait_ms: {MAX_WAIT_MS}, show_pool: false}}
tenants:
  waiter: {{projects: {{batch: {{}}}}}}
keys:
  - {{id: rt-waiter, sha256: "{hash_key(WAITER)}", tenant: waiter, project: batch}}
"""


@dataclass
class Routed:
    """A stack and when it last saw traffic: a test starts once every pool window has drained."""

    stack: Stack
    last: float = 0.0

    def quiet(self) -> None:
        """Wait until the pools' windows, spill flags and demand marks of earlier requests are gone."""
        rest = self.last + POOL_MINUTE_S + 0.5 - time.monotonic()
        if rest > 0:
            time.sleep(rest)


def _stack(tmp: Path, text: str, processors: int) -> Stack:
    policy = tmp / "policy.yaml"
    policy.write_text(text)
    # Redis decides every admission here: a loaded test machine must not make a processor decide
    # locally (fail-open, degraded) because Redis answered later than the default 50 ms
    return Stack(StackOptions(policy=policy, run_dir=tmp / "stack", processors=processors,
                              processor_extra=("--window-scale", str(WINDOW_SCALE), "--redis-deadline-ms", "400")))


@pytest.fixture(scope="module")
def routing_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    with _stack(tmp_path_factory.mktemp("routing"), POLICY, processors=2) as s:
        assert set(s.pool_ports) == {"h100", "a100", "cheap"}, "one fake model server per pool"
        yield Routed(s)


@pytest.fixture
def routed(routing_stack: Routed) -> Iterator[Stack]:
    routing_stack.quiet()
    yield routing_stack.stack
    routing_stack.last = time.monotonic()


@pytest.fixture(scope="module")
def no_overflow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    with _stack(tmp_path_factory.mktemp("routing-wait"), NO_OVERFLOW_POLICY, processors=1) as s:
        yield Routed(s)


@pytest.fixture
def no_overflow(no_overflow_stack: Routed) -> Iterator[Stack]:
    no_overflow_stack.quiet()
    yield no_overflow_stack.stack
    no_overflow_stack.last = time.monotonic()


def send(stack: Stack, key: str, tokens: int, model: str = "rt-llama") -> Reply:
    """A chat completion that reserves (and uses) exactly `tokens`."""
    return chat_model(stack.base_url, key, model, max_tokens=tokens - PROMPT, text=TEXT)


def pool_of(reply: Reply) -> str:
    """The pool that served a 200: the processor's header and the fake server's must agree."""
    assert reply.status == 200, reply.body
    assert reply.headers.get("x-tokenmeter-pool") == reply.headers["x-fake-pool"], reply.headers
    return reply.headers["x-fake-pool"]


def rid(reply: Reply) -> str:
    return reply.headers["x-tokenmeter-request-id"]


def served_by(stack: Stack, pool: str, ids: set[str]) -> list[dict[str, Any]]:
    return [e for e in fake_served(stack.pool_ports[pool]) if e["x_tokenmeter_request_id"] in ids]


# -- order and spilling ----------------------------------------------------------------------


def test_below_the_h100_ceiling_everything_goes_to_h100(routed: Stack) -> None:
    replies = [send(routed, PLAIN, BIG) for _ in range(3)] + [send(routed, PLAIN, SMALL)]
    assert [pool_of(r) for r in replies] == ["h100"] * 4  # 1950 of 2000
    # the arithmetic of every test here: each request reserves, and the server counts, what it planned
    for reply, planned in zip(replies, [BIG, BIG, BIG, SMALL], strict=True):
        assert wait_record(routed.usage_log, rid(reply))["reserved_tokens"] == planned
    entries = served_by(routed, "h100", {rid(r) for r in replies})
    assert sorted(e["prompt_tokens"] + e["completion_tokens"] for e in entries) == sorted(
        [BIG, BIG, BIG, SMALL])


def test_overflow_spills_in_order_with_hysteresis_and_returns_to_h100_once_the_window_drains(routed: Stack) -> None:
    plan = [
        (BIG, "h100"), (BIG, "h100"), (BIG, "h100"),  # h100: 1800
        (BIG, "a100"),  # 2400 would pass h100's ceiling: h100 spills
        # h100 has room for 150 under its ceiling (1950), but not under its low line (1800): below the
        # ceiling, the same request went to h100 (test above); spilling, it stays on a100
        (SMALL, "a100"),
        (BIG, "a100"), (BIG, "a100"), (BIG, "a100"),  # a100: 600 + 150 + 1800 = 2550
        (BIG, "cheap"),  # 3150 would pass a100's ceiling
        (SMALL, "cheap"),  # a100 has room under 2800, not under its low line 2520
        (BIG, "cheap"),
    ]
    got = [pool_of(send(routed, PLAIN, tokens)) for tokens, _ in plan]
    assert got == [pool for _, pool in plan]
    # h100's requests leave its window together: from then on h100 serves again (poll, no timing)
    seen: list[str] = []

    def back_on_h100() -> bool:
        time.sleep(0.1)
        seen.append(pool_of(send(routed, PLAIN, SMALL)))
        return seen[-1] == "h100"

    assert wait_for(back_on_h100, timeout=4 * POOL_MINUTE_S), seen
    assert "h100" not in seen[:-1]
    assert [pool_of(send(routed, PLAIN, BIG)) for _ in range(2)] == ["h100", "h100"]


def test_a_model_goes_only_to_the_pools_that_serve_it(routed: Stack) -> None:
    mini = [pool_of(send(routed, PLAIN, BIG, model="rt-mini")) for _ in range(6)]
    assert mini == ["a100"] * 4 + ["cheap"] * 2, "rt-mini is not served by h100, though h100 is empty"
    assert pool_of(send(routed, PLAIN, BIG)) == "h100"
    orphan = send(routed, PLAIN, BIG, model="rt-orphan")
    assert orphan.status == 404
    assert orphan.json()["error"]["code"] == "model_not_found"
    assert "x-fake-pool" not in orphan.headers
    assert not any(e["x_tokenmeter_request_id"] == rid(orphan)
                   for pool in routed.pool_ports for e in fake_served(routed.pool_ports[pool]))


def test_the_ceiling_holds_across_both_replicas_under_concurrent_load(routed: Stack) -> None:
    n = 48  # 9600 tokens: far beyond h100 + a100
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(lambda _: send(routed, PLAIN, UNIT), range(n)))
    pools = [pool_of(r) for r in replies]
    ids = {rid(r) for r in replies}
    # request ids start with the replica that admitted them: both replicas decided
    assert len({i.split("-")[0] for i in ids}) == 2, ids

    def all_recorded() -> dict[str, dict[str, Any]] | None:
        found = {r["request_id"]: r for r in usage_records(routed.usage_log) if r["request_id"] in ids}
        return found if len(found) == n else None

    records = wait_for(all_recorded)
    assert records, "every request has its usage record"
    assert not [r for r in records.values() if r["degraded"]], "every admission was decided on Redis"
    slack = 0.5  # a record's time is when its headers came, a little before its reservation
    for name, ceiling in (("h100", H100), ("a100", A100)):
        entries = served_by(routed, name, ids)
        assert len(entries) == pools.count(name)
        used = [(records[e["x_tokenmeter_request_id"]]["time"],
                 e["prompt_tokens"] + e["completion_tokens"],
                 records[e["x_tokenmeter_request_id"]]["reserved_tokens"]) for e in entries]
        assert all(counted <= reserved for _, counted, reserved in used), "the server never counts more"
        for start, _, _ in used:
            window = [(t, c, r) for t, c, r in used if start <= t < start + POOL_MINUTE_S - slack]
            detail = (name, [(round(t - start, 3), c, r) for t, c, r in window])
            assert sum(r for _, _, r in window) <= ceiling, detail
            assert sum(c for _, c, _ in window) <= ceiling, detail
        # it spilled only when full: the next request would have passed the ceiling
        assert sum(r for _, _, r in used) > ceiling - UNIT, (name, used)
    assert pools.count("cheap") > 0


def test_a_stream_admitted_to_h100_finishes_there_after_h100_starts_spilling(routed: Stack) -> None:
    stream = open_stream(routed.base_url, PLAIN, model="rt-llama", max_tokens=30, text=TEXT,
                         extra_headers={"x-fake-chunk-delay-ms": "100"})
    assert stream.status == 200
    assert stream.headers["x-tokenmeter-pool"] == stream.headers["x-fake-pool"] == "h100"
    stream_id = stream.headers["x-tokenmeter-request-id"]
    after = [pool_of(send(routed, PLAIN, BIG)) for _ in range(4)]
    assert after == ["h100"] * 3 + ["a100"], "h100 is spilling"
    assert not served_by(routed, "h100", {stream_id}), "the stream is still running"
    reply = stream.finish()
    assert reply.complete
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in reply.sse_data() if c.get("choices"))
    assert text.split() == [f"tok{i}" for i in range(30)]
    [entry] = served_by(routed, "h100", {stream_id})
    assert entry["completed"] is True and entry["completion_tokens"] == 30
    assert wait_record(routed.usage_log, stream_id)["pool"] == "h100"
    for other in ("a100", "cheap"):
        assert not served_by(routed, other, {stream_id})


# -- fair share ------------------------------------------------------------------------------


def test_a_borrower_gives_an_owners_guarantee_back_when_the_owner_returns(routed: Stack) -> None:
    # The owner is idle: the borrower may take all of h100, the owner's guarantee included. Its
    # requests are spread out, so they leave the window one by one.
    borrowed: list[str] = []
    while not borrowed or borrowed[-1] == "h100":
        borrowed.append(pool_of(send(routed, BORROWER, UNIT)))
        time.sleep(0.15)
        assert len(borrowed) <= H100 // UNIT + 1, borrowed
    assert borrowed[-1] == "a100"
    assert (len(borrowed) - 1) * UNIT > H100 - OWNER_GUARANTEE, "the idle owner's guarantee was lent"
    # The owner returns to a full h100: it is refused there (and served by a100)...
    assert pool_of(send(routed, OWNER, UNIT)) == "a100"
    # ...and from now on the borrower is refused first. As the borrowed tokens leave the window, the
    # room goes to the owner, though the borrower asks for it first each round.
    rounds: list[tuple[str, str]] = []

    def owner_back() -> bool:
        borrower = pool_of(send(routed, BORROWER, UNIT))
        owner = pool_of(send(routed, OWNER, UNIT))
        rounds.append((borrower, owner))
        time.sleep(0.05)
        return sum(o == "h100" for _, o in rounds) >= 2

    assert wait_for(owner_back, timeout=3 * POOL_MINUTE_S), rounds
    assert "h100" not in [b for b, _ in rounds], rounds


def test_an_owners_max_caps_what_it_takes_of_the_pool(routed: Stack) -> None:
    owner = [pool_of(send(routed, OWNER, UNIT)) for _ in range(OWNER_MAX // UNIT + 1)]
    assert owner == ["h100"] * (OWNER_MAX // UNIT) + ["a100"], "7 x 200 fit its max of 1500, the 8th does not"
    assert pool_of(send(routed, PLAIN, UNIT)) == "h100", "h100 itself had room: 1600 of 2000"
    assert pool_of(send(routed, OWNER, UNIT)) == "a100"


# -- every pool full -------------------------------------------------------------------------


def test_the_pool_is_not_shown_when_the_policy_says_so(no_overflow: Stack) -> None:
    reply = send(no_overflow, WAITER, UNIT)
    assert reply.status == 200
    assert reply.headers["x-fake-pool"] == "gpu1"
    assert "x-tokenmeter-pool" not in reply.headers


def test_every_pool_full_is_a_429_with_retry_after_or_a_bounded_wait_for_room(no_overflow_stack: Routed) -> None:
    stack = no_overflow_stack.stack
    proved = False
    for _ in range(3):  # until a request is seen arriving while every pool was full (a slow client retries)
        no_overflow_stack.quiet()
        started = time.monotonic()
        fill = [send(stack, WAITER, GPU // 2) for _ in range(4)]
        assert [r.headers["x-fake-pool"] for r in fill] == ["gpu1", "gpu1", "gpu2", "gpu2"]
        # room is due when the first request leaves the window: longer from now than the wait allows
        refused = send(stack, WAITER, GPU // 2)
        assert refused.status == 429, refused.body
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= math.ceil(POOL_MINUTE_S)
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "no model pool has capacity" in error["message"]
        record = wait_record(stack.usage_log, rid(refused))
        assert record["status"] == 429
        assert record["decided_by"] == {"scope": "pool", "kind": "pool", "action": "throttle"}
        # Sent while both pools are still full, shortly before room is due: it waits, then is served.
        time.sleep(max(0.0, started + POOL_MINUTE_S - MAX_WAIT_MS / 2000 - time.monotonic()))
        waited = send(stack, WAITER, GPU // 2)
        no_overflow_stack.last = time.monotonic()
        assert waited.status == 200, waited.body
        assert waited.headers["x-fake-pool"] == "gpu1", "gpu1's requests leave the window first"
        # the proof that it waited: it arrived before the first of the full pools' requests left
        first = wait_record(stack.usage_log, rid(fill[0]))["time"]
        if wait_record(stack.usage_log, rid(waited))["time"] < first + POOL_MINUTE_S - 0.2:
            proved = True
            break
    assert proved, "no request arrived while every pool was full (the client was too slow to tell)"
