"""Every kind of limit and every action, through real Envoy, two processor replicas and one Redis.

One module stack with its own policy: a key (or tenant, project, team) per behaviour, so the tests
are independent of each other and of their order. Prompts are "a b": the processor's estimate of its
input tokens equals what the fake model server reports (5), and the server generates exactly
max_tokens, so a settled request counts what it reserved and the numbers below are exact whenever
settlement happens.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy.keys import hash_key
from tests.e2e.client import OpenStream, Reply, open_stream, request, wait_for, wait_record
from tests.e2e.conftest import E2E_POLICY

pytestmark = pytest.mark.e2e

TEXT = "a b"  # 5 input tokens, estimated and reported alike
TEXT_TOKENS = 5
LONG = " ".join(["lorem"] * 24)  # estimated 40 input tokens, reported 27
NY = ZoneInfo("America/New_York")
EVENT_FIELDS = {"schema", "id", "kind", "tenant", "scope", "limit", "limit_value", "used", "percent", "period_end",
                "request_id", "policy_version", "at"}
ANCHOR = 15


def raw(key_id: str) -> str:
    return f"e2e-{key_id}-secret"


# key id -> (tenant, project, team, limits)
KEYS: dict[str, tuple[str, str, str | None, dict[str, Any]]] = {
    "q-model": ("qt", "p", None, {"rules": [{"output_tokens": 100, "window": "1m", "models": ["llama-test"]}]}),
    "q-io": ("qt", "p", None, {"rules": [{"input_tokens": 60, "window": "1m"}, {"output_tokens": 50, "window": "1m"}]}),
    "q-burst": ("qt", "p", None, {"rules": [{"tokens": 50, "window": "1s"}]}),
    "q-rph": ("qt", "p", None, {"requests_per_hour": 2}),
    "q-throttle": ("qt", "p", None, {"requests_per_minute": 2, "action": "throttle"}),
    "q-block": ("qt", "p", None, {"requests_per_minute": 2, "action": "block"}),
    "q-alert": ("qt", "p", None, {"requests_per_minute": 2, "action": "alert"}),
    "q-thresh": ("qt", "p", None, {"quota_tokens": 100, "alert_at": [50]}),
    "q-sentinel": ("qt", "p", None, {"requests_per_minute": 1, "action": "alert"}),
    "q-conc-hold": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-done": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-stream": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-disc": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-500": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-cut": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-close": ("qt", "p", None, {"concurrent_requests": 1}),
    "q-conc-refused": ("qt", "p", None, {
        "concurrent_requests": 1, "rules": [{"requests": 1, "window": "1m", "models": ["claude-test"]}]}),
    "q-month": ("nyc", "p", None, {"quota_tokens": 200}),
    "q-month-block": ("nyc", "p", None, {"quota_tokens": 100, "action": "block"}),
    "q-capped": ("teamco", "shared", "capped", {}),
    "q-free": ("teamco", "shared", "free", {}),
    "q-shadow": ("shadowco", "p", None, {"quota_requests": 2}),
}

TENANTS: dict[str, Any] = {
    "qt": {"projects": {"p": {}}},
    "nyc": {"time_zone": "America/New_York", "billing_anchor_day": ANCHOR, "projects": {"p": {}}},
    "teamco": {"projects": {"shared": {
        "limits": {"quota_tokens": 250},
        "teams": {"capped": {"limits": {"rules": [{"tokens": "40%", "period": "month"}]}}, "free": {}},
    }}},
    "shadowco": {"mode": "shadow", "projects": {"p": {}}},
}


# -- the alert webhook ----------------------------------------------------------------------------


class Webhook:
    """A local HTTP receiver for `--alert-webhook`: keeps every JSON body POSTed to /hook."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with hook._lock:
                    hook.paths.append(self.path)
                    hook.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def received(self, kind: str, scope: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["kind"] == kind and e["scope"] == scope]


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("quotas")
    doc = yaml.safe_load(E2E_POLICY.read_text())
    doc["version"] = "e2e-quotas-1"
    doc["tenants"].update(TENANTS)
    for key_id, (tenant, project, team, limits) in KEYS.items():
        key: dict[str, Any] = {"id": key_id, "sha256": hash_key(raw(key_id)), "tenant": tenant, "project": project}
        if team is not None:
            key["team"] = team
        if limits:
            key["limits"] = limits
        doc["keys"].append(key)
    policy = run / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    opts = StackOptions(policy=policy, run_dir=run / "run", processors=2,
                        processor_extra=("--alert-webhook", webhook.url))
    with Stack(opts) as s:
        yield s


