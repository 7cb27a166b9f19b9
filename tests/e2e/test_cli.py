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


def test_demo_shows_spill_win_back_and_return_then_the_usage_tables(tmp_path: Path) -> None:
    result = _run("demo", "--run-dir", str(tmp_path / "demo"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "--window-scale 0.1" in out, "the demo says that its windows are scaled"
    assert "\x1b[" not in out, "no terminal redraw when stdout is not a terminal"
    # one section per phase, each a header, its events and one plain line a second
    sections = re.split(r"^== phase \d/4 .*$", out, flags=re.M)
    assert len(sections) == 5, out
    alone, comeback, quiet, again = (s.splitlines() for s in sections[1:])
    seconds = [line for s in (alone, comeback, quiet, again) for line in s if line.startswith("t=")]
    assert len(seconds) == 25 and seconds[0].startswith("t=1s [acme alone] | h100 ")

    # 1. acme alone fills h100 up to its max, then spills to the next pool serving each model
    assert any(re.match(r"\s+t=\d+s\s+acme spills from h100 to a100 \(h100 \d+/3000", line) for line in alone), out
    assert any(re.search(r"\[acme alone\] \| h100 \d+/3000: acme \d+ .*\| a100 \d+/6000: acme [1-9]", line)
               for line in alone), out
    # 2. globex comes back: it wins back its guarantee on h100, acme (the borrower) gives way
    assert any("globex comes back to h100 (guarantee 1000) while acme borrows" in line for line in comeback), out
    assert any("globex wins back its guarantee on h100" in line for line in comeback), out
    assert any(re.search(r"\| h100 \d+/3000: acme \d+ \(\+\d+\) globex [1-9]\d* .*\| a100 \d+/6000: acme [1-9]", line)
               for line in comeback), out
    assert any(re.search(r"429/s: .*globex [1-9]", line) for line in comeback), "globex's key limit throttles it"
    # 3. and 4. h100 drains, then takes acme's traffic again
    assert any("h100 drained: 0/3000" in line for line in quiet + again), out
    assert any("acme back on h100" in line for line in again), out
    assert all("spilled/s" not in line for line in again if line.startswith("t=")), out

    # the per-key table of the usage records
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith(("acme ", "globex "))}
    assert set(rows) == {"acme-chatbot-web", "acme-batch", "globex-search"}
    assert int(rows["globex-search"][3]) > 0, "globex's small budget throttles part of its burst"
    assert "401x3" in out
    assert re.search(r"\(unknown\)\s+\(unknown key\)\s+0\s+0\s+3", out)
    assert "a100=" in " ".join(rows["acme-batch"][7:]) and "cheap=" in " ".join(rows["acme-chatbot-web"][7:])
    admitted = sum(int(r[2]) for r in rows.values())
    assert admitted > 0 and all(int(r[6]) > 0 for r in rows.values()), "completion tokens metered for every key"
    # per pool and tenant, with the spills
    pools = {tuple(line.split()[:2]): line.split() for line in out.splitlines()
             if line.startswith(("h100 ", "a100 ", "cheap "))}
    assert {("h100", "acme"), ("h100", "globex"), ("a100", "acme"), ("cheap", "acme")} <= set(pools)
    assert pools[("h100", "acme")][4] == "-" and int(pools[("a100", "acme")][4]) > 0
    assert re.search(r"^spills: acme \d+ \(h100->a100 \d+, h100->cheap \d+\)", out, flags=re.M), out
    assert re.search(r"^429s: globex \d+, Retry-After", out, flags=re.M), out

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
