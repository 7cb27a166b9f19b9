"""The demo's live view and its pool summary: pure functions of what the demo observed.

The demo's clients note every response they get (`Seen`: when it ended, whose key sent it, its status,
the pool that served it as `x-tokenmeter-pool` says, the tokens its usage reported). A `Tally` keeps
them and, once a second, makes a `Snapshot`: per pool and tenant the tokens admitted in the last second
and in the pool's window; per tenant the 429s and the spills of the last second; and the events worth a
line of their own:

* a tenant *spills*: a request went to a later pool than the first one serving its model;
* a tenant *comes back* to a pool where it has a guarantee while another tenant borrows above its own,
  and then *wins back* its guarantee as the borrower is refused first;
* a pool *drains* to nothing, and a tenant that spilled is *back* on its first pool.

`table_lines` renders a snapshot for a terminal (the demo redraws it in place: `redraw`), `plain_line`
as one line for logs and pipes; `pool_summary` sums the usage records per pool and tenant. Nothing here
reads a clock or does I/O.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from extproc.policy.model import Pool
from extproc.records.record import UsageRecord
from extproc.records.report import text_table


@dataclass(frozen=True, slots=True)
class Seen:
    """One response, as the client that sent the request saw it."""

    at: float  # seconds since the traffic began, when the response ended
    tenant: str  # whose key sent it ("" for a key the policy does not know)
    status: int
    pool: str = ""  # x-tokenmeter-pool: the pool that served it ("" when refused)
    first: str = ""  # the first pool serving the request's model: where it goes while there is room
    tokens: int = 0  # prompt + completion, as the response's usage reported them
    retry_after: float | None = None  # a 429's Retry-After, in seconds

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and bool(self.pool)

    @property
    def spilled(self) -> bool:
        """Served by a later pool than its model's first: the first had no room for it."""
        return self.ok and bool(self.first) and self.pool != self.first


@dataclass(frozen=True, slots=True)
class Use:
    """One tenant's tokens in one pool."""

    tenant: str
    last: int  # admitted in the last second
    window: int  # admitted within the pool's window
    guaranteed: int = 0  # its share of the pool (0: none)
    maximum: int | None = None  # the most its share lets it take (None: no share)


@dataclass(frozen=True, slots=True)
class PoolView:
    name: str
    ceiling: int | None  # tokens per window; None: the overflow, no ceiling
    uses: tuple[Use, ...]

    @property
    def window(self) -> int:
        return sum(u.window for u in self.uses)

    @property
    def last(self) -> int:
        return sum(u.last for u in self.uses)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # seconds since the traffic began
    phase: str
    window_s: float  # the pool window (a minute, scaled)
    pools: tuple[PoolView, ...]
    throttled: tuple[tuple[str, int], ...]  # (tenant, 429s in the last second), every tenant
    spills: tuple[tuple[str, str, str, int], ...] = ()  # (tenant, from, to, requests) in the last second
    events: tuple[str, ...] = ()


