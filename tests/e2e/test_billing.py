"""Evidence you can bill from, end to end: traffic through Envoy is recorded with its cost from the
policy's price catalog, and the CLI's report, exports and reconcile agree with the ledger and with
what the model servers say they served."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import chat, request, usage_records, wait_record
from tests.e2e.conftest import E2E_POLICY

BASIC = "e2e-basic-key"
TOKENMETER = str(Path(sys.executable).parent / "tokenmeter")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMETER, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def billed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    run = tmp_path_factory.mktemp("billing")
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=run / "run", fake_extra=())) as s:
        rids = []
        for i in range(6):
            reply = chat(s.base_url, BASIC, stream=i % 2 == 0, max_tokens=10 + i)
            rids.append(reply.headers["x-tokenmeter-request-id"])
        body = {"model": "claude-test", "max_tokens": 7,
                "messages": [{"role": "user", "content": "four words of prompt"}]}
        reply = request(s.base_url, "POST", "/v1/messages", json.dumps(body).encode(),
                        {"x-api-key": BASIC, "content-type": "application/json"})
        rids.append(reply.headers["x-tokenmeter-request-id"])
        assert chat(s.base_url, "sk-unknown").status == 401
        for rid in rids:
            wait_record(s.usage_log, rid)
        served = run / "served.jsonl"
        lines = []
        for port in s.pool_ports.values():
            lines += request(f"http://127.0.0.1:{port}", "GET", "/fake/served").json()
        served.write_text("".join(json.dumps(x) + "\n" for x in lines))
        yield s, served


def test_each_record_is_priced_from_the_catalog_when_it_is_written(billed: tuple[Stack, Path]) -> None:
    stack, _ = billed
    recs = [r for r in usage_records(stack.usage_log) if r["decision"] == "admitted"]
    assert recs and all(r["currency"] == "USD" and r["price_version"] == "e2e-prices-1" for r in recs)
    chat_rec = next(r for r in recs if r["model"] == "llama-test")
    expected = (Decimal(chat_rec["prompt_tokens"]) * Decimal("0.15")
                + Decimal(chat_rec["completion_tokens"]) * Decimal("0.60")) / Decimal(1_000_000)
    assert Decimal(chat_rec["cost"]) == expected
    claude = next(r for r in recs if r["model"] == "claude-test")
    assert claude["api"] == "anthropic_messages" and Decimal(claude["cost"]) > 0
    assert all(r["replica"] for r in recs) and all(r["time_to_first_token_ms"] is not None for r in recs)


def test_exports_validate_and_their_totals_equal_the_ledger(billed: tuple[Stack, Path], tmp_path: Path) -> None:
    stack, _ = billed
    ledger = usage_records(stack.usage_log)
    total_cost = sum(Decimal(r["cost"]) for r in ledger if r.get("cost") is not None)
    total_tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in ledger)

    out = tmp_path / "focus.csv"
    result = _cli("usage", "export", "--format", "csv", "--usage-log", str(stack.usage_log), "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    for column in ("ChargePeriodStart", "ChargePeriodEnd", "BilledCost", "EffectiveCost", "BillingCurrency",
                   "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "SkuId"):
        assert column in rows[0], column
    assert sum(Decimal(r["BilledCost"] or "0") for r in rows) == total_cost

    events = json.loads(_cli("usage", "export", "--format", "cloudevents", "--usage-log",
                             str(stack.usage_log)).stdout)
    for event in events:
        assert {"specversion", "id", "source", "type", "subject", "time", "data"} <= event.keys()
        assert event["specversion"] == "1.0"
    assert {e["id"] for e in events} <= {r["request_id"] for r in ledger}
    assert {r["request_id"] for r in ledger if r["decision"] == "admitted"} <= {e["id"] for e in events}
    again = json.loads(_cli("usage", "export", "--format", "cloudevents", "--usage-log",
                            str(stack.usage_log)).stdout)
    assert [e["id"] for e in again] == [e["id"] for e in events]  # a re-export is idempotent
    report = json.loads(_cli("usage", "report", "--by", "tenant", "--format", "json", "--usage-log",
                             str(stack.usage_log)).stdout)
    assert sum(int(row["total_tokens"]) for row in report["rows"]) == total_tokens
    assert sum(Decimal(row["cost_USD"]) for row in report["rows"]) == total_cost


def test_reconcile_agrees_with_what_the_model_servers_served(billed: tuple[Stack, Path], tmp_path: Path) -> None:
    stack, served = billed
    ok = _cli("usage", "reconcile", "--server-usage", str(served), "--usage-log", str(stack.usage_log))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = served.read_text().splitlines()
    tampered = tmp_path / "served.jsonl"
    first = json.loads(lines[0])
    first["completion_tokens"] += 5
    tampered.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    bad = _cli("usage", "reconcile", "--server-usage", str(tampered), "--usage-log", str(stack.usage_log))
    assert bad.returncode == 1 and first["x_tokenmeter_request_id"] in bad.stdout