# -- helpers --------------------------------------------------------------------------------------


def ask(
    stack: Stack,
    key_id: str,
    *,
    model: str = "llama-test",
    max_tokens: int = 15,
    text: str = TEXT,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> Reply:
    payload: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                               "messages": [{"role": "user", "content": text}]}
    if stream:
        payload["stream"] = True
    all_headers = {"content-type": "application/json", "authorization": f"Bearer {raw(key_id)}", **(headers or {})}
    return request(stack.base_url, "POST", "/v1/chat/completions", json.dumps(payload).encode(), all_headers)


def held(stack: Stack, key_id: str) -> None:
    """A request on `key_id` is refused for want of a slot (one is held)."""
    probe = ask(stack, key_id, max_tokens=1)
    assert probe.status == 429, probe.body
    assert "requests in flight (limit 1)" in error(probe)["message"], probe.body


def slow_stream(stack: Stack, key_id: str, *, tokens: int, delay_ms: int,
                headers: dict[str, str] | None = None) -> OpenStream:
    stream = open_stream(stack.base_url, raw(key_id), max_tokens=tokens, text=TEXT,
                         extra_headers={"x-fake-chunk-delay-ms": str(delay_ms), **(headers or {})})
    assert stream.status == 200, stream.finish().body
    return stream


def rid(reply: Reply) -> str:
    return reply.headers["x-tokenmeter-request-id"]


def replica(request_id: str) -> str:
    """The replica that issued a request id (its prefix is unique per processor process)."""
    return request_id.split("-", 1)[0]


def error(reply: Reply) -> dict[str, Any]:
    body: dict[str, Any] = reply.json()["error"]
    return body


def until_refused(send: Callable[[], Reply], most: int = 20) -> tuple[list[Reply], Reply]:
    """Send until a request is refused (at most `most`): the admitted ones and the refusal."""
    admitted: list[Reply] = []
    for _ in range(most):
        reply = send()
        if reply.status != 200:
            return admitted, reply
        admitted.append(reply)
    raise AssertionError(f"{most} requests admitted, none refused")


def admitted_soon(send: Callable[[], Reply], timeout: float = 8.0) -> Reply:
    """Poll `send` until a request is admitted; the admitted reply (fails with the last refusal)."""
    last: list[Reply] = []

    def attempt() -> Reply | None:
        reply = send()
        last[:] = [reply]
        return reply if reply.status == 200 else None

    reply = wait_for(attempt, timeout)
    assert reply is not None, f"still refused after {timeout}s: {last[0].status} {last[0].body!r}"
    return reply


def decided_by(stack: Stack, reply: Reply) -> dict[str, Any]:
    rec = wait_record(stack.usage_log, rid(reply))
    found: dict[str, Any] = rec["decided_by"]
    return found


def utc_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def next_anchor(now: datetime) -> datetime:
    """The next 15th, 00:00 in New York, after `now`: where the tenant's billing month ends."""
    local = now.astimezone(NY)
    year, month = local.year, local.month
    if local.day >= ANCHOR:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return datetime(year, month, ANCHOR, tzinfo=NY)


def next_utc_month(now: datetime) -> datetime:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


# -- 1. a limit narrowed to one model ------------------------------------------------------------


