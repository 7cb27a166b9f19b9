"""The one request path against upstreams that behave like the world's, and the clients users run.

The fake model servers here write every body in random pieces of 1 to 50 bytes (cutting inside
multi-byte characters and inside the usage event), compress, close connections without a clean
end and omit usage (extproc.fakes.model_server hooks). Clients: raw HTTP, and the official
`openai` and `anthropic` Python SDKs.
"""

from __future__ import annotations

import gzip
import json
import threading
import time

import anthropic
import openai
import pytest

from extproc.devstack.stack import Stack
from tests.e2e.client import Reply, chat, fake_stats, request, usage_records, wait_record

BASIC = "e2e-basic-key"
SPLIT = {"x-fake-split": "1-50", "x-fake-unicode": "1"}








def _words(n: int) -> list[str]:
    """The fake's reply words with x-fake-unicode (see its docstring)."""
    return [f"{('tök', '日本', '🙂')[i % 3]}{i}" for i in range(n)]


def _streamed_text(reply: Reply) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in reply.sse_data() if c.get("choices"))


# -- the injected usage event --------------------------------------------------------------


def test_a_client_that_did_not_ask_never_sees_the_injected_usage_event_however_the_upstream_splits_it(
    stack: Stack,
) -> None:
    for seed in range(40):
        reply = chat(stack.base_url, BASIC, stream=True, max_tokens=12,
                     extra_headers={**SPLIT, "x-fake-seed": str(seed)})
        assert reply.status == 200
        chunks = reply.sse_data()
        assert [c for c in chunks if not c.get("choices")] == [], f"seed {seed}: a chunk without choices"
        assert all("usage" not in c or c["usage"] is None for c in chunks), f"seed {seed}"
        assert _streamed_text(reply) == " ".join(_words(12)), f"seed {seed}: text damaged"
        assert reply.body.rstrip().endswith(b"data: [DONE]")
        rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
        assert rec is not None and rec["usage_source"] == "reported", seed
        assert rec["completion_tokens"] == 12 and rec["prompt_tokens"] == 9, seed


def test_a_client_that_asked_for_usage_gets_exactly_one_usage_event_however_it_is_split(stack: Stack) -> None:
    for seed in range(10):
        reply = chat(stack.base_url, BASIC, stream=True, max_tokens=5, include_usage=True,
                     extra_headers={**SPLIT, "x-fake-seed": str(seed)})
        usage = [c for c in reply.sse_data() if c.get("choices") == []]
        assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 5, seed


