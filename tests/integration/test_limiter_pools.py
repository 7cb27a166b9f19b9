"""Pools, on every backend (in-memory, a real redis-server, a real 3-node Redis Cluster): the first pool in
order with room; spill hysteresis; fair shares (guarantees lent while their owner is idle, given back when
it returns, an owner's maximum); the retry-after of a pool denial and too_large; settlement of a pool
reservation; and the fail-open limiter's per-replica share of pools.

Harness as in test_limiter_conformance.py: a pool's minute lasts WINDOW seconds (memory: a fake clock,
exact; Redis: real waits, assertions allow for the time that passes). On a cluster the pools are reserved
by separate calls on their shards, after the tenant's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from extproc.limiter import InMemoryLimiter, PoolCeiling, Reservation, ScopeLimit
from extproc.limiter.types import Measure, Rule
from tests.integration.limiter_harness import BACKENDS, SCALE, TENANT, WINDOW, FakeClock, Harness, harness

KEY = "key:acme-web"
TPM = Rule(Measure.TOKENS, 100_000, window_s=60.0)
SCOPE = ScopeLimit(KEY, (TPM,))
SPARE = PoolCeiling("spare")  # no ceiling: always room
ACME, GLOBEX, INITECH = "acme", "globex", "initech"  # tenants, and the owners of their shares


@pytest.fixture(params=BACKENDS)
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with harness(request) as hh:
        yield hh


# -- the first pool with room, spilling and hysteresis ------------------------------------------------------


async def test_requests_spill_in_order_and_come_back_once_the_window_drains(h: Harness) -> None:
    h100, a10 = PoolCeiling("h100", 1000), PoolCeiling("a10", 1000)
    pools = (h100, a10)
    assert [(await h.reserve(n, SCOPE, pools=pools)).pool for n in (700, 700, 300, 300)] == [
        "h100", "a10", "h100", "a10"]  # each to the first pool in order with room
    assert (await h.pool_tokens("h100"), await h.pool_tokens("a10")) == (1000, 1000)
    assert (await h.reserve(1, SCOPE, pools=(*pools, SPARE))).pool == "spare"
    d = await h.reserve(1, SCOPE, pools=pools)
    assert (d.allowed, d.denied_scope, d.denied_kind, d.pool) == (False, "pool", "pool", None)
    h.assert_wait(d.retry_after_seconds, WINDOW)
    assert await h.used(KEY, TPM) == 2001  # the pool denial wrote nothing
    await h.advance(h.after(WINDOW))
    assert (await h.pool_tokens("h100"), await h.pool_tokens("a10")) == (0, 0)
    assert (await h.reserve(1000, SCOPE, pools=pools)).pool == "h100"  # the spill is over with its window
    assert (await h.pool_tokens("h100"), await h.pool_tokens("a10")) == (1000, 0)


async def test_a_spilling_pool_admits_again_only_at_or_below_its_low_line(h: Harness) -> None:
    h100 = PoolCeiling("h100", 1000, hysteresis=0.2)
    assert h100.low == 800
    pools = (h100, PoolCeiling("a10", 10_000))
    assert (await h.reserve(600, pools=pools)).pool == "h100"
    assert (await h.reserve(500, pools=pools)).pool == "a10"  # 1100 > 1000: h100 spills from now on
    assert (await h.reserve(300, pools=pools)).pool == "a10"  # 900 is under the ceiling, not the low line
    d = await h.reserve(300, pools=(h100,))
    assert (d.allowed, d.denied_kind) == (False, "pool")
    h.assert_wait(d.retry_after_seconds, WINDOW)  # until the 600 leave: then 300 is under the low line
    assert (await h.reserve(200, pools=pools)).pool == "h100"  # 800: at the low line, and the spill ends
    assert (await h.reserve(100, pools=pools)).pool == "h100"  # 900: under the ceiling is enough again
    assert (await h.pool_tokens("h100"), await h.pool_tokens("a10")) == (900, 800)
    assert (await h.reserve(101, pools=pools)).pool == "a10"  # 1001: spills again
    assert (await h.reserve(1, pools=pools)).pool == "a10"  # 901 > 800


async def test_an_owner_within_its_guarantee_is_held_to_the_ceiling_only_while_the_pool_spills(
    h: Harness,
) -> None:
    owner = PoolCeiling("p", 1000, hysteresis=0.5, owner=ACME, guaranteed=300)
    borrower = PoolCeiling("p", 1000, hysteresis=0.5, others=((ACME, 300),))
    assert (await h.reserve(700, pools=(borrower, SPARE), tenant=GLOBEX)).pool == "p"  # acme idle: lent
    assert (await h.reserve(400, pools=(borrower, SPARE), tenant=GLOBEX)).pool == "spare"  # 1100: p spills
    # acme within its guarantee: 900 is above the low line (500), not above the ceiling
    assert (await h.reserve(200, pools=(owner, SPARE), tenant=ACME)).pool == "p"
    assert (await h.reserve(50, pools=(borrower, SPARE), tenant=GLOBEX)).pool == "spare"
    # beyond its guarantee (350 > 300) acme is a borrower like any other: the low line holds it
    assert (await h.reserve(150, pools=(owner, SPARE), tenant=ACME)).pool == "spare"
    assert (await h.reserve(100, pools=(owner, SPARE), tenant=ACME)).pool == "p"  # 300: within; 1000
    d = await h.reserve(1, pools=(owner,), tenant=ACME)  # never above the ceiling
    assert (d.allowed, d.denied_kind) == (False, "pool")
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME)) == (1000, 300)


# -- fair shares -----------------------------------------------------------------------------------


def shares(pool: str, ceiling: int, **guaranteed: int) -> dict[str, PoolCeiling]:
    """Each owner's view of a pool whose owners have these guarantees."""
    return {
        owner: PoolCeiling(pool, ceiling, owner=owner, guaranteed=g,
                           others=tuple((o, og) for o, og in guaranteed.items() if o != owner))
        for owner, g in guaranteed.items()
    }


