"""The `tokenmeter` command as an operator runs it."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from extproc.devstack.stack import DEFAULT_POLICY

TOKENMETER = str(Path(sys.executable).parent / "tokenmeter")


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMETER, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_a_malformed_policy_with_file_line_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    lines = DEFAULT_POLICY.read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines) if line.startswith("mode:"))
    lines[line_no] = "mode: enforced"
    bad.write_text("\n".join(lines) + "\n")
    result = _run("serve", "--policy", str(bad), "--listen", "127.0.0.1:0", timeout=30)
    assert result.returncode == 2
    assert f"{bad}:{line_no + 1}:" in result.stderr
    assert "enforced" in result.stderr


def test_policy_check_accepts_the_example_and_names_the_line_of_an_unknown_key(tmp_path: Path) -> None:
    ok = _run("policy", "check", str(DEFAULT_POLICY))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_POLICY.read_text() + "surprise: 1\n")
    result = _run("policy", "check", str(bad))
    assert result.returncode == 2
    line = len(DEFAULT_POLICY.read_text().splitlines()) + 1
    assert re.search(rf"{re.escape(str(bad))}:{line}: .*surprise", result.stderr), result.stderr


def test_hash_key_prints_the_sha256_the_policy_stores() -> None:
    result = _run("hash-key", "tm-demo-acme-web")
    digest = hashlib.sha256(b"tm-demo-acme-web").hexdigest()
    assert result.stdout.strip() == digest
    assert digest in DEFAULT_POLICY.read_text()


def test_demo_runs_the_stack_and_prints_the_usage_table(tmp_path: Path) -> None:
    result = _run("demo", "--run-dir", str(tmp_path / "demo"), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith(("acme ", "globex "))}
    assert set(rows) == {"acme-chatbot-web", "acme-batch", "globex-search"}
    assert int(rows["globex-search"][3]) > 0, "globex's small budget throttles part of the burst"
    assert "401x3" in out
    assert re.search(r"\(unknown\)\s+\(unknown key\)\s+0\s+0\s+3", out)
    assert "cheap=" in out and "h100=" in out
    admitted = sum(int(r[2]) for r in rows.values())
    assert admitted > 0 and all(int(r[6]) > 0 for r in rows.values()), "completion tokens metered for every key"
    report = _run("report", str(tmp_path / "demo" / "usage.jsonl"))
    assert report.returncode == 0
    assert "acme-chatbot-web" in report.stdout
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "demo left processes running"


def test_report_on_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("report", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_serve_refuses_a_settle_secret_that_is_too_short(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("short\n")
    result = _run("serve", "--policy", str(DEFAULT_POLICY), "--listen", "127.0.0.1:0",
                  "--settle-secret-file", str(secret), timeout=30)
    assert result.returncode == 2
    assert "at least 16 bytes" in result.stderr and str(secret) in result.stderr
