"""`tokenmeter demo`: the whole system on loopback, a mixed burst of traffic, a usage report.

Starts a real Redis, two fake OpenAI-compatible model servers (the `h100` and `cheap` pools),
the processor and a real Envoy with envoy/envoy.yaml; sends streaming and non-streaming requests
for two tenants plus an unknown key; stops everything (also on Ctrl-C or failure) and prints
what happened per tenant and key.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import aiohttp

from extproc.devstack.stack import REPO_ROOT, Stack, StackOptions
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


@dataclass(frozen=True)
class Call:
    key: str
    stream: bool
    max_tokens: int
    api: str = "openai"


def traffic() -> list[Call]:
    """Interleaved calls of every key, so the keys compete for the h100 pool as real tenants do."""
    web = [Call("acme-chatbot-web", stream=i % 2 == 0, max_tokens=300) for i in range(24)]
    batch = [Call("acme-batch", stream=i % 4 == 0, max_tokens=400) for i in range(16)]
    search = [
        Call("globex-search", stream=i % 2 == 1, max_tokens=200, api="anthropic" if i % 3 == 0 else "openai")
        for i in range(10)
    ]
    unknown = [Call("unknown", stream=False, max_tokens=50)] * 3
    queues = [web, batch, search, unknown]
    calls: list[Call] = []
    while any(queues):
        for q in queues:
            if q:
                calls.append(q.pop(0))
    return calls


async def _send(session: aiohttp.ClientSession, base: str, call: Call, n: int) -> int:
    text = f"Request {n}: summarize the quarterly GPU utilisation report for the platform team."
    if call.api == "anthropic":
        url, headers = f"{base}/v1/messages", {"x-api-key": DEMO_KEYS[call.key]}
        body: dict[str, object] = {"model": "claude-demo", "max_tokens": call.max_tokens,
                                   "messages": [{"role": "user", "content": text}], "stream": call.stream}
    else:
        url, headers = f"{base}/v1/chat/completions", {"authorization": f"Bearer {DEMO_KEYS[call.key]}"}
        body = {"model": "llama-3.1-8b", "max_tokens": call.max_tokens, "stream": call.stream,
                "messages": [{"role": "user", "content": text}]}
    # A client trying to pick its own tenant and pool: the processor removes these.
    headers |= {"x-tokenmeter-tenant": "someone-else", "x-tokenmeter-pool": "h100"}
    async with session.post(url, json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _drive(base: str) -> Counter[int]:
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as session:
        calls = traffic()
        for start in range(0, len(calls), 8):  # bursts of 8 concurrent requests
            batch = calls[start : start + 8]
            results = await asyncio.gather(*(_send(session, base, c, start + i) for i, c in enumerate(batch)))
            statuses.update(results)
    return statuses


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(run_dir: Path = DEMO_DIR) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(run_dir, ignore_errors=True)
    stack = Stack(StackOptions(run_dir=run_dir))
    try:
        with stack:
            print(f"Envoy (generated from {stack.opts.policy.name}) on {stack.base_url}  (run dir {stack.run_dir})",
                  flush=True)
            print("Sending a mixed burst: 2 tenants, 3 keys and an unknown one, streaming and not", flush=True)
            statuses = asyncio.run(_drive(stack.base_url))
            stack.stop_processor()  # SIGTERM: drain streams, flush settlements and usage records
        print("HTTP statuses:", ", ".join(f"{code}x{n}" for code, n in sorted(statuses.items())))
        print()
        print(format_table(summarize(read_records(stack.usage_log))))
        print()
        print("Envoy's access log, last admitted request (attribution and token counts from dynamic metadata):")
        admitted = [e for e in stack.access_log_entries() if e.get("decision") == "admitted"]
        if admitted:
            print("  " + json.dumps(admitted[-1], sort_keys=True))
        print()
        print(f"Usage records: {stack.usage_log}")
        print(f"Logs of every process: {stack.run_dir}   (tokenmeter report {stack.usage_log})")
        return 0
    except KeyboardInterrupt:
        print("interrupted; every process stopped", file=sys.stderr)
        return 130