async def test_an_idle_owners_guarantee_is_lent_and_an_active_owners_unused_part_is_not(h: Harness) -> None:
    view = shares("p", 1000, acme=600, globex=400)
    globex = (view[GLOBEX], SPARE)
    assert (await h.reserve(900, pools=globex, tenant=GLOBEX)).pool == "p"  # 500 beyond its guarantee
    assert (await h.reserve(100, pools=globex, tenant=GLOBEX)).pool == "p"  # up to the ceiling
    assert (await h.reserve(1, pools=globex, tenant=GLOBEX)).pool == "spare"
    assert (await h.pool_tokens("p", GLOBEX), await h.pool_tokens("p", ACME)) == (1000, 0)
    await h.advance(h.after(WINDOW))
    assert (await h.reserve(100, pools=(view[ACME],), tenant=ACME)).pool == "p"  # acme is active now
    # its unused 500 are held for it: globex gets its own guarantee, and no more
    assert (await h.reserve(300, pools=globex, tenant=GLOBEX)).pool == "p"  # 300 of 400: within
    assert (await h.reserve(101, pools=globex, tenant=GLOBEX)).pool == "spare"  # 401 + 100 + 500 held > 1000
    assert (await h.reserve(100, pools=globex, tenant=GLOBEX)).pool == "p"  # 400: within
    assert (await h.reserve(1, pools=globex, tenant=GLOBEX)).pool == "spare"
    assert (await h.reserve(500, pools=(view[ACME],), tenant=ACME)).pool == "p"  # acme's 600, all of it
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME), await h.pool_tokens("p", GLOBEX)) == (
        1000, 600, 400)


async def test_a_returning_owner_pushes_borrowers_out_and_gets_room_as_borrowed_tokens_leave(h: Harness) -> None:
    view = shares("p", 1000, acme=600, globex=400)
    globex = (view[GLOBEX], SPARE)
    assert (await h.reserve(500, pools=globex, tenant=GLOBEX)).pool == "p"  # borrowing: acme is idle
    await h.advance(WINDOW / 2)
    assert (await h.reserve(400, pools=globex, tenant=GLOBEX)).pool == "p"  # 900
    # acme returns: 300 within its guarantee does not fit (1200), and marks its demand
    d = await h.reserve(300, pools=(view[ACME],), tenant=ACME)
    assert (d.allowed, d.denied_scope, d.denied_kind) == (False, "pool", "pool")
    h.assert_wait(d.retry_after_seconds, WINDOW / 2)  # when globex's first 500 leave
    # 100 more would fit under the ceiling (1000), but acme's unused 600 are held for it now
    assert (await h.reserve(100, pools=globex, tenant=GLOBEX)).pool == "spare"
    await h.advance(h.after(WINDOW / 2))
    assert await h.pool_tokens("p") == 400
    assert (await h.reserve(300, pools=(view[ACME],), tenant=ACME)).pool == "p"  # 700
    assert (await h.reserve(100, pools=globex, tenant=GLOBEX)).pool == "spare"  # 700 + 100 + 300 held
    assert (await h.reserve(300, pools=(view[ACME],), tenant=ACME)).pool == "p"  # acme's 600: 1000
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME), await h.pool_tokens("p", GLOBEX)) == (
        1000, 600, 400)