def test_the_openai_sdk_streaming_loop_reads_choices_0_of_every_chunk(stack: Stack) -> None:
    client = openai.OpenAI(api_key=BASIC, base_url=f"{stack.base_url}/v1", max_retries=0,
                           default_headers={**SPLIT})
    text = ""
    stream = client.chat.completions.create(
        model="llama-test", messages=[{"role": "user", "content": "hello there, how are you today"}],
        max_tokens=9, stream=True)
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""  # the usual loop: IndexError on a usage chunk
    assert text == " ".join(_words(9))

    with_usage = client.chat.completions.create(
        model="llama-test", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    last = list(with_usage)[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 4

    plain = client.chat.completions.with_raw_response.create(
        model="llama-test", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    completion = plain.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    rec = wait_record(stack.usage_log, plain.headers["x-tokenmeter-request-id"])
    assert rec is not None and (rec["prompt_tokens"], rec["completion_tokens"]) == (
        completion.usage.prompt_tokens, 6)


def test_the_anthropic_sdk_streams_and_is_metered_as_reported(stack: Stack) -> None:
    client = anthropic.Anthropic(api_key=BASIC, base_url=stack.base_url, max_retries=0, default_headers={**SPLIT})
    with client.messages.stream(model="claude-test", max_tokens=8,
                                messages=[{"role": "user", "content": "four words of prompt"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == " ".join(_words(8))
    assert final.usage.output_tokens == 8
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=3, messages=[{"role": "user", "content": "four words of prompt"}])
    message = raw.parse()
    rec = wait_record(stack.usage_log, raw.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "reported"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (message.usage.input_tokens, 3)


def test_the_sdks_get_openai_style_errors_they_can_raise(stack: Stack) -> None:
    client = openai.OpenAI(api_key="sk-unknown", base_url=f"{stack.base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"


# -- compression ---------------------------------------------------------------------------


def test_a_compressed_answer_is_metered_as_reported_and_the_client_still_gets_gzip(stack: Stack) -> None:
    headers = {"x-fake-compress": "1", "accept-encoding": "gzip", **SPLIT}
    reply = chat(stack.base_url, BASIC, max_tokens=40, extra_headers=headers)
    assert reply.status == 200
    assert reply.headers.get("content-encoding") == "gzip"
    body = json.loads(gzip.decompress(reply.body))
    assert body["usage"]["completion_tokens"] == 40
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "reported"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (body["usage"]["prompt_tokens"], 40)


def test_a_server_that_compresses_unasked_is_estimated_within_the_reservation(stack: Stack) -> None:
    """Documented limit (extproc.envoy.config): no decompressor, so Envoy cannot read the usage of a
    body the server compressed although nobody asked; it is charged an estimate, never above what
    was reserved, and the client gets the server's bytes unchanged."""
    reply = chat(stack.base_url, BASIC, max_tokens=33, extra_headers={"x-fake-compress": "always"})
    assert reply.status == 200 and reply.headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(reply.body))["usage"]["completion_tokens"] == 33
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "estimated"
    assert 0 < rec["prompt_tokens"] + rec["completion_tokens"] <= rec["reserved_tokens"]


# -- the end of a stream -------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [None, True], ids=["usage-injected", "usage-asked"])
def test_a_stream_whose_upstream_closes_without_a_clean_end_keeps_its_tail(
    stack: Stack, include_usage: bool | None
) -> None:
    for seed in range(8):
        reply = chat(stack.base_url, BASIC, stream=True, max_tokens=10, include_usage=include_usage,
                     extra_headers={**SPLIT, "x-fake-seed": str(seed), "x-fake-close-after-done": "1"})
        assert reply.status == 200
        assert _streamed_text(reply) == " ".join(_words(10)), f"seed {seed}: tail lost"
        assert reply.body.rstrip().endswith(b"data: [DONE]"), f"seed {seed}: [DONE] lost"
        rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
        assert rec is not None and rec["usage_source"] == "reported" and rec["completion_tokens"] == 10


def test_a_stream_without_usage_is_charged_an_estimate_within_its_reservation(stack: Stack) -> None:
    reply = chat(stack.base_url, BASIC, stream=True, max_tokens=10, extra_headers={"x-fake-no-usage": "1"})
    assert reply.status == 200 and len(_streamed_text(reply).split()) == 10
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec is not None and rec["usage_source"] == "estimated"
    assert 0 < rec["prompt_tokens"] + rec["completion_tokens"] <= rec["reserved_tokens"]


# -- the settlement join -------------------------------------------------------------------


def test_a_client_chosen_request_id_joins_nothing(stack: Stack) -> None:
    """A stream, a body-less POST and a second request all carry the same client x-request-id: each
    gets exactly one record, the stream is charged its usage, and nothing refunds it early."""
    chosen = {"x-request-id": "client-chosen-id"}
    before = len(usage_records(stack.usage_log))
    streamed: list[Reply] = []
    slow = threading.Thread(target=lambda: streamed.append(chat(
        stack.base_url, BASIC, stream=True, max_tokens=12,
        extra_headers={**chosen, "x-fake-chunk-delay-ms": "40"})))
    slow.start()
    time.sleep(0.15)
    bodyless = request(stack.base_url, "POST", "/v1/chat/completions", b"",
                       {"authorization": f"Bearer {BASIC}", "content-type": "application/json", **chosen})
    other = chat(stack.base_url, BASIC, max_tokens=3, extra_headers=chosen)
    slow.join(timeout=10)
    assert bodyless.status == 400 and other.status == 200 and streamed[0].status == 200
    rids = [streamed[0].headers["x-tokenmeter-request-id"], other.headers["x-tokenmeter-request-id"]]
    recs = {rid: wait_record(stack.usage_log, rid) for rid in rids}
    assert recs[rids[0]]["completion_tokens"] == 12 and recs[rids[0]]["usage_source"] == "reported"
    assert recs[rids[1]]["completion_tokens"] == 3
    time.sleep(0.3)
    new = usage_records(stack.usage_log)[before:]
    assert sorted(r["request_id"] for r in new if r["request_id"] in rids) == sorted(rids)
    assert len(new) == 3, [(r["request_id"], r["decision"]) for r in new]  # and one for the body-less POST
    assert all("client-chosen-id" not in r["request_id"] for r in new)


def test_the_upstream_log_and_the_ledger_agree_under_split_streams(stack: Stack) -> None:
    """What the model servers say they served equals what was recorded, request by request."""
    start = {pool: fake_stats(port) for pool, port in stack.pool_ports.items()}
    rids = []
    for i in range(12):
        reply = chat(stack.base_url, BASIC, stream=i % 2 == 0, max_tokens=5 + i,
                     extra_headers={**SPLIT, "x-fake-seed": str(100 + i)})
        rids.append(reply.headers["x-tokenmeter-request-id"])
    recs = [wait_record(stack.usage_log, rid) for rid in rids]
    served = {pool: fake_stats(port) for pool, port in stack.pool_ports.items()}
    completion = sum(served[p]["completion_tokens"] - start[p]["completion_tokens"] for p in served)
    assert completion == sum(r["completion_tokens"] for r in recs) == sum(5 + i for i in range(12))
