"""Traffic through a real Envoy with the shipped config, the processor, Redis and fake model servers."""

from __future__ import annotations

import json
import time

from extproc.devstack.stack import Stack
from tests.e2e.client import chat, fake_stats, request, wait_for, wait_record

BASIC = "e2e-basic-key"




def _records_count(stack: Stack) -> int:
    return len(stack.usage_log.read_text().splitlines()) if stack.usage_log.exists() else 0


def _new_record(stack: Stack, after: int, match) -> dict[str, object] | None:  # type: ignore[no-untyped-def]
    """The first usage record written after the first `after` ones that `match`es."""
    if not stack.usage_log.exists():
        return None
    new = [json.loads(line) for line in stack.usage_log.read_text().splitlines()[after:]]
    return next((r for r in new if match(r)), None)




def test_unknown_key_gets_401_with_openai_error(stack: Stack) -> None:
    reply = chat(stack.base_url, "sk-unknown")
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    missing = chat(stack.base_url, None)
    assert missing.status == 401


def test_admitted_request_is_served_with_ratelimit_headers(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, max_tokens=20)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 20
    for kind in ("tokens", "requests"):
        assert int(reply.headers[f"x-ratelimit-limit-{kind}"]) > 0
        assert int(reply.headers[f"x-ratelimit-remaining-{kind}"]) >= 0
        assert reply.headers[f"x-ratelimit-reset-{kind}"]


def test_non_streaming_usage_is_metered_as_reported(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, max_tokens=17)
    assert reply.status == 200
    rid = reply.headers["x-tokenmeter-request-id"]
    rec = wait_record(stack.usage_log, rid)
    assert rec is not None
    usage = reply.json()["usage"]
    assert rec["prompt_tokens"] == usage["prompt_tokens"]
    assert rec["completion_tokens"] == usage["completion_tokens"] == 17
    assert rec["usage_source"] == "reported"
    assert rec["tenant"] == "acme" and rec["key_id"] == "e2e-basic" and rec["team"] == "web"