async def test_an_owner_never_takes_more_than_its_maximum(h: Harness) -> None:
    capped = PoolCeiling("p", 1000, owner=ACME, guaranteed=100, maximum=400)
    assert (await h.reserve(300, pools=(capped,), tenant=ACME)).pool == "p"
    d = await h.reserve(200, pools=(capped,), tenant=ACME)  # the pool has room (500), acme's share not
    assert (d.allowed, d.denied_kind) == (False, "pool")
    h.assert_wait(d.retry_after_seconds, WINDOW)  # until its own 300 leave
    assert (await h.reserve(200, pools=(capped, SPARE), tenant=ACME)).pool == "spare"
    d = await h.reserve(401, pools=(capped,), tenant=ACME)
    assert (d.allowed, d.denied_kind, d.retry_after_seconds) == (False, "too_large", 0.0)
    assert (await h.reserve(600, pools=(PoolCeiling("p", 1000),), tenant=GLOBEX)).pool == "p"  # 900
    assert (await h.reserve(100, pools=(capped,), tenant=ACME)).pool == "p"  # its 400, the pool's 1000
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME)) == (1000, 400)
    # a maximum of 0: the owner may take nothing of the pool
    nothing = PoolCeiling("q", 1000, owner=INITECH, maximum=0)
    d = await h.reserve(1, pools=(nothing,), tenant=INITECH)
    assert (d.allowed, d.denied_kind) == (False, "too_large")
    assert (await h.reserve(1, pools=(nothing, SPARE), tenant=INITECH)).pool == "spare"
    assert await h.pool_tokens("q") == 0


# -- denials -----------------------------------------------------------------------------------------


async def test_a_pool_denial_waits_for_the_pool_that_frees_first(h: Harness) -> None:
    a, b, small = PoolCeiling("a", 1000), PoolCeiling("b", 1000), PoolCeiling("small", 500)
    assert (await h.reserve(800, pools=(a,))).pool == "a"
    await h.advance(WINDOW / 2)
    assert (await h.reserve(800, pools=(b,))).pool == "b"
    d = await h.reserve(500, pools=(b, a))  # b frees in a window, a (the second choice) in half of one
    assert (d.allowed, d.denied_scope, d.denied_kind, d.denied_rule) == (False, "pool", "pool", None)
    h.assert_wait(d.retry_after_seconds, WINDOW / 2)
    d = await h.reserve(800, pools=(small, a))  # too large for small, only full in a: a wait, not too_large
    assert (d.allowed, d.denied_kind) == (False, "pool")
    h.assert_wait(d.retry_after_seconds, WINDOW / 2)
    d = await h.reserve(501, pools=(small,))
    assert (d.allowed, d.denied_scope, d.denied_kind, d.retry_after_seconds) == (False, "pool", "too_large", 0.0)
    d = await h.reserve(1001, pools=(small, a, b))  # larger than every pool lets it take
    assert (d.allowed, d.denied_kind, d.retry_after_seconds) == (False, "too_large", 0.0)
    await h.advance(h.before(WINDOW / 2))
    assert not (await h.reserve(500, pools=(b, a))).allowed  # not yet
    assert (await h.pool_tokens("a"), await h.pool_tokens("b"), await h.pool_tokens("small")) == (800, 800, 0)
    await h.advance(h.after(WINDOW / 2) - h.before(WINDOW / 2))
    assert (await h.reserve(500, pools=(b, a))).pool == "a"  # the wait was enough; b is still full
    assert (await h.pool_tokens("a"), await h.pool_tokens("b")) == (500, 800)


# -- settlement ------------------------------------------------------------------------------------


