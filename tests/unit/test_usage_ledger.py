"""The ledger reader (fold by request id, time range), `usage report`, the exports (FOCUS CSV,
CloudEvents, JSON Lines: their totals equal the ledger's) and reconciliation with a server's own
usage."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.billing import TokenKinds, money_str, token_kinds
from extproc.fakes.model_server import build_app
from extproc.records.export import (
    CLOUDEVENTS_REQUIRED,
    CSV_COLUMNS,
    FOCUS_COLUMNS,
    cloudevent,
    export_cloudevents,
    export_csv,
    export_jsonl,
    ledger_totals,
)
from extproc.records.ledger import LedgerError, TimeRange, iso_utc, parse_time, read_ledger
from extproc.records.reconcile import read_server_usage, reconcile
from extproc.records.record import UsageRecord
from extproc.records.report import actions_of, format_report, parse_dimensions, usage_report
from extproc.records.sink import read_records
from extproc.settlement.outcome import Decision, Ending
from tests.unit.ledger_samples import T0, policy, records, write_ledger

# -- the ledger reader ----------------------------------------------------------------------


def test_the_last_line_of_a_request_wins(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    expected = write_ledger(path)
    ledger = read_ledger(path)
    assert ledger.records == expected  # a1 once, with its later line, at the place of its first
    assert (ledger.lines, ledger.replaced) == (len(expected) + 1, 1)
    assert read_records(path) == expected  # `tokenmeter report` reads the same way


def test_several_files_are_one_ledger_read_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    recs = records()
    write_ledger(first, recs[:3])
    changed = [UsageRecord.from_json(recs[1].to_json())]
    changed[0].completion_tokens = 1
    write_ledger(second, changed + recs[3:])
    ledger = read_ledger([first, second])
    assert [r.request_id for r in ledger.records] == [r.request_id for r in recs]
    assert ledger.records[1].completion_tokens == 1


def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    lines = [r.to_json() for r in records()[:3]]
    path.write_bytes(lines[0] + b"\n" + b'{"request_id": "x"}\n' + lines[1] + b"\n")
    with pytest.raises(LedgerError) as info:
        read_ledger(path)
    assert str(info.value) == f"{path}:2: not a usage record: missing 'time', 'decision', 'policy_version'"
    path.write_bytes(lines[0] + b"\n\n" + b"[1, 2]\n")
    with pytest.raises(LedgerError, match=":3: not a usage record"):
        read_ledger(path)


def test_a_torn_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    whole = records()[0].to_json()
    path.write_bytes(whole + b"\n" + whole[:40])
    ledger = read_ledger(path)
    assert [r.request_id for r in ledger.records] == ["a1"]
    assert ledger.torn == [f"{path}:2"]


def test_times_select_by_admission_in_a_half_open_range(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    write_ledger(path)
    hour = read_ledger(path, TimeRange(T0, T0 + 3600)).records
    assert {r.request_id for r in hour} == {"a1", "a2", "a3", "s1", "s2", "s3", "r1"}
    later = read_ledger(path, TimeRange(parse_time("2026-11-27T11:30:00Z"), None)).records
    assert {r.request_id for r in later} == {"g1", "g2", "u1"}  # g1 is at 11:30 exactly: included
    before = read_ledger(path, TimeRange(None, T0 + 90 * 60)).records
    assert "g1" not in {r.request_id for r in before}  # [from, to): the end is excluded


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-27T10:00:00Z", T0),
    ("2026-11-27T10:00:00+00:00", T0),
    ("2026-11-27T11:00:00+01:00", T0),
    ("2026-11-27T10:00", T0),  # no offset: UTC
    ("2026-11-27", T0 - 10 * 3600),
    (str(int(T0)), T0),
    ("1767225600.5", 1767225600.5),
])
def test_times_on_the_command_line(text: str, expected: float) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "nan", "2026-13-01"])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_iso_utc() -> None:
    assert iso_utc(T0) == "2026-11-27T10:00:00Z"
    assert iso_utc(T0 + 0.25) == "2026-11-27T10:00:00.25Z"


# -- usage report ---------------------------------------------------------------------------



def test_report_by_tenant_counts_decisions_tokens_and_exact_cost() -> None:
    report = usage_report(records(), parse_dimensions("tenant"))
    rows = {row.keys: row for row in report.rows}
    acme = rows[("acme",)]
    assert (acme.requests, acme.admitted, acme.throttled, acme.blocked, acme.refused) == (3, 2, 1, 0, 0)
    assert acme.tokens == TokenKinds(input=600 + 100, cached_input=400 + 500, cache_write=2000, output=200 + 700,
                                     reasoning=300)
    assert acme.cost() == {"USD": Decimal("0.00024") + Decimal("0.0187")}
    globex = rows[("globex",)]
    assert (globex.requests, globex.blocked, globex.estimated, globex.unpriced) == (3, 1, 1, 1)
    assert rows[("(none)",)].refused == 1  # the 401 has no tenant
    assert report.total.requests == len(records())
    assert report.total.cost() == {"USD": sum((Decimal(r.cost) for r in records() if r.cost), Decimal(0))}


@pytest.mark.parametrize(("by", "expected"), [
    ("project", {("acme", "web"): 3, ("globex", "search"): 3, ("shade", "lab"): 3, ("(none)", "(none)"): 1}),
    ("team", {("acme", "web", "search"): 2, ("acme", "web", "(none)"): 1, ("globex", "search", "(none)"): 3,
              ("shade", "lab", "(none)"): 3, ("(none)", "(none)", "(none)"): 1}),
    ("key", {("web-key",): 2, ("batch-key",): 1, ("g-key",): 3, ("s-key",): 3, ("(none)",): 1}),
    ("model", {("small",): 7, ("big",): 1, ("mystery",): 1, ("(none)",): 1}),
    ("pool", {("fast",): 6, ("slow",): 1, ("(none)",): 3}),
    ("tenant,model", {("acme", "small"): 2, ("acme", "big"): 1, ("globex", "small"): 2, ("globex", "mystery"): 1,
                      ("shade", "small"): 3, ("(none)", "(none)"): 1}),
])
def test_report_by_each_dimension(by: str, expected: dict[tuple[str, ...], int]) -> None:
    report = usage_report(records(), parse_dimensions(by))
    got = {row.keys: row.requests for row in report.rows}
    assert got == {k: v for k, v in expected.items() if v}


def test_dimensions_are_checked_and_get_their_parents() -> None:
    assert parse_dimensions("team,model") == ("tenant", "project", "team", "model")
    assert parse_dimensions(" pool , key ") == ("key", "pool")
    with pytest.raises(ValueError, match="unknown dimension region"):
        parse_dimensions("tenant,region")
    with pytest.raises(ValueError):
        parse_dimensions(",")


def test_report_over_a_time_range(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    write_ledger(path)
    report = usage_report(read_ledger(path, TimeRange(T0 + 3600, None)).records, ("tenant",))
    assert [row.keys for row in report.rows] == [("globex",)]


def test_shadow_mode_shows_what_would_have_been_throttled_or_blocked() -> None:
    report = usage_report(records(), ("tenant",))
    shade = next(s for s in report.shadow if s.tenant == "shade")
    # s1: decided_by throttle, s2: decided_by block, s3: no decided_by and no policy to tell
    assert (shade.shadow, shade.would_throttle, shade.would_block, shade.unclassified) == (3, 1, 1, 1)
    with_policy = usage_report(records(), ("tenant",), actions=actions_of(policy()))
    shade = next(s for s in with_policy.shadow if s.tenant == "shade")
    # s3's alerts: tenant:shade (alert) and project:shade/lab (block): enforce would have blocked
    assert (shade.would_throttle, shade.would_block, shade.unclassified) == (1, 2, 0)
    row = next(r for r in with_policy.rows if r.keys == ("shade",))
    assert (row.shadow, row.would_throttle, row.would_block, row.admitted) == (3, 1, 2, 3)
    table = format_report(with_policy, "table")
    assert "shadow mode" in table and "would block" in table


def test_report_formats() -> None:
    report = usage_report(records(), ("tenant", "model"))
    doc = orjson.loads(format_report(report, "json"))
    assert doc["by"] == ["tenant", "model"] and doc["currencies"] == ["USD"]
    acme_big = next(r for r in doc["rows"] if (r["tenant"], r["model"]) == ("acme", "big"))
    assert acme_big["cost_USD"] == "0.0187" and acme_big["cache_write_tokens"] == 2000
    assert doc["total"]["requests"] == len(records())
    rows = list(csv.DictReader(io.StringIO(format_report(report, "csv"))))
    assert len(rows) == len(report.rows)
    assert sum((Decimal(r["cost_USD"]) for r in rows), Decimal(0)) == report.total.cost()["USD"]
    table = format_report(report, "table").splitlines()
    assert table[0].split()[:3] == ["tenant", "model", "requests"]
    assert table[-1].startswith("total") or any(line.startswith("total") for line in table)


# -- exports --------------------------------------------------------------------------------


def _ledger_cost() -> Decimal:
    return sum((Decimal(r.cost) for r in records() if r.cost is not None), Decimal(0))


def _ledger_tokens() -> TokenKinds:
    total = TokenKinds()
    for r in records():
        total += token_kinds(r)
    return total


def test_csv_has_the_focus_columns_and_its_totals_equal_the_ledgers() -> None:
    text = "".join(export_csv(records()))
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    for column in ("ChargePeriodStart", "ChargePeriodEnd", "BilledCost", "EffectiveCost", "BillingCurrency",
                   "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "SkuId"):
        assert column in FOCUS_COLUMNS
    rows = list(reader)
    assert {r["x_RequestId"] for r in rows} == {"a1", "a2", "g1", "s1", "s2", "s3", "u1"}  # those with usage
    assert sum((Decimal(r["BilledCost"]) for r in rows if r["BilledCost"]), Decimal(0)) == _ledger_cost()
    assert sum((Decimal(r["EffectiveCost"]) for r in rows if r["EffectiveCost"]), Decimal(0)) == _ledger_cost()
    assert sum(int(r["ConsumedQuantity"]) for r in rows) == _ledger_tokens().total
    assert sum(int(r["x_CacheWriteTokens"]) for r in rows) == _ledger_tokens().cache_write
    a2 = next(r for r in rows if r["x_RequestId"] == "a2")
    assert a2["ChargePeriodStart"] == "2026-11-27T10:02:00Z"
    assert (a2["BillingCurrency"], a2["ConsumedUnit"], a2["SkuId"], a2["SubAccountId"]) == (
        "USD", "Tokens", "big@slow", "acme")
    assert orjson.loads(a2["Tags"]) == {"tenant": "acme", "project": "web", "key": "batch-key"}
    assert (a2["x_InputTokens"], a2["x_CachedInputTokens"], a2["x_OutputTokens"], a2["x_ReasoningTokens"]) == (
        "100", "500", "700", "300")
    u1 = next(r for r in rows if r["x_RequestId"] == "u1")
    assert (u1["BilledCost"], u1["x_PriceMissing"]) == ("", "true")


def test_cloudevents_carry_the_required_attributes_and_their_totals_equal_the_ledgers() -> None:
    events = orjson.loads(b"".join(export_cloudevents(records())))
    assert isinstance(events, list) and len(events) == 7
    for event in events:
        for attribute in (*CLOUDEVENTS_REQUIRED, "subject", "time", "data"):
            assert event[attribute], attribute
        assert event["specversion"] == "1.0"
        assert event["time"].endswith("Z") and parse_time(event["time"]) >= T0
    assert [e["id"] for e in events] == ["a1", "a2", "g1", "s1", "s2", "s3", "u1"]  # id = request id
    assert len({(e["id"], e["source"]) for e in events}) == len(events)
    costs = [Decimal(e["data"]["cost"]) for e in events if e["data"]["cost"] is not None]
    assert sum(costs, Decimal(0)) == _ledger_cost()
    assert sum(e["data"]["total_tokens"] for e in events) == _ledger_tokens().total
    for kind in ("input", "cached_input", "cache_write", "output", "reasoning"):
        assert sum(e["data"][f"{kind}_tokens"] for e in events) == getattr(_ledger_tokens(), kind)
    a2 = next(e for e in events if e["id"] == "a2")
    assert (a2["subject"], a2["data"]["model"], a2["type"], a2["source"]) == (
        "acme", "big", "tokenmeter.usage", "tokenmeter")


def test_a_reexport_is_the_same_events() -> None:
    assert b"".join(export_cloudevents(records())) == b"".join(export_cloudevents(records()))


def test_cloudevent_subjects() -> None:
    a1 = records()[0]
    assert cloudevent(a1, subject="project")["subject"] == "acme/web"
    assert cloudevent(a1, subject="team")["subject"] == "acme/web/search"
    assert cloudevent(records()[1], subject="team")["subject"] == "acme/web"  # a key without a team
    assert cloudevent(a1, subject="key")["subject"] == "web-key"
    assert cloudevent(a1, source="gw-eu", type_="llm.tokens")["source"] == "gw-eu"


def test_an_empty_ledger_exports_an_empty_array() -> None:
    assert orjson.loads(b"".join(export_cloudevents([]))) == []
    assert "".join(export_csv([])).splitlines() == [",".join(CSV_COLUMNS)]


def test_jsonl_export_is_the_folded_ledger(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    write_ledger(path)
    out = tmp_path / "export.jsonl"
    out.write_bytes(b"".join(export_jsonl(read_ledger(path).records)))
    assert read_ledger(out).records == records()
    assert len(out.read_bytes().splitlines()) == len(records())  # the superseded line is gone
    totals = ledger_totals(read_ledger(out).records)
    assert (totals.tokens, totals.cost(), totals.unpriced) == (_ledger_tokens(), {"USD": _ledger_cost()}, 1)


def test_exact_sums_never_round() -> None:
    recs = [UsageRecord(str(i), T0, Decision.ADMITTED, "v", prompt_tokens=1, cost="0.000000000000000001",
                        currency="USD") for i in range(1000)]
    recs.append(UsageRecord("big", T0, Decision.ADMITTED, "v", prompt_tokens=1, cost="123456789012.5",
                            currency="USD"))
    events = orjson.loads(b"".join(export_cloudevents(recs)))
    total = sum((Decimal(e["data"]["cost"]) for e in events), Decimal(0))
    assert money_str(total) == "123456789012.500000000000001"
    assert ledger_totals(recs).cost() == {"USD": Decimal("123456789012.500000000000001")}


# -- reconcile ------------------------------------------------------------------------------


def _served(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def _line(rid: str | None, prompt: int, completion: int, **kw: object) -> dict[str, object]:
    return {"id": f"chatcmpl-{rid}", "x_tokenmeter_request_id": rid, "tenant": "acme", "path": "/v1/chat/completions",
            "stream": False, "status": 200, "prompt_tokens": prompt, "completion_tokens": completion,
            "completed": True, "usage_reported": True, **kw}


def test_reconcile_per_request_lists_missing_extra_and_different(tmp_path: Path) -> None:
    recs = records()
    server = read_server_usage(_served(tmp_path / "served.jsonl", [
        _line("a1", 1000, 200),  # agrees
        _line("a2", 2600, 999),  # different completion
        _line("s1", 10, 10), _line("s2", 10, 10), _line("s3", 10, 10), _line("u1", 7, 3),
        _line("zz", 5, 5),  # not in the ledger
        _line("a3", 5, 5),  # the ledger says it was throttled
        _line(None, 4, 4),  # names no request of ours
        # g1 is missing
    ]))
    result = reconcile(recs, server)
    found = {(d.kind, d.key) for d in result.disagreements}
    assert found == {("different", "a2"), ("missing", "g1"), ("extra", "zz"), ("extra", "a3"),
                     ("extra", "chatcmpl-None")}
    different = next(d for d in result.disagreements if d.kind == "different")
    assert (different.ledger_completion, different.server_completion) == (1000, 999)
    missing = next(d for d in result.disagreements if d.kind == "missing")
    assert "ledger estimated" in missing.note and "ended incomplete" in missing.note
    assert "throttled" in next(d.note for d in result.disagreements if d.key == "a3")
    assert result.compared == 6
    assert "5 disagreements (missing 1, extra 3, different 1)" in result.summary()


def test_reconcile_per_request_by_pool_and_time(tmp_path: Path) -> None:
    recs = records()
    server = read_server_usage(_served(tmp_path / "served.jsonl", [_line("a2", 2600, 1000), _line("g1", 50, 100)]))
    # pool slow: only a2 is expected there; g1 (pool fast in the ledger) is extra on this server
    result = reconcile(recs, server, pool="slow")
    assert [(d.kind, d.key) for d in result.disagreements] == [("extra", "g1")]
    assert "on pool fast" in result.disagreements[0].note
    # a range that leaves g1 out: its server line is not called extra
    result = reconcile(recs, server, span=TimeRange(None, T0 + 3600), pool="slow")
    assert result.disagreements == [] and result.compared == 1


def test_a_request_the_server_saw_twice_is_different(tmp_path: Path) -> None:
    server = read_server_usage(_served(tmp_path / "s.jsonl", [_line("a1", 500, 100), _line("a1", 500, 100)]))
    result = reconcile([records()[0]], server)
    assert [(d.kind, d.key) for d in result.disagreements] == [("different", "a1")]
    assert "2 server lines" in result.disagreements[0].note


async def test_reconcile_reads_the_fake_model_servers_served_log(tmp_path: Path) -> None:
    log_path = tmp_path / "served.jsonl"
    body = {"model": "small", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
    async with TestClient(TestServer(build_app("fast", served_log=log_path))) as c:
        for rid in ("k1", "k2", "k9"):
            await (await c.post("/v1/chat/completions", json=body, headers={"x-tokenmeter-request-id": rid})).read()
        await (await c.post("/v1/chat/completions", json=body)).read()  # no id of ours
    served = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    prompt, completion = served[0]["prompt_tokens"], served[0]["completion_tokens"]
    assert (prompt, completion) == (5, 2)

    def rec(rid: str, p: int, c: int) -> UsageRecord:
        return UsageRecord(rid, T0, Decision.ADMITTED, "v", tenant="acme", model="small", pool="fast",
                           prompt_tokens=p, completion_tokens=c, usage_source="reported")

    ledger = [rec("k1", prompt, completion), rec("k2", prompt, completion + 1), rec("k3", 1, 1)]
    result = reconcile(ledger, read_server_usage(log_path))
    assert sorted((d.kind, d.key) for d in result.disagreements) == [
        ("different", "k2"), ("extra", "chatcmpl-fake-fast-3"), ("extra", "k9"), ("missing", "k3")]


def test_reconcile_per_period(tmp_path: Path) -> None:
    recs = records()
    hour = "2026-11-27T10:00:00Z"
    server = read_server_usage(_served(tmp_path / "periods.jsonl", [
        {"period_start": hour, "tenant": "acme", "model": "small", "prompt_tokens": 1000, "completion_tokens": 200},
        {"period_start": hour, "tenant": "acme", "model": "big", "prompt_tokens": 2000, "completion_tokens": 1000},
        {"period_start": hour, "tenant": "acme", "model": "big", "prompt_tokens": 600, "completion_tokens": 0},
        {"period_start": hour, "tenant": "shade", "model": "small", "prompt_tokens": 30, "completion_tokens": 31},
        {"period_start": T0 + 7200, "tenant": "initech", "model": "small", "prompt_tokens": 1, "completion_tokens": 1},
        # globex 11:00 (g1 and u1) is missing
    ]))
    result = reconcile(recs, server)
    found = {(d.kind, d.key): d for d in result.disagreements}
    assert set(found) == {
        ("different", "2026-11-27T10:00:00Z shade small"),
        ("missing", "2026-11-27T11:00:00Z globex small"),
        ("missing", "2026-11-27T11:00:00Z globex mystery"),
        ("extra", "2026-11-27T12:00:00Z initech small"),
    }
    assert found[("different", "2026-11-27T10:00:00Z shade small")].ledger_completion == 30
    assert result.compared == 3  # acme small, acme big (its two lines add up), shade small
    in_range = reconcile(recs, server, span=TimeRange(T0, T0 + 3600))
    assert [(d.kind, d.key) for d in in_range.disagreements] == [("different", "2026-11-27T10:00:00Z shade small")]


@pytest.mark.parametrize(("lines", "reason"), [
    ([b'{"x_tokenmeter_request_id": "a", "prompt_tokens": 1}'], "1: prompt_tokens and completion_tokens"),
    ([b'{"x_tokenmeter_request_id": "a", "prompt_tokens": 1, "completion_tokens": -1}'], "1: prompt_tokens"),
    ([b"not json"], "1: not JSON"),
    ([b"[1]"], "1: each line must be a JSON object"),
    ([b'{"request_id": "a", "prompt_tokens": 1, "completion_tokens": 1}',
      b'{"period_start": 0, "tenant": "a", "model": "m", "prompt_tokens": 1, "completion_tokens": 1}'],
     "2: per-period"),
    ([b'{"period_start": "2026-11-27T10:30:00Z", "tenant": "a", "model": "m", "prompt_tokens": 1, '
      b'"completion_tokens": 1}'], "1: period_start '2026-11-27T10:30:00Z' is not the start of a UTC hour"),
    ([b'{"period_start": 0, "model": "m", "prompt_tokens": 1, "completion_tokens": 1}'], "1: a per-period line needs"),
])
def test_a_bad_server_usage_file_names_its_line(tmp_path: Path, lines: list[bytes], reason: str) -> None:
    path = tmp_path / "server.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(LedgerError) as info:
        read_server_usage(path)
    assert str(info.value).startswith(f"{path}:{reason}"), str(info.value)


def test_records_without_usage_stay_out_of_every_export_total() -> None:
    refused = UsageRecord("x", T0, Decision.THROTTLED, "v", ending=Ending.REFUSED, cost="0", currency="USD")
    assert list(export_csv([refused]))[1:] == []
    assert ledger_totals([refused]).cost() == {"USD": Decimal(0)}
