"""Processor replicas that fail over, through real Envoy: a replica that is killed or drains is taken
out of rotation (outlier detection, the gRPC health check, a retry of a stream that could not be
opened) and the clients see no failures beyond what was in flight on it."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import Reply, chat, request
from tests.e2e.conftest import E2E_POLICY

BASIC = "e2e-basic-key"
CLIENTS = 6


@pytest.fixture
def two_replicas(tmp_path: Path) -> Iterator[Stack]:
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run", processors=2)) as s:
        yield s


def _steady_load(stack: Stack, sig: signal.Signals) -> tuple[list[tuple[float, Reply]], float]:
    """CLIENTS clients in a loop; `sig` to the second replica after 1 s; 3 s more of load."""
    replies: list[tuple[float, Reply]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            replies.append((time.monotonic(), chat(stack.base_url, BASIC, max_tokens=3)))

    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(CLIENTS):
            pool.submit(client)
        time.sleep(1.0)
        at = time.monotonic()
        stack.proc("processor-2").popen.send_signal(sig)
        time.sleep(3.0)
        stop.set()
    return replies, at


def test_kill_9_of_one_replica_fails_at_most_what_was_in_flight_on_it(two_replicas: Stack) -> None:
    replies, killed_at = _steady_load(two_replicas, signal.SIGKILL)
    before = [r for t, r in replies if t < killed_at]
    after = [r for t, r in replies if t >= killed_at]
    assert before and all(r.status == 200 for r in before)
    failed = [r for r in after if r.status != 200]
    # each client has at most one request in flight, half of them on the killed replica at most
    assert len(failed) <= CLIENTS, [(r.status, r.body[:100]) for r in failed]
    assert len(after) > 10 * CLIENTS, "the other replica kept serving"


def test_sigterm_of_one_replica_fails_nothing(two_replicas: Stack) -> None:
    replies, _ = _steady_load(two_replicas, signal.SIGTERM)
    assert [r.status for _, r in replies if r.status != 200] == []
    assert two_replicas.proc("processor-2").popen.wait(timeout=10) == 0


def test_with_every_replica_gone_the_client_gets_an_openai_style_json_error(tmp_path: Path) -> None:
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run")) as s:
        s.stop_processor()
        reply = chat(s.base_url, BASIC)
        assert reply.status >= 500
        error = reply.json()["error"]
        assert error["type"] == "api_error" and error["code"] and error["message"]
        # a body Envoy refuses itself, too
        bad = request(s.base_url, "POST", "/v1/chat/completions", b"x" * (5 * 1024 * 1024),
                      {"authorization": f"Bearer {BASIC}", "content-type": "application/json"})
        assert bad.status == 413 and bad.json()["error"]["code"] == "request_too_large"


def test_envoys_own_codec_errors_are_openai_style_json(tmp_path: Path) -> None:
    import socket

    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run")) as s:
        with socket.create_connection(("127.0.0.1", s.envoy_port), timeout=5) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n")
            raw = conn.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, raw[:300]
    assert json.loads(body)["error"]["type"] == "api_error"
