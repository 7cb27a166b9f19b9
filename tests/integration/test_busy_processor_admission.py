"""A busy processor and a healthy Redis (issue 10): the admission deadline is one of Redis's silence.

Several RedisLimiter instances (replicas) share one real redis-server and one tight key while their
event loop is saturated: a task burns the CPU in 60-100 ms slices (as a GC pause or a burst of JSON
would) and 32 clients keep reservations in flight. Redis answers each call in well under a millisecond,
but the loop reads the answers late, often past the 50 ms deadline. Measured before the fix: the
deadline fired on those calls, the breakers opened (6-14 times) and each replica's fail-open limiter
admitted its share on top of the full window Redis held: 941-1,200 tokens against a limit of 600 on
the pipelined connection, ~100 admissions decided locally in every variant. Now: not one degraded
admission, not one token over the limit. A Redis that really is silent (SIGSTOP) still degrades within
about a deadline, busy loop or not. The heavy variant (4 processes, 75 s) is bench/busy_admission.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import uvloop

from extproc.devstack.redis_proc import RedisProcess
from extproc.limiter import RedisLimiter, Reservation, ScopeLimit
from extproc.limiter.redis_backend import counter_key, redis_client
from extproc.limiter.resp import pack

TENANT = "acme"
LIMIT = 600  # tokens per minute on the one key everybody hammers
SCOPE = ScopeLimit.of("key:tight", tokens_per_minute=LIMIT)
REPLICAS = 4
CLIENTS = 32
DEADLINE_MS = 50

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main)


async def burn_cpu(stop: asyncio.Event, rng: random.Random, slices: tuple[float, float] = (0.06, 0.1)) -> None:
    """Block the event loop in slices of 60-100 ms, with a few ms of air between them."""
    while not stop.is_set():
        end = time.monotonic() + rng.uniform(*slices)
        while time.monotonic() < end:
            pass
        await asyncio.sleep(0.005)


@dataclass
class Tally:
    admitted_tokens: int = 0
    degraded_admissions: int = 0
    degraded_refusals: int = 0
    decisions: int = 0
    # (time.monotonic() when asked, when decided, degraded) of each decision
    log: list[tuple[float, float, bool]] = field(default_factory=list)


async def hammer(replicas: list[RedisLimiter], tally: Tally, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)

    async def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            tokens = rng.randint(1, 10)
            started = time.monotonic()
            d = await replicas[c % len(replicas)].reserve(Reservation(f"c{c}-{i}", TENANT, (SCOPE,), tokens))
            tally.log.append((started, time.monotonic(), d.degraded))
            tally.decisions += 1
            if d.allowed:
                tally.admitted_tokens += tokens
                tally.degraded_admissions += d.degraded
                replicas[c % len(replicas)].settle(TENANT, f"c{c}-{i}", tokens)
            elif d.degraded:
                tally.degraded_refusals += 1
            i += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))


async def redis_window(url: str) -> int:
    client = redis_client(url, timeout_s=5.0)
    try:
        key = counter_key(TENANT, SCOPE.scope, SCOPE.rules[0].counter)
        members = cast(list[bytes], await client.zrange(key, 0, -1))
        return sum(int(m.split(b"|")[0]) + int(m.split(b"|")[1]) for m in members if not m.startswith(b"#"))
    finally:
        await client.aclose()


@pytest.fixture(params=["pipelined-asyncio", "pipelined-uvloop", "redis-py", "cluster"])
def setup(request: pytest.FixtureRequest) -> tuple[str, str, bool]:
    """(loop, url, fast): the pipelined connection on both loops; redis-py (TLS URLs take it) and a
    Redis Cluster, whose watch sees answers, not unread bytes."""
    kind = str(request.param)
    if kind == "cluster":
        return "asyncio", str(request.getfixturevalue("redis_cluster_url")), False
    url = str(request.getfixturevalue("redis_url"))
    if kind == "redis-py":
        return "asyncio", url, False
    return kind.removeprefix("pipelined-"), url, True


def test_a_saturated_event_loop_never_turns_a_healthy_redis_into_degraded_admissions(
    setup: tuple[str, str, bool],
) -> None:
    loop, redis_url, fast = setup

    async def main() -> None:
        replicas = [
            RedisLimiter.from_url(redis_url, deadline_ms=DEADLINE_MS, on_failure="fail_open", replicas_hint=REPLICAS,
                                  fast=fast)
            for _ in range(REPLICAS)
        ]
        tally = Tally()
        stop = asyncio.Event()
        try:
            for lim in replicas:
                await lim.start()
            work = asyncio.gather(burn_cpu(stop, random.Random(1)), hammer(replicas, tally, stop, seed=2))
            await asyncio.sleep(1.5)
            stop.set()
            await work
            for lim in replicas:
                await lim.flush()
            held = await redis_window(redis_url)
        finally:
            for lim in replicas:
                await lim.aclose()

        # no replica decided without Redis, and nothing got past the limit
        assert tally.degraded_admissions == 0, f"{tally.degraded_admissions} admissions decided locally"
        assert sum(lim.fail_open_decisions for lim in replicas) == 0
        assert tally.admitted_tokens <= LIMIT, f"{tally.admitted_tokens} tokens admitted, limit {LIMIT}"
        assert held <= LIMIT
        assert sum(lim.breaker.opened for lim in replicas) == 0
        assert sum(lim.backend_errors for lim in replicas) == 0
        # the busy loop did read answers past the deadline (the case this is about), and in time: the
        # pipelined connection sees answers waiting unread, so it never refuses; redis-py's watch, blind
        # to those, refuses some (503) at max_wait when the loop is this blocked (more on a loaded
        # machine), and never decides locally
        assert sum(lim.late_answers for lim in replicas) > 0
        refused = sum(lim.busy_refusals for lim in replicas)
        assert tally.degraded_refusals == refused
        if fast:
            assert refused == 0
        assert tally.admitted_tokens > LIMIT // 2 and tally.decisions > 200

    run(loop, main())


@pytest.mark.parametrize("busy", [False, True], ids=["idle-loop", "busy-loop"])
def test_a_redis_that_goes_silent_still_degrades_within_about_a_deadline(own_redis: RedisProcess, busy: bool) -> None:
    """Traffic flows (the connection has just been answering), then Redis is SIGSTOPped: the calls in
    flight degrade about a deadline after Redis's last answer (plus, on a busy loop, the slice the loop
    was blocked in), not at max_wait; then the breaker opens and nothing waits on Redis."""
    deadline = 0.1
    slices = (0.06, 0.1)

    async def main() -> None:
        replicas = [
            RedisLimiter.from_url(own_redis.url, deadline_ms=deadline * 1000, max_wait_ms=2000,
                                  replicas_hint=REPLICAS, breaker_cooldown_s=30, settle_timeout_s=0.2)
            for _ in range(2)
        ]
        tally = Tally()
        stop = asyncio.Event()
        try:
            for lim in replicas:
                await lim.start()
            jobs = [hammer(replicas, tally, stop, seed=3)]
            if busy:
                jobs.append(burn_cpu(stop, random.Random(4), slices))
            work = asyncio.gather(*jobs)
            await asyncio.sleep(0.4)
            assert tally.decisions > 0 and not any(degraded for _, _, degraded in tally.log)
            own_redis.pause()
            paused_at = time.monotonic()
            await asyncio.sleep(0.6)
            stop.set()
            await work
        finally:
            own_redis.resume()
            for lim in replicas:
                await lim.aclose()

        first_degraded = min(end for _, end, degraded in tally.log if degraded)
        bound = deadline + (slices[1] if busy else 0.0) + 0.1
        assert first_degraded - paused_at < bound, (
            f"degraded {first_degraded - paused_at:.3f}s after the pause (bound {bound:.3f}s)")
        # no call waited much longer than that, none until max_wait (2 s)
        assert max(end - start for start, end, _ in tally.log) < bound + deadline
        assert all(lim.breaker.opened == 1 for lim in replicas)
        assert all(lim.busy_refusals == 0 for lim in replicas)
        assert sum(lim.fail_open_decisions for lim in replicas) > 0

    run("asyncio", main())


async def reserve_behind_a_blocked_loop(lim: RedisLimiter, rid: str, tokens: int, block_s: float) -> Any:
    """Send the admission, then block the event loop for `block_s` (Redis answers meanwhile, unread)."""
    task = asyncio.ensure_future(lim.reserve(Reservation(rid, TENANT, (SCOPE,), tokens)))
    await asyncio.sleep(0)  # the EVALSHA is written
    time.sleep(block_s)  # noqa: ASYNC251 (the point: a loop too busy to read the reply)
    return await task


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_answer_read_after_the_deadline_is_used_not_replaced_by_a_local_decision(
    own_redis: RedisProcess, loop: str
) -> None:
    async def main() -> None:
        lim = RedisLimiter.from_url(own_redis.url, deadline_ms=50)  # max_wait: the default, 300 ms
        try:
            await lim.start()
            d = await reserve_behind_a_blocked_loop(lim, "late", 100, 0.15)
            assert d.allowed and not d.degraded
            assert (lim.late_answers, lim.backend_errors, lim.fail_open_decisions) == (1, 0, 0)
            assert await redis_window(own_redis.url) == 100
        finally:
            await lim.aclose()

    run(loop, main())


# A Lua busy loop of ARGV[1] iterations (ARGV[2]: padding, so Redis reads about one such command per
# read of its event loop and writes the replies of each read before the next: replies keep flowing)
SPIN = "local i = 0 local n = tonumber(ARGV[1]) while i < n do i = i + 1 end return i"


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_answer_that_comes_after_max_wait_while_redis_keeps_answering_is_refused_and_taken_back(
    own_redis: RedisProcess, loop: str
) -> None:
    """Redis answers, just not this admission in time: ~800 ms of 10 ms scripts are queued ahead of it
    on its connection, their replies arriving every 10-20 ms (Redis is alive: never a local decision).
    At max_wait (200 ms) the admission is refused like fail_closed (busy_refusals), the breaker is not
    counted against, and the reservation its script makes later is cancelled when its reply comes."""

    async def main() -> None:
        lim = RedisLimiter.from_url(own_redis.url, deadline_ms=80, max_wait_ms=200, on_failure="fail_open")
        try:
            await lim.start()
            assert lim._fast is not None
            proto = await lim._fast.connection()
            started = time.monotonic()
            await proto.send(pack(("EVAL", SPIN, 0, 200_000)))
            ten_ms = int(200_000 * 0.01 / (time.monotonic() - started))
            # (twice the max_wait and more, so that a calibration slowed down by a busy machine, which
            # makes the scripts shorter than 10 ms, still leaves the admission waiting past max_wait)
            ahead = [proto.send(pack(("EVAL", SPIN, 0, ten_ms, "x" * 12_000))) for _ in range(80)]
            started = time.monotonic()
            d = await lim.reserve(Reservation("behind", TENANT, (SCOPE,), 100))
            waited = time.monotonic() - started
            assert (d.allowed, d.denied_kind, d.degraded) == (False, "backend", True)
            assert (lim.busy_refusals, lim.fail_open_decisions, lim.backend_errors) == (1, 0, 0)
            assert 0.19 < waited < 0.3 and lim.breaker.state == "closed"
            assert not all(f.done() for f in ahead)
            await asyncio.gather(*ahead)
            for _ in range(100):  # its late reply (an admission) is read, its cancellation queued and applied
                await lim.flush()
                if lim.settled:
                    break
                await asyncio.sleep(0.01)
            assert await redis_window(own_redis.url) == 0
            assert (await lim.reserve(Reservation("next", TENANT, (SCOPE,), LIMIT))).allowed
        finally:
            await lim.aclose()

    run(loop, main())
