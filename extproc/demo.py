"""`tokenmeter demo`: the whole system on loopback, traffic in phases, spill and fair shares as they happen.

Starts a real Redis, one fake OpenAI/Anthropic-compatible model server per pool of the example policy
(h100, a100, cheap), the processor and a real Envoy with the configuration generated from that policy.
The processor runs with `--window-scale 0.1` (for tests and demos only): the pool minute and every
sliding window last 6 s, so that within half a minute

1. acme, alone, bursts: h100 fills up to acme's max and acme spills (its 70B requests to a100, its 8B
   ones to cheap);
2. globex comes back: it wins back its guarantee on h100, and acme, which borrowed above its own, is
   refused first and pushed to the next pools; globex's small key limit throttles part of its burst;
3. traffic stops: h100 drains;
4. acme sends again, and h100 takes its traffic again.

While the traffic runs, a table (per pool and tenant: tokens in the last second and in the pool window,
bars against the ceiling with the guarantee marked; per tenant 429s and spills a second) is redrawn once
a second; when stdout is not a terminal it is one plain line a second. Everything in it is what the
demo's own clients saw: status, `x-tokenmeter-pool`, the usage in the body. Then the usage records are
summed per key and per pool. Every process is stopped at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import aiohttp

from extproc.demo_view import (
    Seen,
    Tally,
    first_pool,
    plain_line,
    pool_summary,
    redraw,
    reported_tokens,
    share_lines,
    table_lines,
    throttle_summary,
)
from extproc.devstack.stack import REPO_ROOT, Stack, StackOptions
from extproc.limiter.types import POOL_WINDOW_S
from extproc.policy import load_policy
from extproc.policy.capacity import routes
from extproc.policy.keys import hash_key
from extproc.policy.model import Policy
from extproc.records.report import format_table, summarize
from extproc.records.sink import read_records

DEMO_DIR = REPO_ROOT / "var" / "demo"

# Demo secrets. The policy file holds only their SHA-256 digests.
DEMO_KEYS = {
    "acme-chatbot-web": "tm-demo-acme-web",
    "acme-batch": "tm-demo-acme-batch",
    "globex-search": "tm-demo-globex-search",
    "unknown": "sk-not-a-real-key",
}

# Testing and demos only: every window is this fraction of its length (a pool's minute lasts 6 s).
WINDOW_SCALE = 0.1


@dataclass(frozen=True)
class Flow:
    """One key's requests during a phase: `per_second` of them, evenly spaced."""

    key: str
    per_second: float
    model: str
    max_tokens: int
    anthropic_every: int = 0  # every n-th request goes to the Anthropic Messages API (0: none)
    stream_every: int = 0  # every n-th request streams (0: none)


@dataclass(frozen=True)
class Phase:
    title: str
    story: str
    seconds: int
    flows: tuple[Flow, ...] = ()


WEB = Flow("acme-chatbot-web", 3, "llama-3.1-8b", 100, stream_every=2)
BATCH = Flow("acme-batch", 4, "llama-3.1-70b", 120)
SEARCH = Flow("globex-search", 4, "llama-3.1-70b", 100, anthropic_every=3, stream_every=2)
UNKNOWN = Flow("unknown", 0.5, "llama-3.1-8b", 50)

PHASES = (
    Phase("acme alone", "acme bursts: h100 fills up to acme's max, then acme spills to the next pool serving "
          "each model (70B: a100, 8B: cheap)", 6, (WEB, BATCH, UNKNOWN)),
    Phase("globex comes back", "globex wants its guarantee on h100: acme, borrowing above its own, is refused "
          "first and pushed to the next pools; globex's small key limit throttles part of its burst", 9,
          (WEB, BATCH, SEARCH)),
    Phase("quiet", "traffic stops: h100 drains", 7),
    Phase("acme again", "h100 has room again: acme's requests stay on it", 3,
          (Flow("acme-batch", 2, "llama-3.1-70b", 100),)),
)


@dataclass(frozen=True)
class Send:
    at: float  # seconds after the traffic began
    n: int  # the request's number (unique)
    flow: Flow


def schedule(phases: Sequence[Phase]) -> list[Send]:
    """Every request of every phase, in the order they are sent."""
    sends: list[tuple[float, Flow]] = []
    start = 0.0
    for phase in phases:
        for flow in phase.flows:
            count = int(phase.seconds * flow.per_second)
            sends += [(start + i / flow.per_second, flow) for i in range(count)]
        start += phase.seconds
    sends.sort(key=lambda s: s[0])
    return [Send(at, n, flow) for n, (at, flow) in enumerate(sends)]


def phase_at(phases: Sequence[Phase], t: float) -> int:
    """The index of the phase running at `t` seconds (the last one after the end)."""
    start = 0.0
    for i, phase in enumerate(phases):
        start += phase.seconds
        if t < start:
            return i
    return len(phases) - 1