async def test_settling_a_pool_reservation_moves_the_pool_and_the_owners_window(h: Harness) -> None:
    p = PoolCeiling("p", 1000, owner=ACME, guaranteed=500, maximum=800)
    assert (await h.reserve(800, SCOPE, pools=(p,), request_id="r1")).pool == "p"
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME)) == (800, 800)
    d = await h.reserve(100, SCOPE, pools=(p,))
    assert (d.allowed, d.denied_kind) == (False, "pool")  # acme's maximum
    assert await h.limiter.settle_now(TENANT, "r1", 300)  # a refund of 500
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME), await h.used(KEY, TPM)) == (300, 300, 300)
    assert (await h.reserve(500, SCOPE, pools=(p,), request_id="r2")).pool == "p"  # the room came back
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME)) == (800, 800)
    h.limiter.settle(TENANT, "r2", 650)  # queued: a debt of 150
    await h.limiter.flush()
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME), await h.used(KEY, TPM)) == (950, 950, 950)
    assert (await h.reserve(50, SCOPE, pools=(PoolCeiling("p", 1000),), request_id="r3")).pool == "p"
    assert await h.limiter.cancel_now(TENANT, "r3")
    assert (await h.pool_tokens("p"), await h.pool_tokens("p", ACME), await h.used(KEY, TPM)) == (950, 950, 950)
    assert not await h.limiter.settle_now(TENANT, "r1", 0)  # settled once only


# -- the fail-open limiter: each replica's share ---------------------------------------------------


async def test_the_fail_open_limiter_divides_ceilings_lines_and_shares_by_the_replicas() -> None:
    """RedisLimiter decides locally with ``InMemoryLimiter(limit_divisor=replicas_hint)`` while Redis is
    down: every pool number is its share (rounded up), here for two replicas."""
    clock = FakeClock()
    lim = InMemoryLimiter(clock=clock, window_scale=SCALE, limit_divisor=2)

    ids = iter(range(1_000_000))

    def reserve(tokens: int, *pools: PoolCeiling) -> str | None:
        d = lim.reserve_sync(Reservation(f"r{next(ids)}", TENANT, (), tokens, pools))
        return d.pool if d.allowed else d.denied_kind

    # ceiling 1000 -> 500; acme: guarantee 400 -> 200, maximum 600 -> 300; globex: guarantee 400 -> 200
    view = {owner: PoolCeiling(p.name, p.tokens_per_minute, owner=p.owner, guaranteed=p.guaranteed,
                               maximum=600 if owner == ACME else None, others=p.others)
            for owner, p in shares("p", 1000, acme=400, globex=400).items()}
    borrower = PoolCeiling("p", 1000, others=((ACME, 400), (GLOBEX, 400)))
    assert reserve(301, view[ACME]) == "too_large"  # above its maximum's share
    assert reserve(100, view[ACME]) == "p"
    assert reserve(301, borrower) == "pool"  # 100 + 301 + acme's unused 100 > 500 (1000 would fit 701)
    assert reserve(300, borrower) == "p"  # 100 + 300 + 100 held: at the ceiling's share
    assert lim.pool_total("p") == 400
    assert (lim.pool_total("p", ACME), lim.pool_total("p", GLOBEX)) == (100, 0)
    assert reserve(150, view[GLOBEX]) == "pool"  # within its 200, above the ceiling's 500
    # the hysteresis line is divided too: 1000 x (1 - 0.2) = 800 -> 400
    q = PoolCeiling("q", 1000, hysteresis=0.2)
    assert reserve(300, q) == "q"
    assert reserve(201, q) == "pool"  # 501 > 500: spills
    assert reserve(101, q) == "pool"  # 401 > 400
    assert reserve(100, q) == "q"  # 400: at the line
    assert reserve(100, q) == "q"  # 500: the spill is over
    assert lim.pool_total("q") == 500
    # a guarantee's share: within 150 (of 300) is held to the ceiling only while r spills
    owner = PoolCeiling("r", 1000, hysteresis=0.5, owner=INITECH, guaranteed=300)
    assert reserve(400, PoolCeiling("r", 1000, hysteresis=0.5)) == "r"
    assert reserve(101, PoolCeiling("r", 1000, hysteresis=0.5)) == "pool"  # 501 > 500: spills
    assert reserve(151, owner) == "pool"  # beyond its 150: the low line (250) holds it
    assert reserve(100, owner) == "r"  # within: 500, at the ceiling
    assert (lim.pool_total("r"), lim.pool_total("r", INITECH)) == (500, 100)