def test_streaming_usage_is_metered_as_reported_even_without_include_usage(stack: Stack) -> None:
    # The processor asks the model server for usage (include_usage) on the client's behalf; Envoy
    # meters it and takes the usage event the client did not ask for back out of the stream.
    reply = chat(stack.base_url, BASIC, stream=True, max_tokens=23)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    chunks = reply.sse_data()
    assert [c for c in chunks if c.get("choices") == []] == []
    assert [c for c in chunks if c.get("choices")][-1]["choices"][0]["finish_reason"] == "length"
    assert reply.body.rstrip().endswith(b"data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert len(text.split()) == 23
    rid = reply.headers["x-tokenmeter-request-id"]
    rec = wait_record(stack.usage_log, rid)
    assert rec is not None
    # the fake server reports 23 output tokens and 6 words + 3 per message of prompt
    assert (rec["completion_tokens"], rec["prompt_tokens"]) == (23, 9)
    assert rec["usage_source"] == "reported"


def test_a_client_that_asked_for_usage_gets_its_usage_chunk(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, stream=True, max_tokens=7, include_usage=True)
    assert reply.status == 200
    usage_only = [c for c in reply.sse_data() if c.get("choices") == [] and c.get("usage")]
    assert len(usage_only) == 1 and usage_only[0]["usage"]["completion_tokens"] == 7


def test_access_log_carries_attribution_and_tokens(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, max_tokens=9)
    rid = reply.headers["x-tokenmeter-request-id"]

    def entry() -> dict[str, object] | None:
        return next((e for e in stack.access_log_entries() if e.get("request_id") == rid), None)

    log = wait_for(entry)
    assert log is not None
    assert log["tenant"] == "acme" and log["project"] == "chat" and log["key_id"] == "e2e-basic"
    assert log["model"] == "llama-test"
    assert log["completion_tokens"] == 9
    assert log["decision"] == "admitted"
    assert log["pool"] in ("h100", "cheap")
    assert "e2e-basic-key" not in json.dumps(log)


def test_spoofed_attribution_and_routing_headers_have_no_effect(stack: Stack) -> None:
    spoof = {
        "x-tokenmeter-tenant": "globex",
        "x-tokenmeter-key-id": "someone-else",
        "x-tokenmeter-pool": "cheap",
        "x-tokenmeter-evil": "1",
    }
    before = fake_stats(stack.pool_ports["cheap"])["requests"]
    reply = chat(stack.base_url, BASIC, max_tokens=5, extra_headers=spoof)
    assert reply.status == 200
    # The basic key's pool has room, so h100 serves regardless of the client's x-tokenmeter-pool.
    assert reply.headers["x-fake-pool"] == "h100"
    assert fake_stats(stack.pool_ports["cheap"])["requests"] == before
    assert reply.headers["x-fake-seen-tenant"] == "acme"
    seen = reply.headers["x-fake-seen-headers"].split(",")
    assert "x-tokenmeter-evil" not in seen
    assert "authorization" not in seen


def test_underscore_spellings_and_envoy_internal_headers_reach_neither_upstream_nor_log(stack: Stack) -> None:
    spoof = {"x_tokenmeter_tenant": "globex", "x_tokenmeter_pool": "cheap", "x-envoy-original-path": "/forged"}
    reply = chat(stack.base_url, BASIC, max_tokens=4, extra_headers=spoof)
    assert reply.status == 200
    assert not any("_" in name for name in reply.headers["x-fake-seen-headers"].split(","))
    rid = reply.headers["x-tokenmeter-request-id"]
    entry = wait_for(lambda: next((e for e in stack.access_log_entries() if e.get("request_id") == rid), None))
    assert entry is not None and entry["path"] == "/v1/chat/completions"


def test_malformed_json_gets_a_clear_400(stack: Stack) -> None:
    headers = {"authorization": f"Bearer {BASIC}", "content-type": "application/json"}
    reply = request(stack.base_url, "POST", "/v1/chat/completions", b'{"model": "x", "messages": [', headers)
    assert reply.status == 400
    assert "not valid JSON" in reply.json()["error"]["message"]


def test_oversized_body_gets_413_not_a_crash(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, text="word " * 20000)  # ~100 KB > the 64 KiB policy bound
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "request_too_large"
    assert chat(stack.base_url, BASIC, max_tokens=3).status == 200


def test_token_budget_spent_gives_429_with_retry_after_and_headers(stack: Stack) -> None:
    statuses = []
    last = None
    for _ in range(12):
        last = chat(stack.base_url, "e2e-tight-key", max_tokens=200)
        statuses.append(last.status)
        if last.status == 429:
            break
    assert 200 in statuses and statuses[-1] == 429
    assert last is not None
    assert int(last.headers["retry-after"]) >= 1
    assert last.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(last.headers["x-ratelimit-remaining-tokens"]) < 250
    assert last.headers["x-ratelimit-reset-tokens"]
    assert last.json()["error"]["code"] == "rate_limit_exceeded"


def test_requests_per_minute_limit_gives_429(stack: Stack) -> None:
    statuses = [chat(stack.base_url, "e2e-rpm-key", max_tokens=1).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_block_action_answers_403_without_retry_after(stack: Stack) -> None:
    statuses = []
    reply = None
    for _ in range(6):
        reply = chat(stack.base_url, "e2e-block-key", max_tokens=200)
        statuses.append(reply.status)
        if reply.status != 200:
            break
    assert reply is not None and reply.status == 403
    assert "retry-after" not in reply.headers


def test_upstream_error_without_usage_is_not_charged(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, max_tokens=50, extra_headers={"x-fake-status": "500"})
    assert reply.status == 500
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None
    assert rec["status"] == 500
    assert rec["prompt_tokens"] == rec["completion_tokens"] == 0
    assert rec["usage_source"] == "none"


def test_every_request_gets_exactly_one_usage_record(stack: Stack) -> None:
    rids = [
        chat(stack.base_url, BASIC, stream=i % 2 == 0, max_tokens=4).headers["x-tokenmeter-request-id"]
        for i in range(6)
    ]
    rids.append(chat(stack.base_url, "sk-nope").headers["x-tokenmeter-request-id"])
    assert all(wait_record(stack.usage_log, rid) for rid in rids)
    time.sleep(0.3)
    seen = [json.loads(line)["request_id"] for line in stack.usage_log.read_text().splitlines()]
    assert all(seen.count(rid) == 1 for rid in rids), [seen.count(rid) for rid in rids]


def test_non_llm_paths_are_authenticated_counted_and_recorded(stack: Stack) -> None:
    assert request(stack.base_url, "GET", "/v1/models").status == 401
    reply = request(stack.base_url, "GET", "/v1/models", headers={"authorization": f"Bearer {BASIC}"})
    assert reply.status == 404  # the fake model server has no such route; Envoy forwarded it
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["decision"] == "admitted" and rec["tenant"] == "acme"
    assert rec["prompt_tokens"] == rec["completion_tokens"] == 0


def test_alert_action_lets_requests_through_and_records_the_event(stack: Stack) -> None:
    replies = [chat(stack.base_url, "e2e-alert-key", max_tokens=200) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4  # 4 x ~210 tokens > 300/min, yet nothing refused
    last = wait_record(stack.usage_log, replies[-1].headers["x-tokenmeter-request-id"])
    assert last is not None
    assert last["decision"] == "alert"
    assert last["alerts"] == ["key:e2e-alert"]


def test_body_over_envoys_buffer_gets_the_same_json_413(stack: Stack) -> None:
    records = _records_count(stack)
    reply = chat(stack.base_url, BASIC, text="x" * (5 * 1024 * 1024))  # beyond the 4 MiB listener buffer
    assert reply.status == 413
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["code"] == "request_too_large"
    # recorded too: Envoy refused it before the processor saw it
    assert wait_for(lambda: _new_record(stack, records, lambda r: r["decision"] == "refused_by_envoy"))


def test_upstream_error_with_no_body_is_recorded_and_not_charged(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, max_tokens=50, extra_headers={"x-fake-status": "503", "x-fake-empty-body": "1"})
    assert reply.status == 503
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None, "a response without a body still gets its usage record"
    assert rec["prompt_tokens"] == rec["completion_tokens"] == 0
    assert rec["status"] == 503


def test_path_spelling_tricks_are_still_metered_or_refused(stack: Stack) -> None:
    headers = {"authorization": f"Bearer {BASIC}", "content-type": "application/json"}
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
    for path in ("/v1//chat/completions", "/v1/%63hat/completions", "/v1/./chat/completions"):
        reply = request(stack.base_url, "POST", path, body, headers)
        if reply.status == 200:
            rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
            assert rec is not None and rec["completion_tokens"] == 5 and rec["usage_source"] == "reported", path
        else:
            assert reply.status in (400, 404), (path, reply.status)
    reply = request(stack.base_url, "POST", "/v1/rerank", body, headers)
    assert reply.status == 404 and reply.json()["error"]["code"] == "unsupported_endpoint"


def _anthropic(stack: Stack, *, stream: bool, max_tokens: int):  # type: ignore[no-untyped-def]
    body = {"model": "claude-test", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "four words of prompt"}]}
    return request(stack.base_url, "POST", "/v1/messages", json.dumps(body).encode(),
                   {"x-api-key": BASIC, "content-type": "application/json", "anthropic-version": "2023-06-01"})


def test_anthropic_messages_are_metered_as_reported_streaming_and_not(stack: Stack) -> None:
    plain = _anthropic(stack, stream=False, max_tokens=11)
    assert plain.status == 200
    reported = plain.json()["usage"]
    rec = wait_record(stack.usage_log, plain.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "reported"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (reported["input_tokens"], reported["output_tokens"])

    streamed = _anthropic(stack, stream=True, max_tokens=13)
    assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = streamed.sse_data()
    start = next(e for e in events if e.get("type") == "message_start")
    delta = [e for e in events if e.get("type") == "message_delta"][-1]
    rec = wait_record(stack.usage_log, streamed.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "reported" and rec["stream"] is True
    assert rec["prompt_tokens"] == start["message"]["usage"]["input_tokens"]
    assert rec["completion_tokens"] == delta["usage"]["output_tokens"] == 13




def test_a_post_without_a_body_gets_400_and_never_reaches_a_model_server(stack: Stack) -> None:
    before = {pool: fake_stats(port)["requests"] for pool, port in stack.pool_ports.items()}
    records = _records_count(stack)
    reply = request(stack.base_url, "POST", "/v1/chat/completions", b"",
                    {"authorization": f"Bearer {BASIC}", "content-type": "application/json"})
    assert reply.status == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert {pool: fake_stats(port)["requests"] for pool, port in stack.pool_ports.items()} == before
    # and it has its usage record: Envoy refused it (the processor never saw a body)
    rec = wait_for(lambda: _new_record(
        stack, records, lambda r: r["status"] == 400 and r["decision"] == "refused_by_envoy"))
    assert rec is not None and rec["completion_tokens"] == 0 and rec["reserved_tokens"] == 0


def test_usage_is_read_whatever_the_server_calls_its_json(stack: Stack) -> None:
    for content_type in ("application/json; charset=utf-8", "application/json;charset=UTF-8"):
        reply = chat(stack.base_url, BASIC, max_tokens=9, extra_headers={"x-fake-content-type": content_type})
        assert reply.status == 200 and reply.headers["content-type"] == content_type
        rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
        assert rec is not None and rec["usage_source"] == "reported", content_type
        assert rec["completion_tokens"] == reply.json()["usage"]["completion_tokens"] == 9


def test_generation_is_bounded_by_what_was_reserved(stack: Stack) -> None:
    # over the policy's cap (2048): forwarded with the cap, which is what the server then generates
    over = chat(stack.base_url, BASIC, max_tokens=3000)
    assert over.status == 200 and over.headers["x-tokenmeter-max-output-tokens"] == "2048"
    assert over.json()["usage"]["completion_tokens"] == 2048
    rec = wait_record(stack.usage_log, over.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["completion_tokens"] == 2048
    assert rec["reserved_tokens"] >= 2048  # the reservation covers what the server may generate
    # no maximum named: forwarded with the reserved default (64), not the server's own default
    plain = chat(stack.base_url, BASIC, max_tokens=None, stream=True)
    assert plain.headers["x-tokenmeter-max-output-tokens"] == "64"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in plain.sse_data() if c.get("choices"))
    assert len(text.split()) == 64
    # within the cap: unchanged
    within = chat(stack.base_url, BASIC, max_tokens=7)
    assert within.headers["x-tokenmeter-max-output-tokens"] == "7" and within.json()["usage"]["completion_tokens"] == 7
    # Anthropic and the Responses API name it their own way
    body = {"model": "claude-test", "max_tokens": 9000, "messages": [{"role": "user", "content": "hi"}]}
    msg = request(stack.base_url, "POST", "/v1/messages", json.dumps(body).encode(),
                  {"x-api-key": BASIC, "content-type": "application/json"})
    assert msg.status == 200 and msg.json()["usage"]["output_tokens"] == 2048
    resp = request(stack.base_url, "POST", "/v1/responses", json.dumps({"model": "m", "input": "hi"}).encode(),
                   {"authorization": f"Bearer {BASIC}", "content-type": "application/json"})
    assert resp.status == 200 and resp.json()["usage"]["output_tokens"] == 64


def _raw(stack: Stack, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", stack.envoy_port), timeout=5) as conn:
        conn.sendall(data)
        return conn.recv(65536)


def test_what_is_not_governed_is_denied_by_default(stack: Stack) -> None:
    auth = f"authorization: Bearer {BASIC}\r\n".encode()
    for method in (b"GET", b"OPTIONS"):  # a body where nothing is metered never reaches a model server
        head = _raw(stack, method + b" /v1/models HTTP/1.1\r\nhost: x\r\n" + auth + b"content-length: 5\r\n\r\nhello")
        assert head.startswith(b"HTTP/1.1 400"), head[:200]
        assert b'"code":"unexpected_body"' in head
    started = time.monotonic()
    tunnel = _raw(stack, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n" + auth + b"\r\n")
    assert tunnel.startswith(b"HTTP/1.1 403") and time.monotonic() - started < 2.0, tunnel[:200]
    assert b'"error"' in tunnel and b"application/json" in tunnel
