"""The deterministic fake model server (extproc.fakes.model_server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.fakes.model_server import build_app, completion_tokens_for, count_prompt_tokens

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app("h100"))) as c:
        yield c


def _chat_body(words: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": words}], **extra}


def _parse_openai_sse(raw: bytes) -> list[Any]:
    """Events of an OpenAI stream: decoded JSON chunks, and the literal '[DONE]'."""
    assert raw.endswith(b"\n\n")
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def _parse_anthropic_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = event_line[len("event: ") :], orjson.loads(data_line[len("data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


async def _stats(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get("/fake/stats")
    assert resp.status == 200
    stats: dict[str, Any] = await resp.json()
    return stats


def test_token_rules() -> None:
    assert count_prompt_tokens([{"role": "user", "content": "hello there"}]) == 5
    assert count_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]) == 6
    assert count_prompt_tokens([{"role": "user", "content": "x"}], system="be  nice") == 4 + 5
    assert completion_tokens_for(None) == 16
    assert completion_tokens_for(0) == 1
    assert completion_tokens_for(10**6) == 4096


async def test_non_stream_usage_matches_stats(client: TestClient[Any, Any]) -> None:
    resp = await client.post(CHAT, json=_chat_body(max_tokens=7), headers={"x-tokenmeter-tenant": "acme"})
    assert resp.status == 200
    assert resp.headers["x-fake-pool"] == "h100"
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m1"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 tok5 tok6"
    assert body["choices"][0]["finish_reason"] == "length"

    # max_completion_tokens wins over max_tokens; default is 16.
    body2 = await (await client.post(CHAT, json=_chat_body(max_tokens=7, max_completion_tokens=3))).json()
    assert body2["usage"]["completion_tokens"] == 3
    body3 = await (await client.post(CHAT, json=_chat_body())).json()
    assert body3["usage"]["completion_tokens"] == 16
    assert body3["choices"][0]["finish_reason"] == "stop"

    stats = await _stats(client)
    assert stats["pool"] == "h100"
    assert stats["requests"] == 3
    assert stats["prompt_tokens"] == 6 * 3
    assert stats["completion_tokens"] == 7 + 3 + 16
    assert stats["by_tenant"]["acme"] == {"requests": 1, "prompt_tokens": 6, "completion_tokens": 7}
    assert stats["by_tenant"][""] == {"requests": 2, "prompt_tokens": 12, "completion_tokens": 19}

    assert (await client.post("/fake/reset")).status == 200
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (0, 0, 0)
    assert stats["by_tenant"] == {}


async def test_stream_with_include_usage(client: TestClient[Any, Any]) -> None:
    body = _chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True})
    resp = await client.post(CHAT, json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = _parse_openai_sse(await resp.read())

    assert events[-1] == "[DONE]"
    first, *tokens, final, usage_chunk, _ = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == "tok0 tok1 tok2 tok3"
    assert all(t["object"] == "chat.completion.chunk" and t["usage"] is None for t in tokens)
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}

    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (1, 6, 4)


async def test_stream_without_include_usage(client: TestClient[Any, Any]) -> None:
    resp = await client.post(CHAT, json=_chat_body(max_tokens=3, stream=True))
    events = _parse_openai_sse(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 1 + 3 + 1
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_anthropic_non_stream(client: TestClient[Any, Any]) -> None:
    body = {
        "model": "claude",
        "max_tokens": 5,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
    }
    resp = await client.post(MESSAGES, json=body)
    assert resp.status == 200
    msg = await resp.json()
    assert msg["type"] == "message"
    assert msg["content"] == [{"type": "text", "text": "tok0 tok1 tok2 tok3 tok4"}]
    assert msg["stop_reason"] == "max_tokens"
    assert msg["usage"] == {"input_tokens": 4 + 5, "output_tokens": 5}


async def test_anthropic_stream_events(client: TestClient[Any, Any]) -> None:
    body = {
        "model": "claude",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "a b"}],
    }
    resp = await client.post(MESSAGES, json=body, headers={"x-tokenmeter-tenant": "t1"})
    assert resp.status == 200
    events = _parse_anthropic_sse(await resp.read())
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {"input_tokens": 5, "output_tokens": 1}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["usage"] == {"output_tokens": 5}  # cumulative, not incremental
    assert delta["delta"]["stop_reason"] == "max_tokens"

    stats = await _stats(client)
    assert stats["by_tenant"] == {"t1": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5}}


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_cut_after_closes_early_and_is_not_counted(client: TestClient[Any, Any], path: str) -> None:
    body = _chat_body(max_tokens=10, stream=True, stream_options={"include_usage": True})
    resp = await client.post(path, json=body, headers={"x-fake-cut-after": "3"})
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in resp.content.iter_any():
            received += data
    text = received.decode()
    assert "tok2" in text and "tok3" not in text
    # Nothing after the token events: no finish, no final usage, no terminator.
    for marker in (
        '"finish_reason":"length"',
        '"usage":{"prompt_tokens"',
        "[DONE]",
        "message_delta",
        "message_stop",
    ):
        assert marker not in text

    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (0, 0, 0)
    assert stats["cut_streams"] == 1

    # The server is still healthy afterwards.
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_malformed_json_is_400(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.post(path, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert resp.headers["x-fake-pool"] == "h100"

    for bad in (b"[]", b'{"messages": "x"}', b'{"messages": [], "max_tokens": "7"}'):
        assert (await client.post(path, data=bad)).status == 400
    assert (await _stats(client))["requests"] == 0


async def test_forced_status(client: TestClient[Any, Any]) -> None:
    resp = await client.post(CHAT, json=_chat_body(), headers={"x-fake-status": "500"})
    assert resp.status == 500
    assert (await resp.json())["error"]["message"]
    assert (await _stats(client))["requests"] == 0


async def test_attribution_header_echo(client: TestClient[Any, Any]) -> None:
    headers = {
        "X-TokenMeter-Tenant": "acme",
        "x-tokenmeter-user": "u1",
        "x-tokenmeter-budget": "b",
        "x-other": "ignored",
    }
    resp = await client.post(CHAT, json=_chat_body(), headers=headers)
    assert resp.headers["x-fake-seen-headers"] == "x-tokenmeter-budget,x-tokenmeter-tenant,x-tokenmeter-user"
    assert resp.headers["x-fake-seen-tenant"] == "acme"
    assert resp.headers["x-fake-pool"] == "h100"

    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.headers["x-fake-seen-headers"] == ""
    assert resp.headers["x-fake-seen-tenant"] == ""


async def test_chunk_delay_and_pool() -> None:
    async with TestClient(TestServer(build_app("cheap", chunk_delay_s=0.001))) as c:
        resp = await c.post(CHAT, json=_chat_body(max_tokens=2, stream=True))
        assert resp.headers["x-fake-pool"] == "cheap"
        assert _parse_openai_sse(await resp.read())[-1] == "[DONE]"
        assert (await _stats(c))["pool"] == "cheap"
