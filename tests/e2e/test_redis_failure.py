"""Redis stopped or hung under live traffic through Envoy: the fail_open / fail_closed answer
(`tokenmeter serve --redis-failure-mode`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import chat
from tests.e2e.conftest import E2E_POLICY

BASIC = "e2e-basic-key"


def _stack(tmp_path: Path, on_failure: str) -> Stack:
    # a process setting, not policy: tokenmeter serve --redis-failure-mode
    return Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run",
                              processor_extra=("--redis-failure-mode", on_failure, "--redis-deadline-ms", "50")))


@pytest.fixture
def fail_open(tmp_path: Path) -> Iterator[Stack]:
    with _stack(tmp_path, "fail_open") as s:
        yield s


@pytest.fixture
def fail_closed(tmp_path: Path) -> Iterator[Stack]:
    with _stack(tmp_path, "fail_closed") as s:
        yield s


def _decisions(stack: Stack) -> list[tuple[str, bool]]:
    """(decision, degraded) of every usage record so far."""
    time.sleep(0.3)
    return [(r["decision"], r["degraded"]) for r in map(json.loads, stack.usage_log.read_text().splitlines())]


def test_hung_redis_fails_open_within_the_deadline_and_is_recorded_as_degraded(fail_open: Stack) -> None:
    assert chat(fail_open.base_url, BASIC).status == 200
    assert fail_open.redis is not None
    fail_open.redis.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        started = time.monotonic()
        replies = [chat(fail_open.base_url, BASIC, max_tokens=5) for _ in range(5)]
        elapsed = time.monotonic() - started
    finally:
        fail_open.redis.resume()
    assert [r.status for r in replies] == [200] * 5
    assert elapsed < 5 * 0.5, f"admission waited on a hung Redis: {elapsed:.2f}s for 5 requests"
    assert ("admitted", True) in _decisions(fail_open)


def test_stopped_redis_fails_open_and_recovers_when_it_returns(fail_open: Stack) -> None:
    assert fail_open.redis is not None
    fail_open.redis.stop()
    assert chat(fail_open.base_url, BASIC).status == 200
    fail_open.redis.restart()
    deadline = time.monotonic() + 10
    while True:
        reply = chat(fail_open.base_url, BASIC)
        assert reply.status == 200
        if _decisions(fail_open)[-1] == ("admitted", False):
            break
        assert time.monotonic() < deadline, "never went back to the shared limiter"


def test_fail_closed_policy_answers_503_while_redis_is_down(fail_closed: Stack) -> None:
    assert fail_closed.redis is not None
    assert chat(fail_closed.base_url, BASIC).status == 200
    fail_closed.redis.stop()
    reply = chat(fail_closed.base_url, BASIC)
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "quota_service_unavailable"
    assert int(reply.headers["retry-after"]) >= 1


def test_the_circuit_opening_and_closing_is_in_the_audit_trail(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run",
                        processor_extra=("--redis-failure-mode", "fail_open", "--audit-log", str(audit)))
    with Stack(opts) as s:
        assert s.redis is not None
        assert chat(s.base_url, BASIC).status == 200
        s.redis.stop()
        for _ in range(5):  # consecutive failures open the circuit
            assert chat(s.base_url, BASIC, max_tokens=2).status == 200
        s.redis.restart()
        deadline = time.monotonic() + 10
        while '"closed"' not in (audit.read_text() if audit.exists() else ""):
            assert time.monotonic() < deadline, "the circuit never closed in the audit trail"
            chat(s.base_url, BASIC, max_tokens=2)
            time.sleep(0.2)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    states = [e.get("state") for e in events if e["type"] == "breaker"]
    assert states[:2] == ["open", "closed"]
    assert any(e["type"] == "enforcement" and e.get("kind") == "degraded_admission" for e in events)