def test_a_per_model_limit_refuses_that_model_only(stack: Stack) -> None:
    admitted, refused = until_refused(lambda: ask(stack, "q-model", max_tokens=40))
    assert len(admitted) == 2  # 40 + 40 output tokens of llama-test; 120 > 100
    assert refused.status == 429 and "retry-after" in refused.headers
    message = error(refused)["message"]
    assert "key:q-model" in message and "output tokens per minute of llama-test (limit 100)" in message, message
    assert decided_by(stack, refused) == {"scope": "key:q-model", "kind": "output_tokens", "action": "throttle"}
    # the same key asking for another model is not counted by that rule
    for _ in range(3):
        other = ask(stack, "q-model", model="claude-test", max_tokens=40)
        assert other.status == 200, other.body
        assert other.json()["model"] == "claude-test"
    assert ask(stack, "q-model", max_tokens=40).status == 429  # llama-test is still over


# -- 2. separate input and output budgets ----------------------------------------------------------


def test_input_and_output_tokens_have_separate_budgets(stack: Stack) -> None:
    # input: 60 per minute, output: 50 per minute
    assert ask(stack, "q-io", text=LONG, max_tokens=10).status == 200  # input ~40 (27 once settled)
    long_again = ask(stack, "q-io", text=LONG, max_tokens=10)
    assert long_again.status == 429, long_again.body
    assert "input tokens per minute (limit 60)" in error(long_again)["message"]
    assert decided_by(stack, long_again) == {"scope": "key:q-io", "kind": "input_tokens", "action": "throttle"}
    # a short prompt with the same max_tokens fits the input budget
    assert ask(stack, "q-io", text=TEXT, max_tokens=10).status == 200  # output so far: 20
    big = ask(stack, "q-io", text=TEXT, max_tokens=40)  # input would fit; output 20 + 40 > 50
    assert big.status == 429, big.body
    assert "output tokens per minute (limit 50)" in error(big)["message"]
    assert decided_by(stack, big) == {"scope": "key:q-io", "kind": "output_tokens", "action": "throttle"}
    assert ask(stack, "q-io", text=TEXT, max_tokens=10).status == 200  # both budgets still have room


# -- 3. a one-second burst window ------------------------------------------------------------------


def test_a_one_second_window_refuses_a_burst_and_admits_again_after_it(stack: Stack) -> None:
    # 50 tokens per second, 20 per request: a burst gets two through
    admitted, refused = until_refused(lambda: ask(stack, "q-burst", max_tokens=15))
    assert 1 <= len(admitted) <= 2
    assert refused.status == 429, refused.body
    assert "tokens per second (limit 50)" in error(refused)["message"]
    assert refused.headers["retry-after"] == "1"
    again = admitted_soon(lambda: ask(stack, "q-burst", max_tokens=15), timeout=5.0)
    assert int(again.headers["x-ratelimit-limit-tokens"]) == 50


# -- 4. requests per hour ----------------------------------------------------------------------


def test_requests_per_hour(stack: Stack) -> None:
    started = time.monotonic()
    admitted, refused = until_refused(lambda: ask(stack, "q-rph", max_tokens=1))
    assert len(admitted) == 2
    assert refused.status == 429
    assert "requests per hour (limit 2)" in error(refused)["message"]
    waited = time.monotonic() - started
    # the first request leaves the window an hour after it was admitted
    assert 3600 - waited - 2 <= int(refused.headers["retry-after"]) <= 3600
    assert decided_by(stack, refused) == {"scope": "key:q-rph", "kind": "requests", "action": "throttle"}


# -- 5. a calendar quota in a time zone, with an anchor day ----------------------------------------