class Tally:
    """Every `Seen` of the demo; `tick(now, phase)` once a second makes the `Snapshot` of that second.

    `tick` also remembers what it announced (a tenant's spill from one pool to another, until it is back
    on the first; a tenant coming back to a pool; a pool drained), so each event is one line, not one a
    second."""

    def __init__(self, pools: Sequence[Pool], tenants: Sequence[str], window_s: float) -> None:
        self.pools = tuple(pools)
        self.tenants = tuple(tenants)
        self.window_s = window_s
        self.seen: list[Seen] = []
        self._announced: set[tuple[str, str, str]] = set()  # (tenant, from, to) spills told (until back)
        self._last_spill: dict[tuple[str, str], float] = {}  # (tenant, first pool) -> its latest spill
        self._largest: dict[str, int] = {}  # tenant -> its largest request so far (tokens)
        self._present: set[tuple[str, str]] = set()  # (pool, tenant) with tokens in the window or asking
        # (pool, tenant) come back -> since when, and the borrowers' windows then
        self._claims: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        self._won: set[tuple[str, str]] = set()
        self._busy: set[str] = set()  # pools with a ceiling and tokens in their window

    def add(self, seen: Seen) -> None:
        self.seen.append(seen)
        if seen.ok:
            self._largest[seen.tenant] = max(self._largest.get(seen.tenant, 0), seen.tokens)

    def tick(self, now: float, phase: str) -> Snapshot:
        recent = [s for s in self.seen if now - 1 < s.at <= now]
        window = [s for s in self.seen if now - self.window_s < s.at <= now]
        views = tuple(self._view(p, recent, window) for p in self.pools)
        by_name = {v.name: v for v in views}
        throttled = Counter(s.tenant for s in recent if s.status == 429)
        spills = Counter((s.tenant, s.first, s.pool) for s in recent if s.spilled)
        events: list[str] = []
        for (tenant, first, to), _ in sorted(spills.items()):
            self._last_spill[(tenant, first)] = max(
                s.at for s in recent if s.spilled and (s.tenant, s.first, s.pool) == (tenant, first, to))
            if (tenant, first, to) not in self._announced:
                self._announced.add((tenant, first, to))
                events.append(self._spill_event(tenant, by_name.get(first), to))
        events += self._shares(now, views, recent)
        events += self._drained(views)
        events += self._back(now, recent, by_name)
        return Snapshot(
            at=now, phase=phase, window_s=self.window_s, pools=views,
            throttled=tuple((t, throttled[t]) for t in self.tenants),
            spills=tuple((t, f, to, n) for (t, f, to), n in sorted(spills.items())),
            events=tuple(events),
        )

    def _view(self, pool: Pool, recent: list[Seen], window: list[Seen]) -> PoolView:
        uses = []
        for tenant in self.tenants:
            share = pool.shares.get(tenant)
            uses.append(Use(
                tenant,
                last=sum(s.tokens for s in recent if s.ok and s.pool == pool.name and s.tenant == tenant),
                window=sum(s.tokens for s in window if s.ok and s.pool == pool.name and s.tenant == tenant),
                guaranteed=share.guaranteed if share is not None else 0,
                maximum=share.maximum if share is not None else None,
            ))
        return PoolView(pool.name, pool.tokens_per_minute, tuple(uses))

    @staticmethod
    def _spill_event(tenant: str, first: PoolView | None, to: str) -> str:
        if first is None:
            return f"{tenant} spills to {to}"
        mine = next((u for u in first.uses if u.tenant == tenant), None)
        why = f"{first.name} {first.window}/{first.ceiling} in the window"
        if mine is not None and mine.maximum is not None and mine.maximum < (first.ceiling or 0):
            why += f", {tenant} {mine.window} of its max {mine.maximum}"
        return f"{tenant} spills from {first.name} to {to} ({why})"

    def _shares(self, now: float, views: Sequence[PoolView], recent: list[Seen]) -> list[str]:
        """A tenant with a guarantee comes back while others borrow above theirs; it wins it back."""
        events = []
        for view in views:
            for use in view.uses:
                key = (view.name, use.tenant)
                asking = any(s.tenant == use.tenant and s.first == view.name for s in recent)
                if use.window == 0 and not asking:
                    self._present.discard(key)
                    self._claims.pop(key, None)
                    self._won.discard(key)
                    continue
                if key not in self._present:
                    self._present.add(key)
                    borrowers = {u.tenant: u.window for u in view.uses
                                 if u.tenant != use.tenant and u.window > u.guaranteed}
                    if use.guaranteed and borrowers:
                        self._claims[key] = (now - 1, borrowers)
                        who = ", ".join(f"{b} borrows ({w} in the window, above its guarantee of "
                                        f"{_guarantee(view, b)})" for b, w in borrowers.items())
                        events.append(f"{use.tenant} comes back to {view.name} (guarantee {use.guaranteed}) "
                                      f"while {who}: borrowers are refused first")
                claim = self._claims.get(key)
                if claim is None or key in self._won:
                    continue
                if use.window + self._largest.get(use.tenant, 0) > use.guaranteed:  # no request fits within it
                    self._won.add(key)
                    pushed = []
                    since, borrowers = claim
                    for b, before in borrowers.items():
                        now_b = next((u.window for u in view.uses if u.tenant == b), 0)
                        to = sorted({s.pool for s in self.seen if since < s.at <= now and s.tenant == b
                                     and s.spilled and s.first == view.name})
                        held = f"down from {before} to {now_b}" if now_b < before else f"at {now_b}"
                        pushed.append(f"{b} {held} on {view.name}" + (f", pushed to {', '.join(to)}" if to else ""))
                    events.append(f"{use.tenant} wins back its guarantee on {view.name} ({use.window} in the window, "
                                  f"within a request of its {use.guaranteed}): {'; '.join(pushed)}")
        return events

    def _drained(self, views: Sequence[PoolView]) -> list[str]:
        events = []
        for view in views:
            if view.ceiling is None:
                continue
            if view.window > 0:
                self._busy.add(view.name)
            elif view.name in self._busy:
                self._busy.discard(view.name)
                events.append(f"{view.name} drained: 0/{view.ceiling} in the window")
        return events

    def _back(self, now: float, recent: list[Seen], by_name: dict[str, PoolView]) -> list[str]:
        """A tenant that spilled from its first pool, served there again after a whole window without a spill."""
        events = []
        for (tenant, first), last in sorted(self._last_spill.items()):
            if now - last < self.window_s:
                continue
            if any(s.ok and s.tenant == tenant and s.pool == first for s in recent):
                del self._last_spill[(tenant, first)]
                self._announced = {a for a in self._announced if a[:2] != (tenant, first)}
                view = by_name.get(first)
                where = f" ({first} {view.window}/{view.ceiling} in the window)" if view is not None else ""
                events.append(f"{tenant} back on {first}{where}: no spill for a whole window")
        return events