class Screen:
    """Lines that stay (phases, events) and the live table: redrawn in place on a terminal, else one
    plain line a second."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty = out, tty
        self.table: list[str] = []

    def say(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        if self.tty:  # above the table, which is drawn again below them
            self._write(redraw(len(self.table), [*lines, *self.table]))
        else:
            self._write("".join(f"{line}\n" for line in lines))

    def show(self, table: list[str], plain: str) -> None:
        if self.tty:  # cut to the terminal's width: a wrapped line would take two rows and spoil the redraw
            width = shutil.get_terminal_size().columns - 1
            table = [line[:width] for line in table]
            self._write(redraw(len(self.table), table))
            self.table = table
        else:
            self._write(plain + "\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


async def _send(session: aiohttp.ClientSession, base: str, flow: Flow, n: int) -> tuple[int, str, int, float | None]:
    """(status, the pool that served it, the tokens its usage reported, Retry-After)."""
    text = f"Request {n}: summarize the quarterly GPU utilisation report for the platform team."
    stream = flow.stream_every > 0 and n % flow.stream_every == 0
    messages = [{"role": "user", "content": text}]
    if flow.anthropic_every and n % flow.anthropic_every == 0:
        url, headers = f"{base}/v1/messages", {"x-api-key": DEMO_KEYS[flow.key]}
        body: dict[str, object] = {"model": flow.model, "max_tokens": flow.max_tokens, "messages": messages,
                                   "stream": stream}
    else:
        url, headers = f"{base}/v1/chat/completions", {"authorization": f"Bearer {DEMO_KEYS[flow.key]}"}
        body = {"model": flow.model, "max_tokens": flow.max_tokens, "messages": messages, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
    # A client trying to pick its own tenant and pool: the processor removes these.
    headers |= {"x-tokenmeter-tenant": "someone-else", "x-tokenmeter-pool": "h100"}
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            data = await resp.read()
            tokens = reported_tokens(data) if resp.status == 200 else 0
            pool, retry = resp.headers.get("x-tokenmeter-pool", ""), _seconds(resp.headers.get("retry-after"))
            return resp.status, pool, tokens, retry
    except aiohttp.ClientError:
        return 0, "", 0, None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def tenant_of(policy: Policy, key: str) -> str:
    """The tenant the policy attributes a demo key to ("" for an unknown key)."""
    found = policy.key_for_hash(hash_key(DEMO_KEYS[key]))
    return found.tenant if found is not None else ""


def demo_tenants(policy: Policy) -> list[str]:
    """The tenants of the demo's keys, in their order."""
    return list(dict.fromkeys(t for key in DEMO_KEYS if (t := tenant_of(policy, key))))


async def _drive(base: str, policy: Policy, tally: Tally, screen: Screen, phases: Sequence[Phase]) -> Counter[int]:
    tenants = {key: tenant_of(policy, key) for key in DEMO_KEYS}
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(session: aiohttp.ClientSession, send: Send) -> None:
        status, pool, tokens, retry = await _send(session, base, send.flow, send.n)
        statuses[status] += 1
        tally.add(Seen(loop.time() - start, tenants[send.flow.key], status, pool,
                       first_pool(policy.pools, send.flow.model), tokens, retry))

    async def tick() -> None:
        told = -1
        for t in range(1, sum(p.seconds for p in phases) + 1):
            if (i := phase_at(phases, t - 1)) != told:
                told = i
                screen.say([_phase_line(phases, i)])
            await asyncio.sleep(max(0.0, start + t - loop.time()))
            snap = tally.tick(t, phases[phase_at(phases, t - 0.5)].title)
            screen.say([f"   t={t}s  {event}" for event in snap.events])
            screen.show(table_lines(snap), plain_line(snap))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        ticker = asyncio.create_task(tick())
        tasks = set()
        for send in schedule(phases):
            await asyncio.sleep(max(0.0, start + send.at - loop.time()))
            task = asyncio.create_task(one(session, send))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await ticker
        if tasks:
            await asyncio.gather(*tasks)
    return statuses


def _phase_line(phases: Sequence[Phase], i: int) -> str:
    at = sum(p.seconds for p in phases[:i])
    return f"== phase {i + 1}/{len(phases)} at {at}s, {phases[i].title}: {phases[i].story}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(run_dir: Path = DEMO_DIR) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.monotonic()
    opts = StackOptions(run_dir=run_dir, processor_extra=("--window-scale", str(WINDOW_SCALE)))
    policy = load_policy(opts.policy)
    window_s = POOL_WINDOW_S * WINDOW_SCALE
    stack = Stack(opts)
    tally = Tally(policy.pools, demo_tenants(policy), window_s)
    try:
        with stack:
            print(f"Envoy (generated from {stack.opts.policy.name}) on {stack.base_url}  (run dir {stack.run_dir})")
            print("Routes (a request goes to the first pool serving its model that has room):")
            for line in routes(policy):
                print(f"  {line}")
            for line in share_lines(policy.pools):
                print(f"  {line}")
            print(f"Windows scaled x{WINDOW_SCALE:g} for the demo (tokenmeter serve --window-scale {WINDOW_SCALE:g}, "
                  f"testing and demos only): a pool's minute and every per-minute limit last {window_s:g} s here, "
                  f"so a ceiling of 3000 tokens/min is 3000 tokens per {window_s:g} s.", flush=True)
            screen = Screen(sys.stdout, sys.stdout.isatty())
            statuses = asyncio.run(_drive(stack.base_url, policy, tally, screen, PHASES))
            stack.stop_processor()  # SIGTERM: drain streams, flush settlements and usage records
        records = read_records(stack.usage_log)
        print()
        print("HTTP statuses:", ", ".join(f"{code}x{n}" for code, n in sorted(statuses.items())))
        print()
        print(format_table(summarize(records)))
        print()
        print("Per pool and tenant (usage records; spilled here: sent on because an earlier pool had no room):")
        print(pool_summary(records, policy.pools))
        print(throttle_summary(tally.seen))
        print()
        print("Envoy's access log, last admitted request (attribution and token counts from dynamic metadata):")
        admitted = [e for e in stack.access_log_entries() if e.get("decision") == "admitted"]
        if admitted:
            print("  " + json.dumps(admitted[-1], sort_keys=True))
        print()
        print(f"Usage records: {stack.usage_log}")
        print(f"Logs of every process: {stack.run_dir}   (tokenmeter report {stack.usage_log})")
        print(f"Demo took {time.monotonic() - began:.0f} s")
        return 0
    except KeyboardInterrupt:
        print("interrupted; every process stopped", file=sys.stderr)
        return 130