def test_a_monthly_quota_in_new_york_from_the_15th(stack: Stack) -> None:
    before = datetime.now(UTC)
    period_end = next_anchor(before)
    remaining = []
    for _ in range(2):
        reply = ask(stack, "q-month", max_tokens=15)  # 20 tokens each
        assert reply.status == 200, reply.body
        assert reply.headers["x-tokenmeter-quota-limit"] == "200"
        assert reply.headers["x-tokenmeter-quota-reset"] == utc_stamp(period_end)
        remaining.append(int(reply.headers["x-tokenmeter-quota-remaining"]))
    assert remaining == [180, 160]

    _, refused = until_refused(lambda: ask(stack, "q-month", max_tokens=15))
    after = datetime.now(UTC)
    assert refused.status == 429, refused.body
    assert "key:q-month" in error(refused)["message"]
    assert "tokens per month (billing period) (limit 200)" in error(refused)["message"]
    retry = int(refused.headers["retry-after"])
    assert (period_end - after).total_seconds() - 1 <= retry <= (period_end - before).total_seconds() + 1
    assert decided_by(stack, refused) == {"scope": "key:q-month", "kind": "quota_tokens", "action": "throttle"}


def test_a_blocking_quota_refuses_with_403_until_the_billing_period_ends(stack: Stack) -> None:
    period_end = next_anchor(datetime.now(UTC))
    admitted, refused = until_refused(lambda: ask(stack, "q-month-block", max_tokens=15))
    assert len(admitted) == 5  # 5 x 20 = 100
    assert refused.status == 403, refused.body
    err = error(refused)
    assert err["code"] == "quota_exhausted"
    assert f"until the billing period ends at {utc_stamp(period_end)}" in err["message"], err["message"]
    assert "key:q-month-block" in err["message"] and "(limit 100)" in err["message"]
    assert "retry-after" not in refused.headers
    assert decided_by(stack, refused) == {"scope": "key:q-month-block", "kind": "quota_tokens", "action": "block"}
    assert ask(stack, "q-month-block", max_tokens=1).status == 403  # still blocked, however small


# -- 6. a team's share of its project's quota -------------------------------------------------------


def test_a_team_capped_at_40_percent_of_the_project_quota(stack: Stack) -> None:
    # project quota 250 tokens a month; team "capped" gets 40 % of it (100); team "free" no cap of its own
    capped, refused = until_refused(lambda: ask(stack, "q-capped", max_tokens=15))
    assert len(capped) == 5  # 5 x 20 = 100
    assert refused.status == 429
    message = error(refused)["message"]
    assert "team:teamco/shared/capped" in message and "(limit 100)" in message, message
    assert decided_by(stack, refused)["scope"] == "team:teamco/shared/capped"

    free, project_full = until_refused(lambda: ask(stack, "q-free", max_tokens=15))
    # the capped team's 100 count against the project: 150 left, 7 x 20 of it
    assert len(free) == 7
    assert free[0].headers["x-tokenmeter-quota-limit"] == "250"
    assert free[0].headers["x-tokenmeter-quota-remaining"] == str(250 - 100 - 20)
    assert project_full.status == 429
    message = error(project_full)["message"]
    assert "project:teamco/shared" in message and "(limit 250)" in message, message
    # and the capped team stays refused (by its own cap or the project's)
    assert ask(stack, "q-capped", max_tokens=1).status == 429


# -- 7. concurrency ------------------------------------------------------------------------------


def test_a_request_in_flight_holds_the_only_slot_on_every_replica(stack: Stack) -> None:
    stream = slow_stream(stack, "q-conc-hold", tokens=100, delay_ms=100)
    try:
        refused: dict[str, Reply] = {}
        for _ in range(20):  # Envoy spreads requests over both replicas
            probe = ask(stack, "q-conc-hold", max_tokens=1)
            assert probe.status == 429, probe.body
            refused.setdefault(replica(rid(probe)), probe)
            if len(refused) == 2:
                break
        assert len(refused) == 2, "both replicas refused while the slot was held"
        for probe in refused.values():
            assert probe.headers["retry-after"] == "1"
            assert "requests in flight (limit 1)" in error(probe)["message"]
            assert decided_by(stack, probe) == {"scope": "key:q-conc-hold", "kind": "concurrent", "action": "throttle"}
    finally:
        stream.abort()