def _guarantee(view: PoolView, tenant: str) -> int:
    return next((u.guaranteed for u in view.uses if u.tenant == tenant), 0)


# -- rendering -----------------------------------------------------------------------------------

BAR = 30  # cells of a bar: the pool's ceiling


def bar(tokens: int, ceiling: int, guaranteed: int = 0, maximum: int | None = None, width: int = BAR) -> str:
    """`tokens` of `ceiling` as `width` cells ('█' used, '·' free); '|' marks the guarantee, ']' the max."""
    filled = min(width, round(tokens * width / ceiling)) if ceiling > 0 else 0
    cells = ["█"] * filled + ["·"] * (width - filled)
    if maximum is not None and 0 < maximum < ceiling:
        cells[min(width - 1, max(0, round(maximum * width / ceiling) - 1))] = "]"
    if 0 < guaranteed <= ceiling:
        cells[min(width - 1, max(0, round(guaranteed * width / ceiling) - 1))] = "|"
    return "".join(cells)


def table_lines(snap: Snapshot) -> list[str]:
    """A snapshot as a small table, for a terminal that redraws it once a second."""
    name_w = max([len("tenant"), *(len(t) for v in snap.pools for t in (*(u.tenant for u in v.uses), v.name))])
    lines = [
        f"t={snap.at:.0f}s  {snap.phase}  (pool window {snap.window_s:g} s)",
        f"  {'tenant':<{name_w}} {'last 1s':>7} {'window':>6}  of the ceiling ('|' guaranteed, ']' max)",
    ]
    for view in snap.pools:
        cap = f"{view.window}/{view.ceiling}" if view.ceiling is not None else f"{view.window} (no ceiling)"
        lines.append(f"{view.name:<{name_w}}  {cap} in the window, +{view.last} in the last second")
        for u in view.uses:
            row = f"  {u.tenant:<{name_w}} {'+' + str(u.last):>7} {u.window:>6}"
            if view.ceiling is not None:
                row += f"  {bar(u.window, view.ceiling, u.guaranteed, u.maximum)}"
                if u.maximum is not None:
                    row += f"  g{u.guaranteed} max{u.maximum}"
            lines.append(row.rstrip())
    throttles = "  ".join(f"{t} {n}" for t, n in snap.throttled) or "-"
    spills = "  ".join(f"{t} {f}->{to} {n}" for t, f, to, n in snap.spills) or "-"
    lines.append(f"429/s: {throttles}    spilled/s: {spills}")
    return lines


def plain_line(snap: Snapshot) -> str:
    """A snapshot as one line (logs, pipes): per pool its window and, per tenant, window (+last second)."""
    parts = [f"t={snap.at:.0f}s [{snap.phase}]"]
    for view in snap.pools:
        cap = f"{view.name} {view.window}/{view.ceiling}" if view.ceiling is not None else f"{view.name} {view.window}"
        uses = [f"{u.tenant} {u.window} (+{u.last})" for u in view.uses if u.window or u.last]
        parts.append(f"{cap}: {' '.join(uses)}" if uses else cap)
    throttled = [f"{t} {n}" for t, n in snap.throttled if n]
    parts.append("429/s: " + (" ".join(throttled) or "0"))
    if snap.spills:
        parts.append("spilled/s: " + " ".join(f"{t} {f}->{to} {n}" for t, f, to, n in snap.spills))
    return " | ".join(parts)


