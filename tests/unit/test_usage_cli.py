"""`tokenmeter usage report | export | reconcile`, run as the installed command on a ledger written
by the real sink."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from extproc.billing import money_str
from extproc.records.export import CSV_COLUMNS
from tests.unit.ledger_samples import POLICY, records, write_ledger

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "tokenmeter"
TOKENMETER = [str(_SCRIPT)] if _SCRIPT.exists() else [shutil.which("tokenmeter") or "tokenmeter"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOKENMETER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger") / "usage.jsonl"
    write_ledger(path)
    return path


def _cost() -> Decimal:
    return sum((Decimal(r.cost) for r in records() if r.cost is not None), Decimal(0))


def test_report_is_a_terminal_table_by_default(ledger: Path) -> None:
    result = _run("usage", "report", "--usage-log", str(ledger))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["tenant", "requests"]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[1] == str(len(records()))
    assert money_str(_cost()) in total.split()
    assert "shadow mode" in result.stdout


def test_report_by_dimensions_over_a_range_as_csv_and_json(ledger: Path) -> None:
    result = _run("usage", "report", "--usage-log", str(ledger), "--by", "tenant,pool", "--from",
                  "2026-11-27T11:00:00Z", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {(r["tenant"], r["pool"]) for r in rows} == {("globex", "fast"), ("globex", "(none)")}
    result = _run("usage", "report", "--usage-log", str(ledger), "--by", "key", "--to", "2026-11-27T11:00:00Z",
                  "--format", "json")
    doc = orjson.loads(result.stdout)
    assert {r["key"] for r in doc["rows"]} == {"web-key", "batch-key", "s-key", "(none)"}


def test_report_classifies_shadow_records_with_the_policy(ledger: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    doc = orjson.loads(_run("usage", "report", "--usage-log", str(ledger), "--policy", str(policy),
                            "--format", "json").stdout)
    assert doc["shadow"] == [{"tenant": "shade", "shadow": 3, "would_throttle": 1, "would_block": 2,
                              "would_alert": 0, "unclassified": 0}]


def test_export_csv_focus(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "focus.csv"
    result = _run("usage", "export", "--usage-log", str(ledger), "--format", "csv", "--output", str(out))
    assert result.returncode == 0, result.stderr
    reader = csv.DictReader(io.StringIO(out.read_text()))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    rows = list(reader)
    assert sum((Decimal(r["BilledCost"]) for r in rows if r["BilledCost"]), Decimal(0)) == _cost()
    assert f"{money_str(_cost())} USD" in result.stderr and "1 with tokens but no price" in result.stderr


def test_export_cloudevents_to_stdout(ledger: Path) -> None:
    result = _run("usage", "export", "--usage-log", str(ledger), "--format", "cloudevents", "--subject", "project",
                  "--source", "gw-eu", "--from", "2026-11-27T10:00:00Z", "--to", "2026-11-27T10:02:00Z")
    assert result.returncode == 0, result.stderr
    events = orjson.loads(result.stdout)
    assert [(e["id"], e["subject"], e["source"]) for e in events] == [("a1", "acme/web", "gw-eu")]
    assert events[0]["data"]["cost"] == "0.00024"


def test_export_jsonl_is_the_folded_ledger(ledger: Path) -> None:
    result = _run("usage", "export", "--usage-log", str(ledger), "--format", "jsonl")
    lines = result.stdout.splitlines()
    assert len(lines) == len(records()) and len(ledger.read_text().splitlines()) == len(records()) + 1
    assert orjson.loads(lines[0])["cost"] == "0.00024"  # a1's later line


def test_reconcile_exits_1_listing_disagreements(ledger: Path, tmp_path: Path) -> None:
    served = tmp_path / "served.jsonl"
    served.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in [
        {"id": "x1", "x_tokenmeter_request_id": "a2", "prompt_tokens": 2600, "completion_tokens": 1000},
        {"id": "x2", "x_tokenmeter_request_id": "nope", "prompt_tokens": 1, "completion_tokens": 1},
    ]))
    result = _run("usage", "reconcile", "--usage-log", str(ledger), "--server-usage", str(served), "--pool", "slow")
    assert result.returncode == 1, result.stderr
    assert "1 requests agree; 1 disagreements (missing 0, extra 1, different 0)" in result.stdout
    assert "nope" in result.stdout
    agreed = _run("usage", "reconcile", "--usage-log", str(ledger), "--server-usage", str(served), "--pool", "slow",
                  "--format", "json", "--to", "2026-11-27T11:00:00Z")
    doc = orjson.loads(agreed.stdout)
    assert [d["key"] for d in doc["disagreements"]] == ["nope"]


def test_errors_are_clear(ledger: Path, tmp_path: Path) -> None:
    missing = _run("usage", "report", "--usage-log", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_id": "x"}\n{}\n')
    result = _run("usage", "export", "--format", "csv", "--usage-log", str(bad))
    assert result.returncode == 2 and f"{bad}:1: not a usage record" in result.stderr
    result = _run("usage", "report", "--usage-log", str(ledger), "--by", "region")
    assert result.returncode == 2 and "unknown dimension region" in result.stderr
    result = _run("usage", "report", "--usage-log", str(ledger), "--from", "yesterday")
    assert result.returncode == 2 and "not a time" in result.stderr
    result = _run("usage", "export", "--usage-log", str(ledger))
    assert result.returncode == 2 and "--format" in result.stderr