def test_the_slot_is_released_when_a_request_completes(stack: Stack) -> None:
    for _ in range(3):
        assert admitted_soon(lambda: ask(stack, "q-conc-done", max_tokens=2)).json()["usage"]["completion_tokens"] == 2


def test_the_slot_is_released_when_a_stream_completes(stack: Stack) -> None:
    stream = slow_stream(stack, "q-conc-stream", tokens=40, delay_ms=50)
    held(stack, "q-conc-stream")  # held while it streams
    done = stream.finish()
    assert done.complete and done.body.rstrip().endswith(b"data: [DONE]")
    admitted_soon(lambda: ask(stack, "q-conc-stream", max_tokens=1))


def test_the_slot_is_released_when_the_client_disconnects_mid_stream(stack: Stack) -> None:
    stream = slow_stream(stack, "q-conc-disc", tokens=200, delay_ms=100)  # 20 s if left alone
    held(stack, "q-conc-disc")
    stream.abort()
    admitted_soon(lambda: ask(stack, "q-conc-disc", max_tokens=1))


def test_the_slot_is_released_when_the_upstream_answers_an_error(stack: Stack) -> None:
    failed = ask(stack, "q-conc-500", max_tokens=5, headers={"x-fake-status": "500"})
    assert failed.status == 500
    admitted_soon(lambda: ask(stack, "q-conc-500", max_tokens=1))


def test_the_slot_is_released_when_the_upstream_cuts_the_stream(stack: Stack) -> None:
    stream = slow_stream(stack, "q-conc-cut", tokens=40, delay_ms=100, headers={"x-fake-cut-after": "15"})
    held(stack, "q-conc-cut")
    cut = stream.finish()
    assert not cut.complete
    admitted_soon(lambda: ask(stack, "q-conc-cut", max_tokens=1))


def test_the_slot_is_released_when_the_upstream_closes_without_ending_the_body(stack: Stack) -> None:
    stream = slow_stream(stack, "q-conc-close", tokens=20, delay_ms=100, headers={"x-fake-close-after-done": "1"})
    held(stack, "q-conc-close")
    stream.finish()
    admitted_soon(lambda: ask(stack, "q-conc-close", max_tokens=1))


def test_a_request_refused_by_another_limit_takes_no_slot(stack: Stack) -> None:
    # one request in flight, and one claude-test request a minute
    assert ask(stack, "q-conc-refused", model="claude-test").status == 200
    for _ in range(3):
        refused = ask(stack, "q-conc-refused", model="claude-test")
        assert refused.status == 429
        assert "requests per minute of claude-test (limit 1)" in error(refused)["message"]
    # none of them holds the slot: once the first request's end is reported, the key is free
    admitted_soon(lambda: ask(stack, "q-conc-refused", model="llama-test"))


# -- 8. actions ----------------------------------------------------------------------------------


