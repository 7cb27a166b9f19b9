"""`tokenmeter audit verify` and `audit show` as an operator runs them, on a log the real AuditLog wrote."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from extproc.audit import AuditLog, BreakerState, EnforcementKind, breaker, enforcement
from extproc.devstack.stack import DEFAULT_POLICY
from extproc.policy import PolicyStore

TOKENMETER = str(Path(sys.executable).parent / "tokenmeter")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMETER, *args], capture_output=True, text=True, timeout=60)


def _edit_policy(policy: Path) -> None:
    text = policy.read_text()
    mtime = policy.stat().st_mtime_ns + 1_000_000_000  # seen as an edit even within one mtime tick
    policy.write_text(text.replace('version: "2026-11-27.1"', 'version: "2026-11-28.1"')
                      .replace("tokens_per_minute: 1500,", "tokens_per_minute: 3000,"))
    os.utime(policy, ns=(mtime, mtime))


async def _write_log(path: Path, policy: Path) -> None:
    """What a processor records: the policy load, an edit, enforcement events, the breaker."""
    log = AuditLog(path, flush_interval=0.01)
    log.start()
    store = PolicyStore(policy, audit=log)
    version = store.current.version
    log.record(enforcement(EnforcementKind.THROTTLE, "req-1", "globex", "search", "globex-search",
                           "key:globex-search", "tokens", version))
    log.record(breaker(BreakerState.OPEN, "3 consecutive failures"))
    log.record(enforcement(EnforcementKind.DEGRADED_ADMISSION, "req-2", "acme", "chatbot", "acme-batch",
                           None, None, version))
    log.record(breaker(BreakerState.CLOSED, "Redis answers again"))
    await asyncio.to_thread(_edit_policy, policy)
    store.reload_now()
    log.record(enforcement(EnforcementKind.BLOCK, "req-3", "acme", "chatbot", "acme-chatbot-web",
                           "key:acme-chatbot-web", "quota_tokens", store.current.version))
    await log.aclose()


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.read_text())
    path = tmp_path / "audit.jsonl"
    asyncio.run(_write_log(path, policy))
    return path


def _copy(src: Path, name: str, edit: Callable[[list[bytes]], None]) -> Path:
    lines = src.read_bytes().splitlines(keepends=True)
    edit(lines)
    dst = src.with_name(name)
    dst.write_bytes(b"".join(lines))
    return dst


def test_verify_passes_on_a_real_log_and_prints_the_head(audit_log: Path) -> None:
    lines = audit_log.read_bytes().splitlines()
    assert len(lines) == 7
    head = orjson.loads(lines[-1])["hash"]
    result = _run("audit", "verify", str(audit_log))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{audit_log}: OK (7 events, head {head})"
    anchored = _run("audit", "verify", str(audit_log), "--anchor", head)
    assert anchored.returncode == 0, anchored.stderr


def test_verify_names_an_edited_line(audit_log: Path) -> None:
    def edit(lines: list[bytes]) -> None:
        lines[1] = lines[1].replace(b'"kind":"throttle"', b'"kind":"alert"')

    copy = _copy(audit_log, "edited.jsonl", edit)
    result = _run("audit", "verify", str(copy))
    assert result.returncode == 1
    assert re.fullmatch(rf"{re.escape(str(copy))}:2: .*edited.*\n", result.stderr), result.stderr
    assert result.stdout == ""


def test_verify_names_an_inserted_line(audit_log: Path) -> None:
    def insert(lines: list[bytes]) -> None:
        lines.insert(4, lines[1])

    copy = _copy(audit_log, "inserted.jsonl", insert)
    result = _run("audit", "verify", str(copy))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{copy}:5: seq is 1, expected 4"), result.stderr


def test_verify_names_a_deleted_line(audit_log: Path) -> None:
    def delete(lines: list[bytes]) -> None:
        del lines[2]

    copy = _copy(audit_log, "deleted.jsonl", delete)
    result = _run("audit", "verify", str(copy))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{copy}:3: seq is 3, expected 2: 1 line deleted before this one"


def test_a_deleted_last_line_is_caught_by_the_anchor_only(audit_log: Path) -> None:
    head = _run("audit", "verify", str(audit_log)).stdout.split("head ")[1].rstrip(")\n")

    def delete_last(lines: list[bytes]) -> None:
        del lines[-1]

    copy = _copy(audit_log, "shortened.jsonl", delete_last)
    assert _run("audit", "verify", str(copy)).returncode == 0  # a valid, shorter chain
    result = _run("audit", "verify", str(copy), "--anchor", head)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{copy}:7: anchor {head} is not in the log"), result.stderr


def test_verify_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = _run("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2
    assert f"cannot read {tmp_path / 'nope.jsonl'}" in result.stderr


def test_show_prints_events_of_a_type(audit_log: Path) -> None:
    result = _run("audit", "show", str(audit_log), "--type", "policy_loaded")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert len(rows) == 2
    assert "version=2026-11-27.1" in rows[0] and "previous_version" not in rows[0]
    assert "previous_version=2026-11-27.1" in rows[1]
    assert '"key:globex-search":{"tokens_per_minute":[1500,3000]}' in rows[1]
    shown = _run("audit", "show", str(audit_log), "--type", "enforcement", "--type", "breaker").stdout
    assert re.findall(r" (?:kind|state)=(\w+)", shown) == ["throttle", "open", "degraded_admission", "closed", "block"]
