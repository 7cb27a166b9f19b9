from __future__ import annotations

import asyncio
from pathlib import Path

from extproc.records.record import UsageRecord
from extproc.records.report import format_table, summarize
from extproc.records.sink import JsonlSink, read_records
from extproc.settlement.outcome import Decision


def _rec(rid: str, decision: str, tenant: str | None = "acme", pool: str | None = "h100") -> UsageRecord:
    return UsageRecord(
        request_id=rid, time=0.0, decision=Decision(decision), policy_version="v", tenant=tenant,
        key_id="k" if tenant else None, pool=pool, prompt_tokens=10, completion_tokens=5,
    )


def test_summary_counts_admitted_throttled_refused_and_tokens() -> None:
    rows = summarize([
        _rec("1", "admitted"), _rec("2", "admitted", pool="cheap"), _rec("3", "throttled"),
        _rec("4", "refused", tenant=None, pool=None),
    ])
    acme = next(r for r in rows if r.tenant == "acme")
    assert (acme.admitted, acme.throttled, acme.refused) == (2, 1, 0)
    assert (acme.prompt_tokens, acme.completion_tokens) == (20, 10)
    assert dict(acme.pools) == {"h100": 1, "cheap": 1}
    unknown = next(r for r in rows if r.tenant == "(unknown)")
    assert unknown.refused == 1
    table = format_table(rows)
    assert "h100=1" in table and "(unknown)" in table


async def test_sink_writes_every_record_and_reads_back(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "u.jsonl")
    sink.start()
    for i in range(250):
        sink.emit(_rec(str(i), "admitted"))
    await sink.aclose()
    records = read_records(tmp_path / "u.jsonl")
    assert [r.request_id for r in records] == [str(i) for i in range(250)]
    assert records[0] == _rec("0", "admitted")


async def test_closing_the_sink_mid_batch_loses_nothing(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "u.jsonl", flush_interval=10.0)  # a batch is still gathering at close
    sink.start()
    sink.emit(_rec("a", "admitted"))
    await asyncio.sleep(0.05)
    sink.emit(_rec("b", "admitted"))
    await sink.aclose()
    assert [r.request_id for r in read_records(tmp_path / "u.jsonl")] == ["a", "b"]