def test_throttle_answers_429_with_retry_after_and_rate_limit_headers(stack: Stack) -> None:
    started = time.monotonic()
    admitted, refused = until_refused(lambda: ask(stack, "q-throttle", max_tokens=1))
    waited = time.monotonic() - started
    assert len(admitted) == 2
    assert admitted[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.status == 429
    assert error(refused)["code"] == "rate_limit_exceeded"
    assert 60 - waited - 2 <= int(refused.headers["retry-after"]) <= 60  # when the first leaves the minute
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert wait_record(stack.usage_log, rid(refused))["decision"] == "throttled"


def test_block_answers_403_quota_exhausted(stack: Stack) -> None:
    admitted, refused = until_refused(lambda: ask(stack, "q-block", max_tokens=1))
    assert len(admitted) == 2
    assert refused.status == 403
    err = error(refused)
    assert (err["type"], err["code"]) == ("insufficient_quota", "quota_exhausted")
    assert "requests per minute (limit 2)" in err["message"] and "lifts the block" in err["message"]
    rec = wait_record(stack.usage_log, rid(refused))
    assert rec["decision"] == "blocked"
    assert rec["decided_by"] == {"scope": "key:q-block", "kind": "requests", "action": "block"}


def test_alert_lets_requests_through_and_sends_an_over_limit_event(stack: Stack, webhook: Webhook) -> None:
    replies = [ask(stack, "q-alert", max_tokens=1) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4
    decisions = [wait_record(stack.usage_log, rid(r))["decision"] for r in replies]
    assert decisions == ["admitted", "admitted", "alert", "alert"]
    third = rid(replies[2])
    events = wait_for(lambda: [e for e in webhook.received("over_limit", "key:q-alert") if e["request_id"] == third])
    assert events, webhook.received("over_limit", "key:q-alert")
    event = events[0]
    assert set(event) == EVENT_FIELDS
    assert event["schema"] == "tokenmeter.alert.v1" and event["id"]
    assert (event["tenant"], event["limit"], event["limit_value"], event["used"]) == (
        "qt", "requests per minute", 2, 3)
    assert event["policy_version"] == "e2e-quotas-1" and event["period_end"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["at"])
    # every over-limit event names a request that went over
    assert {e["request_id"] for e in webhook.received("over_limit", "key:q-alert")} <= {third, rid(replies[3])}
    # the event is also the processor's log line
    logs = "".join(p.log_tail(2000) for p in stack.procs if p.name.startswith("processor"))
    assert event["id"] in logs


def test_a_threshold_event_arrives_once_per_period_across_replicas(stack: Stack, webhook: Webhook) -> None:
    # quota 100 tokens a month, alert at 50 %: 20 tokens a request, the 3rd reaches 60 and the 4th
    # and 5th are past 50 % too, served by both replicas
    replies = [ask(stack, "q-thresh", max_tokens=15) for _ in range(5)]
    assert [r.status for r in replies] == [200] * 5
    assert len({replica(rid(r)) for r in replies[2:]}) == 2  # past 50 % on both replicas
    # Each replica sends its events in order: once an event raised after these requests has come
    # from each replica, any second threshold event would have come before it. The sentinel key
    # allows one request a minute and only alerts: every later request raises an over-limit event
    # (the first one on each replica; later ones are deduplicated there).
    first = ask(stack, "q-sentinel", max_tokens=1)
    assert first.status == 200
    over_on: set[str] = set()
    for _ in range(20):
        over_on.add(replica(rid(ask(stack, "q-sentinel", max_tokens=1))))
        if len(over_on) == 2:
            break
    assert len(over_on) == 2

    def sentinels_from() -> set[str]:
        return {replica(e["request_id"]) for e in webhook.received("over_limit", "key:q-sentinel")}

    assert wait_for(lambda: len(sentinels_from()) == 2), webhook.received("over_limit", "key:q-sentinel")
    events = webhook.received("threshold", "key:q-thresh")
    assert len(events) == 1, events
    event = events[0]
    assert set(event) == EVENT_FIELDS
    assert (event["tenant"], event["policy_version"]) == ("qt", "e2e-quotas-1")
    assert (event["percent"], event["limit_value"], event["used"]) == (50, 100, 60)
    assert event["request_id"] == rid(replies[2])
    assert event["limit"] == "tokens per month (billing period)"
    end = next_utc_month(datetime.now(UTC))
    assert event["period_end"] == end.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- 9. a tenant in shadow mode --------------------------------------------------------------------


def test_a_shadow_tenant_over_its_quota_is_admitted_and_recorded(stack: Stack) -> None:
    replies = [ask(stack, "q-shadow", max_tokens=1) for _ in range(3)]  # 2 requests a month
    assert [r.status for r in replies] == [200] * 3
    recs = [wait_record(stack.usage_log, rid(r)) for r in replies]
    assert [r["decision"] for r in recs] == ["admitted", "admitted", "shadow"]
    assert recs[2]["decided_by"] == {"scope": "key:q-shadow", "kind": "quota_requests", "action": "throttle"}