def redraw(height: int, lines: Sequence[str]) -> str:
    """ANSI: replace the `height` lines last drawn (the cursor is below them) with `lines`."""
    up = f"\x1b[{height}F" if height else ""
    return up + "\x1b[J" + "".join(f"{line}\n" for line in lines)


# -- the summary ---------------------------------------------------------------------------------


def first_pool(pools: Sequence[Pool], model: str | None) -> str:
    """The first pool, in the policy's order, serving `model` (any model when unknown)."""
    for pool in pools:
        if model is None or pool.serves(model):
            return pool.name
    return ""


def share_lines(pools: Sequence[Pool]) -> list[str]:
    """One line per pool with shares: who is guaranteed what of its ceiling, and up to what."""
    out = []
    for pool in pools:
        if pool.shares:
            told = ", ".join(f"{owner} guaranteed {s.guaranteed} max {s.maximum}" for owner, s in pool.shares.items())
            out.append(f"shares of {pool.name} ({pool.tokens_per_minute} tokens/min): {told}")
    return out


def pool_summary(records: Iterable[UsageRecord], pools: Sequence[Pool]) -> str:
    """Per pool and tenant: requests, tokens, and how many came because an earlier pool had no room."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    spills: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        if not r.decision.admitted or not r.pool:
            continue
        tenant = r.tenant or "(unknown)"
        row = rows[(r.pool, tenant)]
        row[0] += 1
        row[1] += r.prompt_tokens + r.completion_tokens
        first = first_pool(pools, r.model)
        if first and r.pool != first:
            row[2] += 1
            spills[tenant][f"{first}->{r.pool}"] += 1
    order = {p.name: i for i, p in enumerate(pools)}
    body = [
        (pool, tenant, str(n), str(tokens), str(spilled) if spilled else "-")
        for (pool, tenant), (n, tokens, spilled) in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                                         kv[0]))
    ]
    header = ("pool", "tenant", "requests", "tokens", "spilled here")
    table = text_table(header, body, right=(False, False, True, True, True))
    told = [f"{t} {sum(c.values())} ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})"
            for t, c in sorted(spills.items())]
    return table + "\nspills: " + ("; ".join(told) if told else "none")


def throttle_summary(seen: Iterable[Seen]) -> str:
    """Per tenant the 429s the clients got, and the Retry-After they were told."""
    counts: Counter[str] = Counter()
    waits: dict[str, list[float]] = defaultdict(list)
    for s in seen:
        if s.status == 429:
            counts[s.tenant or "(unknown)"] += 1
            if s.retry_after is not None:
                waits[s.tenant or "(unknown)"].append(s.retry_after)
    if not counts:
        return "429s: none"
    parts = []
    for tenant, n in sorted(counts.items()):
        w = waits.get(tenant)
        told = ""
        if w:
            told = f", Retry-After {min(w):g} s" if min(w) == max(w) else f", Retry-After {min(w):g}-{max(w):g} s"
        parts.append(f"{tenant} {n}{told}")
    return "429s: " + "; ".join(parts)


# -- what a response reported ----------------------------------------------------------------------


def reported_tokens(body: bytes) -> int:
    """Prompt + completion tokens of a response's usage: an OpenAI or Anthropic JSON body, or an SSE stream
    (OpenAI's usage chunk; Anthropic's message_start input and last message_delta output). 0: none."""
    text = body.decode("utf-8", "replace")
    if not text.lstrip().startswith("{"):
        return _stream_tokens(text)
    try:
        data = json.loads(text)
    except ValueError:
        return 0
    return _usage_tokens(data.get("usage")) if isinstance(data, dict) else 0


def _usage_tokens(usage: object) -> int:
    if not isinstance(usage, dict):
        return 0
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    return int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)


def _stream_tokens(text: str) -> int:
    openai = prompt = output = 0
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue  # [DONE]
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            prompt = int(usage.get("input_tokens") or 0)
        elif kind == "message_delta":
            output = int((event.get("usage") or {}).get("output_tokens") or 0)
        elif event.get("usage"):
            openai = _usage_tokens(event["usage"])
    return openai or prompt + output
