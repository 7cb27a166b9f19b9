"""Processor lifecycle through real Envoy: graceful SIGTERM, health, live policy edits, cut streams."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import Reply, chat, usage_records, wait_record
from tests.e2e.conftest import E2E_POLICY

BASIC = "e2e-basic-key"


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    policy = tmp_path / "policy.yaml"
    shutil.copy(E2E_POLICY, policy)
    with Stack(StackOptions(policy=policy, run_dir=tmp_path / "run")) as s:
        yield s


@pytest.fixture
def each_config_stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run")) as s:
        yield s






def test_health_service_reports_serving(own_stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{own_stack.processor_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_lets_an_open_stream_finish_and_flushes_its_record(each_config_stack: Stack) -> None:
    result: list[Reply] = []
    slow = threading.Thread(
        target=lambda: result.append(
            chat(each_config_stack.base_url, BASIC, stream=True, max_tokens=20,
                 extra_headers={"x-fake-chunk-delay-ms": "50"})
        )
    )
    slow.start()
    time.sleep(0.3)  # the stream is open and mid-way (20 chunks x 50 ms)
    sent_at = time.monotonic()
    proc = each_config_stack.proc("processor")
    proc.popen.send_signal(signal.SIGTERM)
    slow.join(timeout=15)
    assert proc.popen.wait(timeout=15) == 0
    # It exits once its requests have ended, not at the end of the 10 s grace period (with
    # envoy-native.yaml Envoy's access log stream stays open and must be ended by the processor).
    assert time.monotonic() - sent_at < 5.0
    assert result and result[0].status == 200
    chunks = result[0].sse_data()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert len(text.split()) == 20 and result[0].body.rstrip().endswith(b"data: [DONE]")  # the whole stream
    rec = wait_record(each_config_stack.usage_log, result[0].headers["x-tokenmeter-request-id"])
    assert rec["completion_tokens"] == 20 and rec["usage_source"] == "reported"


def test_new_requests_fail_closed_while_the_processor_is_down(own_stack: Stack) -> None:
    own_stack.stop_processor()
    reply = chat(own_stack.base_url, BASIC)
    assert reply.status >= 500  # never forwarded ungoverned
    own_stack.start_processor()
    deadline = time.monotonic() + 10
    while chat(own_stack.base_url, BASIC).status != 200:
        assert time.monotonic() < deadline


def test_policy_edits_apply_live_and_a_bad_edit_keeps_the_last_good_policy(own_stack: Stack) -> None:
    policy = Path(own_stack.opts.policy)
    assert chat(own_stack.base_url, BASIC).headers["x-ratelimit-limit-tokens"] == "1000000"
    policy.write_text(policy.read_text().replace("tokens_per_minute: 1000000, requests_per_minute: 100000",
                                                 "tokens_per_minute: 777777, requests_per_minute: 100000"))
    deadline = time.monotonic() + 10
    while chat(own_stack.base_url, BASIC).headers["x-ratelimit-limit-tokens"] != "777777":
        assert time.monotonic() < deadline, "policy edit not picked up"
        time.sleep(0.2)
    good = policy.read_text()
    policy.write_text(good.replace("  mode: enforce", "  mode: enforce").replace("version:", "versoin:", 1))
    time.sleep(2.5)  # several reload intervals
    reply = chat(own_stack.base_url, BASIC)
    assert reply.status == 200
    assert reply.headers["x-ratelimit-limit-tokens"] == "777777"
    log = own_stack.proc("processor").log_tail(50)
    assert f"{policy}:" in log and "versoin" in log


def test_stream_cut_before_usage_stays_charged_at_the_estimate(each_config_stack: Stack) -> None:
    own_stack = each_config_stack
    try:
        chat(own_stack.base_url, BASIC, stream=True, max_tokens=40, extra_headers={"x-fake-cut-after": "3"})
    except Exception:
        pass
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in usage_records(own_stack.usage_log) if r["ending"] == "incomplete"]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert recs, usage_records(own_stack.usage_log)
    rec = recs[0]
    assert rec["usage_source"] == "estimated"
    assert rec["prompt_tokens"] + rec["completion_tokens"] == rec["reserved_tokens"]


def test_settlement_replaces_the_reservation_with_what_was_used(own_stack: Stack) -> None:
    failed = chat(own_stack.base_url, BASIC, max_tokens=50, extra_headers={"x-fake-status": "500"})
    assert wait_record(own_stack.usage_log, failed.headers["x-tokenmeter-request-id"])["completion_tokens"] == 0
    first = chat(own_stack.base_url, BASIC, max_tokens=None)  # reserves (and is bounded to) the default 64
    assert first.headers["x-tokenmeter-max-output-tokens"] == "64"
    rec1 = wait_record(own_stack.usage_log, first.headers["x-tokenmeter-request-id"])
    assert rec1["completion_tokens"] == 64
    time.sleep(0.2)  # settlement is applied off the request path
    second = chat(own_stack.base_url, BASIC, max_tokens=None)
    rec2 = wait_record(own_stack.usage_log, second.headers["x-tokenmeter-request-id"])
    used_before = 1_000_000 - int(second.headers["x-ratelimit-remaining-tokens"]) - int(rec2["reserved_tokens"])
    # the failed request was refunded whole; the first is charged what it used, not its estimate
    assert used_before == rec1["prompt_tokens"] + rec1["completion_tokens"]


def test_envoy_reaches_the_processor_over_a_unix_socket(tmp_path: Path) -> None:
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "uds", processor_uds=True)) as s:
        assert s.processor_socket.exists()
        reply = chat(s.base_url, BASIC, stream=True, max_tokens=7)
        assert reply.status == 200
        rec = wait_record(s.usage_log, reply.headers["x-tokenmeter-request-id"])
        assert rec["completion_tokens"] == 7
        assert chat(s.base_url, "nope").status == 401


def test_metrics_endpoint_exports_decisions_and_token_usage(tmp_path: Path) -> None:
    from extproc.devstack.ports import free_port
    from tests.e2e.client import request

    port = free_port()
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "m", processor_extra=("--metrics-port", str(port)))
    with Stack(opts) as s:
        assert chat(s.base_url, BASIC, max_tokens=11).status == 200
        assert chat(s.base_url, "nope").status == 401
        time.sleep(0.2)
        text = request(f"http://127.0.0.1:{port}", "GET", "/metrics").body.decode()
    assert 'tokenmeter_decisions_total{' in text
    usage = [line for line in text.splitlines()
             if line.startswith("gen_ai_client_token_usage") and 'gen_ai_token_type="output"' in line]
    assert usage and float(usage[0].rsplit(" ", 1)[1]) == 11.0
    assert 'reason="refused"' in text
    assert "e2e-basic-key" not in text
    assert 'gen_ai_request_model="llama-test"' in text


def test_client_chosen_model_names_never_grow_the_metrics(tmp_path: Path) -> None:

    from extproc.devstack.ports import free_port
    from tests.e2e.client import request

    port = free_port()
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "m", processor_extra=("--metrics-port", str(port)))
    with Stack(opts) as s:
        def sizes(n: int, start: int) -> int:
            for i in range(start, start + n):
                body = {"model": f"{i}-" + "m" * 20_000, "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 1}
                reply = request(s.base_url, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                {"authorization": f"Bearer {BASIC}", "content-type": "application/json"})
                assert reply.status == 200
            time.sleep(0.3)
            return len(request(f"http://127.0.0.1:{port}", "GET", "/metrics").body.splitlines())

        first, later = sizes(5, 0), sizes(60, 5)
        text = request(f"http://127.0.0.1:{port}", "GET", "/metrics").body.decode()
        recs = [json.loads(line) for line in s.usage_log.read_text().splitlines()]
    assert later == first, "each new model name added series to /metrics"
    assert 'gen_ai_request_model="other"' in text and "mmmm" not in text
    assert all(len(r["model"]) <= 259 for r in recs if r.get("model"))  # bounded in the evidence too


def test_several_processor_processes_share_limits_through_redis(tmp_path: Path) -> None:
    """Two processors behind one Envoy cluster: Envoy spreads requests, Redis keeps one budget."""
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "two", processors=2)
    with Stack(opts) as s:
        assert [p.name for p in s.procs if p.name.startswith("processor")] == ["processor", "processor-2"]
        statuses = [chat(s.base_url, "e2e-rpm-key", max_tokens=1).status for _ in range(6)]
        assert statuses == [200, 200, 200, 429, 429, 429]  # 3 requests/minute, whichever process answers
        rids = [chat(s.base_url, BASIC, max_tokens=2).headers["x-tokenmeter-request-id"] for _ in range(8)]
        pids = {rid.split("-", 1)[0] for rid in rids}
        assert len(pids) == 2, "both processes served requests"
        for rid in rids:
            assert wait_record(s.usage_log, rid)["completion_tokens"] == 2


def test_shadow_mode_meters_and_records_but_never_refuses(tmp_path: Path) -> None:
    policy = tmp_path / "shadow.yaml"
    policy.write_text(E2E_POLICY.read_text().replace("mode: enforce", "mode: shadow"))
    with Stack(StackOptions(policy=policy, run_dir=tmp_path / "run")) as s:
        replies = [chat(s.base_url, "e2e-rpm-key", max_tokens=3) for _ in range(5)]  # limit: 3 per minute
        assert [r.status for r in replies] == [200] * 5
        decisions = [wait_record(s.usage_log, r.headers["x-tokenmeter-request-id"])["decision"] for r in replies]
        assert decisions == ["admitted"] * 3 + ["shadow"] * 2
        assert chat(s.base_url, "sk-unknown").status == 401  # identity is still enforced


def test_one_tenant_in_shadow_mode_is_metered_but_never_refused_while_others_are_enforced(tmp_path: Path) -> None:
    policy = tmp_path / "tenant-shadow.yaml"
    text = E2E_POLICY.read_text()
    policy.write_text(text.replace("  globex:\n", "  globex:\n    mode: shadow\n", 1))
    assert policy.read_text() != text
    with Stack(StackOptions(policy=policy, run_dir=tmp_path / "run")) as s:
        replies = [chat(s.base_url, "e2e-rpm-key", max_tokens=3) for _ in range(5)]  # globex, 3 per minute
        assert [r.status for r in replies] == [200] * 5
        recs = [wait_record(s.usage_log, r.headers["x-tokenmeter-request-id"]) for r in replies]
        assert [r["decision"] for r in recs] == ["admitted"] * 3 + ["shadow"] * 2
        assert recs[-1]["decided_by"]["scope"] == "key:e2e-rpm"  # what enforce mode would have done
        report = subprocess.run([str(Path(sys.executable).parent / "tokenmeter"), "usage", "report", "--by", "tenant",
                                 "--format", "json", "--usage-log", str(s.usage_log)],
                                capture_output=True, text=True, timeout=30)
        globex = next(row for row in json.loads(report.stdout)["rows"] if row["tenant"] == "globex")
        assert globex["shadow"] == 2 and globex["would_throttle"] == 2


def test_replicas_settle_each_others_requests_and_stop_without_waiting_out_the_grace(
    tmp_path: Path,
) -> None:
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "two", processors=2)
    with Stack(opts) as s:
        rids = [chat(s.base_url, BASIC, max_tokens=2).headers["x-tokenmeter-request-id"] for _ in range(8)]
        assert len({rid.split("-", 1)[0] for rid in rids}) == 2, "both processes admitted requests"
        for rid in rids:  # whichever replica Envoy's access log reaches settles and records them all
            assert wait_record(s.usage_log, rid)["completion_tokens"] == 2
        for proc in [p for p in s.procs if p.name.startswith("processor")]:
            started = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            assert proc.popen.wait(timeout=15) == 0
            assert time.monotonic() - started < 5.0, f"{proc.name} waited out its grace period"


def test_a_settle_secret_seals_admissions_and_they_still_settle(tmp_path: Path) -> None:
    secret = tmp_path / "settle.secret"
    secret.write_text("e2e-settle-secret-0123456789\n")
    opts = StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run",
                        processor_extra=("--settle-secret-file", str(secret)))
    with Stack(opts) as s:
        for stream in (False, True):
            reply = chat(s.base_url, BASIC, stream=stream, max_tokens=7)
            assert reply.status == 200
            rec = wait_record(s.usage_log, reply.headers["x-tokenmeter-request-id"])
            assert rec["completion_tokens"] == 7 and rec["usage_source"] == "reported"


def test_a_policy_that_refuses_over_the_cap_answers_400_naming_the_cap(own_stack: Stack) -> None:
    policy = Path(own_stack.opts.policy)
    cap = "  max_tokens_cap: 2048\n"
    policy.write_text(policy.read_text().replace(cap, cap + "  over_cap: refuse\n"))
    deadline = time.monotonic() + 10
    while (reply := chat(own_stack.base_url, BASIC, max_tokens=3000)).status == 200:
        assert time.monotonic() < deadline, "policy edit not picked up"
        time.sleep(0.2)
    assert reply.status == 400
    error = reply.json()["error"]
    assert "2048" in error["message"] and error["param"] == "max_tokens"
    assert chat(own_stack.base_url, BASIC, max_tokens=2048).status == 200


def test_the_audit_trail_records_policy_loads_and_enforcement_and_verifies(tmp_path: Path) -> None:
    import subprocess
    import sys

    policy = tmp_path / "policy.yaml"
    shutil.copy(E2E_POLICY, policy)
    audit = tmp_path / "audit.jsonl"
    opts = StackOptions(policy=policy, run_dir=tmp_path / "run", processor_extra=("--audit-log", str(audit)))
    with Stack(opts) as s:
        statuses = [chat(s.base_url, "e2e-rpm-key", max_tokens=1).status for _ in range(4)]  # 3 per minute
        assert statuses == [200, 200, 200, 429]
        assert chat(s.base_url, "e2e-alert-key", max_tokens=400).status == 200  # over its alert-only limit
        policy.write_text(policy.read_text().replace('version: "e2e-1"', 'version: "e2e-2"'))
        deadline = time.monotonic() + 10
        while '"e2e-2"' not in (audit.read_text() if audit.exists() else ""):
            assert time.monotonic() < deadline, "the reload never reached the audit trail"
            time.sleep(0.2)
    tokenmeter = str(Path(sys.executable).parent / "tokenmeter")
    verified = subprocess.run([tokenmeter, "audit", "verify", str(audit)], capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [(e["type"], e.get("kind")) for e in events]
    assert kinds[0][0] == "policy_loaded" and ("policy_loaded", None) in kinds[1:]
    assert ("enforcement", "throttle") in kinds and ("enforcement", "alert") in kinds
    throttle = next(e for e in events if e.get("kind") == "throttle")
    assert throttle["key_id"] == "e2e-rpm" and throttle["policy_version"] == "e2e-1"
    assert "e2e-rpm-key" not in audit.read_text()  # never a key
    lines = audit.read_text().splitlines()
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([lines[0], lines[1].replace("e2e-rpm", "e2e-rpX"), *lines[2:]]) + "\n")
    broken = subprocess.run([tokenmeter, "audit", "verify", str(edited)], capture_output=True, text=True, timeout=30)
    assert broken.returncode == 1 and f"{edited}:2:" in broken.stderr
