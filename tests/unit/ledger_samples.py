"""A small ledger for the usage report, export and reconcile tests: records of every kind, priced
with a catalog, written by the real sink (extproc.records.sink.JsonlSink)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from extproc.billing import price
from extproc.metering.usage import Usage
from extproc.policy import Policy, hash_key, parse_policy
from extproc.records.ledger import parse_time
from extproc.records.record import Limit, UsageRecord
from extproc.records.sink import JsonlSink
from extproc.settlement.outcome import Decision, Ending

T0 = parse_time("2026-11-27T10:00:00Z")

POLICY = f"""\
version: "p1"
mode: shadow
models: ["small", "big"]
pools:
  - name: fast
    tokens_per_minute: 1000000
  - name: slow
tenants:
  acme:
    projects:
      web:
        teams:
          search: {{}}
  globex:
    projects:
      search: {{}}
  shade:
    limits: {{tokens_per_minute: 10, action: alert}}
    projects:
      lab:
        limits: {{tokens_per_minute: 10, action: block}}
keys:
  - id: web-key
    sha256: "{hash_key("w")}"
    tenant: acme
    project: web
    team: search
  - id: batch-key
    sha256: "{hash_key("b")}"
    tenant: acme
    project: web
  - id: g-key
    sha256: "{hash_key("g")}"
    tenant: globex
    project: search
  - id: s-key
    sha256: "{hash_key("s")}"
    tenant: shade
    project: lab
    limits: {{tokens_per_minute: 5}}
prices:
  version: "2026-11"
  currency: USD
  models:
    small: {{input: 0.15, cached_input: 0.075, output: 0.60}}
    big:
      input: 3
      cached_input: 0.30
      cache_write: 3.75
      output: 15
      reasoning: 20
      pools:
        slow: {{input: 1.5, output: 7}}
"""


def policy() -> Policy:
    return parse_policy(POLICY, "policy.yaml")


def _rec(rid: str, minutes: float, decision: Decision, usage: Usage | None = None, /, **kw: object) -> UsageRecord:
    rec = UsageRecord(request_id=rid, time=T0 + minutes * 60, decision=decision, policy_version="p1",
                      **kw)  # type: ignore[arg-type]
    if usage is not None:
        rec.set_usage(usage)
    if not decision.admitted:
        rec.ending = Ending.REFUSED
    price(rec, policy().prices)
    return rec


ACME_WEB = {"tenant": "acme", "project": "web", "team": "search", "key_id": "web-key"}
ACME_BATCH = {"tenant": "acme", "project": "web", "key_id": "batch-key"}
GLOBEX = {"tenant": "globex", "project": "search", "key_id": "g-key"}
SHADE = {"tenant": "shade", "project": "lab", "key_id": "s-key"}


def records() -> list[UsageRecord]:
    """The ledger after folding: one record per request id."""
    return [
        _rec("a1", 1, Decision.ADMITTED, Usage(1000, 200, cached_tokens=400), model="small", pool="fast",
             api="openai_chat", status=200, **ACME_WEB),
        _rec("a2", 2, Decision.ADMITTED, Usage(2600, 1000, cached_tokens=500, cache_creation_tokens=2000,
                                               reasoning_tokens=300),
             model="big", response_model="big", pool="slow", api="anthropic_messages", status=200, **ACME_BATCH),
        _rec("a3", 3, Decision.THROTTLED, model="small", status=429,
             decided_by=Limit("key:web-key", "tokens", "throttle"), **ACME_WEB),
        _rec("g1", 90, Decision.ADMITTED, Usage(50, 100, estimated=True), model="small", pool="fast",
             status=200, ending=Ending.INCOMPLETE, **GLOBEX),
        _rec("g2", 91, Decision.BLOCKED, model="small", status=403,
             decided_by=Limit("tenant:globex", "quota_tokens", "block"), **GLOBEX),
        _rec("s1", 5, Decision.SHADOW, Usage(10, 10), model="small", pool="fast", status=200,
             alerts=("key:s-key",), decided_by=Limit("key:s-key", None, "throttle"), **SHADE),
        _rec("s2", 6, Decision.SHADOW, Usage(10, 10), model="small", pool="fast", status=200,
             alerts=("project:shade/lab",), decided_by=Limit("project:shade/lab", None, "block"), **SHADE),
        _rec("s3", 7, Decision.SHADOW, Usage(10, 10), model="small", pool="fast", status=200,
             alerts=("tenant:shade", "project:shade/lab"), **SHADE),  # no decided_by: an older record
        _rec("r1", 8, Decision.REFUSED, status=401),
        _rec("u1", 95, Decision.ADMITTED, Usage(7, 3), model="mystery", pool="fast", status=200, **GLOBEX),
    ]


def superseded() -> UsageRecord:
    """An earlier line of a1 (a drain's record that crash recovery wrote again): the later wins."""
    old = records()[0]
    return dataclasses.replace(old, prompt_tokens=1, cached_tokens=0, completion_tokens=1, cost="999",
                               usage_source="estimated")


def write_ledger(path: Path, recs: list[UsageRecord] | None = None) -> list[UsageRecord]:
    """Write the sample (a1 twice: its superseded line first) with the real sink; returns the
    records a folded read gives."""
    recs = records() if recs is None else recs

    async def run() -> None:
        sink = JsonlSink(path, flush_interval=0.001)
        sink.start()
        if recs and recs[0].request_id == "a1":
            sink.emit(superseded())
        for rec in recs:
            sink.emit(rec)
        await sink.aclose()

    asyncio.run(run())
    return recs
