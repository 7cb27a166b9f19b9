"""Exactly one usage record per request through a crash: a replica is killed (-9) or stopped
(SIGTERM) under traffic and restarted; `tokenmeter ledger recover` completes the ledger from Envoy's
own access log; joined with what the model servers say they served and what the clients got, no
request is missing and none appears twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import Reply, chat, request, usage_records, wait_record
from tests.e2e.conftest import E2E_POLICY

BASIC = "e2e-basic-key"
CLIENTS = 6


def _served(stack: Stack) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for port in stack.pool_ports.values():
        out += request(f"http://127.0.0.1:{port}", "GET", "/fake/served").json()
    return out




def _traffic(stack: Stack, sig: signal.Signals, victims: tuple[int, ...]) -> list[Reply]:
    replies: list[Reply] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            stream = (n + i) % 2 == 0
            headers = {"x-fake-chunk-delay-ms": "20"} if stream else {}
            try:
                replies.append(chat(stack.base_url, BASIC, stream=stream, max_tokens=5 + i % 7, extra_headers=headers))
            except Exception:
                pass

    with ThreadPoolExecutor(CLIENTS) as pool:
        for n in range(CLIENTS):
            pool.submit(client, n)
        time.sleep(1.0)
        if not victims:  # Redis goes away instead: admissions degrade (fail_open), settlements queue
            assert stack.redis is not None
            stack.redis.pause()
            time.sleep(1.0)
            stack.redis.resume()
        for i in victims:
            victim = stack.proc("processor" if i == 0 else f"processor-{i + 1}")
            victim.popen.send_signal(sig)
            victim.popen.wait(timeout=15)
        time.sleep(0.5)
        for i in victims:
            stack.start_processor(only=i)  # back on the same port
        time.sleep(1.5)
        stop.set()
    time.sleep(1.0)  # Envoy's access log and the processors' ledgers flush (100 ms)
    return replies


@pytest.mark.parametrize(("sig", "victims"), [
    (signal.SIGKILL, (1,)), (signal.SIGTERM, (1,)), (signal.SIGKILL, (0, 1)), (signal.SIGKILL, ()),
], ids=["kill-9-one", "sigterm-one", "kill-9-all", "redis-stalled"])
def test_every_request_has_exactly_one_record_after_a_replica_crashes_and_recovery(
    tmp_path: Path, sig: signal.Signals, victims: tuple[int, ...]
) -> None:
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run", processors=2)
    with Stack(opts) as stack:
        replies = _traffic(stack, sig, victims)
        served = _served(stack)
        before = len(usage_records(stack.usage_log))
        assert stack.redis is not None
        result = subprocess.run(
            [str(Path(sys.executable).parent / "tokenmeter"), "ledger", "recover", "--envoy-log", str(stack.access_log),
             "--usage-log", str(stack.usage_log), "--policy", str(E2E_POLICY), "--redis", stack.redis.url],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        ledger = usage_records(stack.usage_log)
        # What Redis charged the key in its window (all of this test's traffic): the probe's view
        time.sleep(0.5)  # settlements are applied off the request path
        probe = chat(stack.base_url, BASIC, max_tokens=1)
        probe_rec = wait_record(stack.usage_log, probe.headers["x-tokenmeter-request-id"])
        charged = 1_000_000 - int(probe.headers["x-ratelimit-remaining-tokens"]) - probe_rec["reserved_tokens"]
        again = subprocess.run(
            [str(Path(sys.executable).parent / "tokenmeter"), "ledger", "recover", "--envoy-log", str(stack.access_log),
             "--usage-log", str(stack.usage_log), "--policy", str(E2E_POLICY)],
            capture_output=True, text=True, timeout=60,
        )
        assert "0 records recovered" in again.stdout, again.stdout  # idempotent
    print(f"{sig.name} x{len(victims)}: {len(replies)} replies, {len(served)} served, ledger {before} -> "
          f"{len(ledger)} ({result.stdout.strip()})")
    # Each request charged once in Redis, at what it used: what the ledger says the key used (the
    # degraded admissions of a Redis stall were never in Redis). Only a request a replica admitted
    # and died before Envoy got the answer stays charged at its reservation (recorded as refused by
    # Envoy, 0 tokens), until its window passes: at most one per client in flight at the kill.
    basic = [r for r in ledger if r.get("key_id") == "e2e-basic"]
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in basic)
    if sig is signal.SIGKILL and victims:
        assert used <= charged <= used + len(victims) * CLIENTS * 128, (used, charged)
    elif not victims:
        # a degraded admission is in Redis only if its reservation reached Redis after all (the
        # script ran once Redis resumed): then it is settled there to what it used, like any other
        in_redis = sum(r["prompt_tokens"] + r["completion_tokens"] for r in basic if not r["degraded"])
        assert in_redis <= charged <= used, (in_redis, charged, used)
    else:
        assert charged == used, (used, charged)
    counts = Counter(r["request_id"] for r in ledger)
    assert [rid for rid, n in counts.items() if n > 1] == [], "a request recorded twice"
    by_id = {r["request_id"]: r for r in ledger}
    for s in served:  # what a model server did is in the ledger, once, with what it reported
        rec = by_id.get(s["x_tokenmeter_request_id"])
        assert rec is not None, f"served but missing from the ledger: {s}"
        if s["completed"] and s["usage_reported"]:
            assert rec["completion_tokens"] == s["completion_tokens"], (s, rec)
    for reply in replies:  # every answer a client got with our id has its record
        rid = reply.headers.get("x-tokenmeter-request-id")
        if rid:
            assert rid in by_id, f"client got {reply.status} for {rid}, no record"
    assert len(ledger) >= len(replies)
    if len(victims) == 2:  # with every processor down, only Envoy's log knew of the refused requests
        assert len(ledger) > before and any(r["decision"] == "refused_by_envoy" for r in ledger[before:])
    if not victims:  # the Redis stall degraded some admissions, and they are in the ledger like any other
        assert any(r["degraded"] for r in ledger)
