"""The fake model server's real-world behaviours: split writes, unicode, gzip, unclean stream ends,
omitted usage, the served log, and the Responses / embeddings / legacy completions endpoints."""

from __future__ import annotations

import asyncio
import base64
import gzip
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.fakes.model_server import build_app, embedding_vector, item_token_counts, parse_split

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
STREAM_PATHS = [CHAT, MESSAGES, RESPONSES, COMPLETIONS]

Client = TestClient[Any, Any]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app("h100"))) as c:
        yield c


def _body(path: str, **extra: Any) -> dict[str, Any]:
    """A request body for ``path`` with a 3-word prompt (6 prompt tokens on every endpoint)."""
    if path == RESPONSES:
        base: dict[str, Any] = {"model": "m1", "input": "hello there world"}
        if "max_tokens" in extra:
            extra["max_output_tokens"] = extra.pop("max_tokens")
    elif path in (COMPLETIONS, EMBEDDINGS):
        base = {"model": "m1", ("prompt" if path == COMPLETIONS else "input"): "hello there world"}
    else:
        base = {"model": "m1", "messages": [{"role": "user", "content": "hello there world"}]}
    return {**base, **extra}


def _stream_body(path: str, n: int) -> dict[str, Any]:
    return _body(path, max_tokens=n, stream=True, stream_options={"include_usage": True})


def _sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name or None, decoded data or '[DONE]') for every SSE block."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name: str | None = None
        data: Any = None
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            else:
                assert key == "data", block
                data = value if value == "[DONE]" else orjson.loads(value)
        events.append((name, data))
    return events


def _stream_text(path: str, events: list[tuple[str | None, Any]]) -> str:
    if path == MESSAGES:
        return "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    if path == RESPONSES:
        return "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    out = []
    for _, d in events:
        if d == "[DONE]" or not d["choices"]:
            continue
        choice = d["choices"][0]
        out.append(choice["text"] if path == COMPLETIONS else choice["delta"].get("content", ""))
    return "".join(out)


def _normalise(raw: bytes) -> bytes:
    """Drop what differs between two identical requests (ids and timestamps)."""
    raw = re.sub(rb'"(created|created_at)":\d+', b'"created":0', raw)
    return re.sub(rb"(chatcmpl-fake-|cmpl-fake-|msg_fake_|resp_fake_)h100[-_]\d+", rb"\1ID", raw)


async def _stats(client: Client) -> dict[str, Any]:
    stats: dict[str, Any] = await (await client.get("/fake/stats")).json()
    return stats


async def _served(client: Client) -> list[dict[str, Any]]:
    served: list[dict[str, Any]] = await (await client.get("/fake/served")).json()
    return served


# --------------------------------------------------------------------------- raw HTTP/1.1


@dataclass
class _Raw:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]  # the HTTP chunks of a chunked body (one per server write)
    body: bytes
    terminated: bool  # a chunked body ended with its zero-length chunk (or a sized body was whole)


def _parse_chunked(data: bytes) -> tuple[list[bytes], bool]:
    chunks: list[bytes] = []
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return chunks, False
        size = int(data[pos:line_end], 16)
        if size == 0:
            return chunks, data[line_end:] == b"\r\n\r\n"
        start = line_end + 2
        if len(data) < start + size + 2:
            chunks.append(data[start:])  # a partial chunk before the connection closed
            return chunks, False
        chunks.append(data[start : start + size])
        pos = start + size + 2


async def _raw(client: Client, path: str, body: Any, headers: dict[str, str] | None = None) -> _Raw:
    """POST over a bare socket, read to EOF, and keep the chunk framing (aiohttp hides it)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    payload = orjson.dumps(body)
    head = f"POST {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    head_raw, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_raw.decode().split("\r\n")
    hdrs = {k.lower(): v for k, _, v in (h.partition(": ") for h in header_lines)}
    if hdrs.get("transfer-encoding") == "chunked":
        chunks, terminated = _parse_chunked(rest)
        return _Raw(int(status_line.split()[1]), hdrs, chunks, b"".join(chunks), terminated)
    return _Raw(int(status_line.split()[1]), hdrs, [], rest, len(rest) == int(hdrs["content-length"]))


# --------------------------------------------------------------------------- split writes


def test_parse_split() -> None:
    assert parse_split("1-50") == (1, 50)
    assert parse_split("7") == (7, 7)
    assert parse_split("off") is None and parse_split("0") is None
    for bad in ("5-1", "0-3", "a-b", "-3", ""):
        with pytest.raises(ValueError):
            parse_split(bad)
    with pytest.raises(ValueError):
        build_app("p", split=(4, 2))


@pytest.mark.parametrize("path", STREAM_PATHS)
async def test_split_stream_is_the_same_bytes_in_small_pieces(client: Client, path: str) -> None:
    whole = await _raw(client, path, _stream_body(path, 6))
    split = await _raw(client, path, _stream_body(path, 6), {"x-fake-split": "1-7", "x-fake-seed": "3"})

    assert split.status == 200 and split.terminated
    assert _normalise(split.body) == _normalise(whole.body)
    assert split.headers["x-fake-seed"] == "3"
    assert "x-fake-seed" not in whole.headers
    sizes = [len(c) for c in split.chunks]
    assert len(sizes) > len(whole.chunks) * 3
    assert max(sizes) <= 7 and sizes.count(0) == 0
    assert _stream_text(path, _sse(split.body)) == "tok0 tok1 tok2 tok3 tok4 tok5"
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (2, 12, 12)


async def test_split_pieces_span_events_and_are_reproducible(client: Client) -> None:
    headers = {"x-fake-split": "10-40", "x-fake-seed": "12345"}
    first = await _raw(client, CHAT, _stream_body(CHAT, 8), headers)
    again = await _raw(client, CHAT, _stream_body(CHAT, 8), headers)
    assert [len(c) for c in first.chunks] == [len(c) for c in again.chunks]
    assert all(10 <= len(c) <= 40 for c in first.chunks[:-1])  # only the last may be shorter
    # Cut from one byte string: some pieces hold the end of one event and the start of the next.
    assert any(b"\n\ndata: " in c for c in first.chunks)
    other = await _raw(client, CHAT, _stream_body(CHAT, 8), {"x-fake-split": "10-40", "x-fake-seed": "7"})
    assert [len(c) for c in other.chunks] != [len(c) for c in first.chunks]


async def test_split_with_unicode_cuts_inside_characters_and_the_usage_event(client: Client) -> None:
    headers = {"x-fake-split": "1-3", "x-fake-seed": "1", "x-fake-unicode": "1"}
    r = await _raw(client, CHAT, _stream_body(CHAT, 9), headers)
    assert r.terminated

    def undecodable(piece: bytes) -> bool:
        try:
            piece.decode()
        except UnicodeDecodeError:
            return True
        return False

    assert any(undecodable(c) for c in r.chunks), "no piece ends inside a multi-byte character"
    usage_at = r.body.index(b'"usage":{"prompt_tokens"')
    offsets = [0]
    for c in r.chunks:
        offsets.append(offsets[-1] + len(c))
    usage_end = r.body.index(b"\n\n", usage_at)
    assert any(usage_at < o < usage_end for o in offsets), "no cut inside the usage event"

    events = _sse(r.body)
    assert _stream_text(CHAT, events) == "tök0 日本1 🙂2 tök3 日本4 🙂5 tök6 日本7 🙂8"
    assert events[-2][1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES, COMPLETIONS, EMBEDDINGS])
async def test_split_json_bodies_are_written_in_pieces(
    client: Client, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = web.StreamResponse.write

    async def recording_write(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await real_write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", recording_write)
    whole = await _raw(client, path, _body(path, max_tokens=5))
    split = await _raw(client, path, _body(path, max_tokens=5), {"x-fake-split": "2-5", "x-fake-seed": "9"})

    assert split.status == 200 and split.terminated and "transfer-encoding" not in split.headers
    assert split.headers["content-type"] == whole.headers["content-type"] == "application/json"
    assert _normalise(split.body) == _normalise(whole.body)
    assert b"".join(writes) == split.body
    assert all(2 <= len(w) <= 5 for w in writes[:-1]) and 1 <= len(writes[-1]) <= 5


async def test_split_error_bodies_and_server_flag() -> None:
    async with TestClient(TestServer(build_app("h100", split=(1, 4)))) as c:
        r = await _raw(c, CHAT, _stream_body(CHAT, 3))
        assert max(len(ch) for ch in r.chunks) <= 4 and r.terminated
        assert "x-fake-seed" in r.headers  # a drawn seed, echoed so a failure can be replayed

        off = await _raw(c, CHAT, _stream_body(CHAT, 3), {"x-fake-split": "off"})
        assert "x-fake-seed" not in off.headers and len(off.chunks) == 1 + 3 + 1 + 1 + 1

        err = await c.post(CHAT, json=_body(CHAT), headers={"x-fake-status": "429"})
        assert err.status == 429 and err.headers["x-fake-seed"]
        assert (await err.json())["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-fake-split": "5-1"},
        {"x-fake-split": "lots"},
        {"x-fake-seed": "x"},
        {"x-fake-unicode": "maybe"},
        {"x-fake-compress": "2"},
        {"x-fake-no-usage": "yes please"},
        {"x-fake-close-after-done": "?"},
    ],
)
async def test_bad_hook_values_are_400(client: Client, headers: dict[str, str]) -> None:
    resp = await client.post(CHAT, json=_body(CHAT), headers=headers)
    assert resp.status == 400
    assert next(iter(headers)) in (await resp.json())["error"]["message"]
    assert (await _stats(client))["requests"] == 0


# --------------------------------------------------------------------------- unicode


@pytest.mark.parametrize("path", STREAM_PATHS)
async def test_unicode_words_keep_the_counts(client: Client, path: str) -> None:
    expected = "tök0 日本1 🙂2 tök3"
    body = await (await client.post(path, json=_body(path, max_tokens=4), headers={"x-fake-unicode": "1"})).json()
    text = {
        CHAT: lambda b: b["choices"][0]["message"]["content"],
        MESSAGES: lambda b: b["content"][0]["text"],
        RESPONSES: lambda b: b["output"][0]["content"][0]["text"],
        COMPLETIONS: lambda b: b["choices"][0]["text"],
    }[path](body)
    assert text == expected
    assert len(text.encode()) > len(text)

    resp = await client.post(path, json=_stream_body(path, 4), headers={"x-fake-unicode": "1"})
    assert _stream_text(path, _sse(await resp.read())) == expected
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (2, 12, 8)


async def test_unicode_server_flag_and_opt_out() -> None:
    async with TestClient(TestServer(build_app("h100", unicode=True))) as c:
        body = await (await c.post(CHAT, json=_body(CHAT, max_tokens=2))).json()
        assert body["choices"][0]["message"]["content"] == "tök0 日本1"
        body = await (await c.post(CHAT, json=_body(CHAT, max_tokens=2), headers={"x-fake-unicode": "0"})).json()
        assert body["choices"][0]["message"]["content"] == "tok0 tok1"


# --------------------------------------------------------------------------- compression


@pytest.fixture
async def raw_client() -> AsyncIterator[Client]:
    """A client that shows bodies as sent (no transparent gzip decoding)."""
    async with TestClient(TestServer(build_app("h100")), auto_decompress=False) as c:
        yield c


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES, COMPLETIONS, EMBEDDINGS])
async def test_compress_json_when_gzip_is_accepted(raw_client: Client, path: str) -> None:
    headers = {"x-fake-compress": "1", "Accept-Encoding": "br;q=1.0, gzip;q=0.8"}
    resp = await raw_client.post(path, json=_body(path, max_tokens=3), headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    raw = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(raw)
    body = orjson.loads(gzip.decompress(raw))
    assert "usage" in body
    stats = await _stats(raw_client)
    assert (stats["requests"], stats["prompt_tokens"]) == (1, 6)


async def test_compress_needs_accept_encoding_and_skips_streams(raw_client: Client) -> None:
    for accept in ("identity", "gzip;q=0", "deflate, br"):
        resp = await raw_client.post(
            CHAT, json=_body(CHAT), headers={"x-fake-compress": "1", "Accept-Encoding": accept}
        )
        assert "Content-Encoding" not in resp.headers
        assert orjson.loads(await resp.read())["usage"]["completion_tokens"] == 16

    headers = {"x-fake-compress": "1", "Accept-Encoding": "gzip"}
    resp = await raw_client.post(CHAT, json=_stream_body(CHAT, 2), headers=headers)
    assert "Content-Encoding" not in resp.headers
    assert _sse(await resp.read())[-1] == (None, "[DONE]")

    # Errors are JSON bodies too.
    resp = await raw_client.post(CHAT, json=_body(CHAT), headers={**headers, "x-fake-status": "500"})
    assert resp.status == 500 and resp.headers["Content-Encoding"] == "gzip"
    assert orjson.loads(gzip.decompress(await resp.read()))["error"]["type"] == "api_error"


async def test_compress_server_flag_with_split_and_opt_out() -> None:
    async with TestClient(TestServer(build_app("h100", compress=True)), auto_decompress=False) as c:
        r = await _raw(c, CHAT, _body(CHAT, max_tokens=3), {"Accept-Encoding": "gzip", "x-fake-split": "1-8"})
        assert r.headers["content-encoding"] == "gzip" and r.terminated
        assert int(r.headers["content-length"]) == len(r.body)
        assert orjson.loads(gzip.decompress(r.body))["usage"]["completion_tokens"] == 3

        resp = await c.post(CHAT, json=_body(CHAT), headers={"Accept-Encoding": "gzip", "x-fake-compress": "0"})
        assert "Content-Encoding" not in resp.headers

    # The ordinary (auto-decompressing) client reads the same JSON either way.
    async with TestClient(TestServer(build_app("h100", compress=True))) as c:
        resp = await c.post(CHAT, json=_body(CHAT, max_tokens=2))
        assert (await resp.json())["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


# --------------------------------------------------------------------------- close after done


@pytest.mark.parametrize(
    ("path", "last"),
    [
        (CHAT, b"data: [DONE]\n\n"),
        (COMPLETIONS, b"data: [DONE]\n\n"),
        (MESSAGES, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
        (RESPONSES, b"}}\n\n"),
    ],
)
async def test_close_after_done_sends_everything_but_the_last_chunk(client: Client, path: str, last: bytes) -> None:
    r = await _raw(client, path, _stream_body(path, 5), {"x-fake-close-after-done": "1"})
    assert r.status == 200 and r.headers["transfer-encoding"] == "chunked"
    assert not r.terminated
    assert r.body.endswith(last)
    events = _sse(r.body)
    assert _stream_text(path, events) == "tok0 tok1 tok2 tok3 tok4"
    if path == RESPONSES:
        assert events[-1][0] == "response.incomplete"
        assert events[-1][1]["response"]["usage"]["output_tokens"] == 5

    stats = await _stats(client)
    assert (stats["requests"], stats["completion_tokens"], stats["cut_streams"]) == (1, 5, 0)
    assert (await client.get("/healthz")).status == 200


async def test_close_after_done_is_an_unclean_end_for_an_http_client(client: Client) -> None:
    resp = await client.post(CHAT, json=_stream_body(CHAT, 3), headers={"x-fake-close-after-done": "1"})
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in resp.content.iter_any():
            received += data
    assert received.endswith(b"data: [DONE]\n\n")
    assert b'"usage":{"prompt_tokens":6,"completion_tokens":3' in received


async def test_close_after_done_with_split_flushes_every_piece(client: Client) -> None:
    headers = {"x-fake-close-after-done": "1", "x-fake-split": "1-5", "x-fake-seed": "4", "x-fake-unicode": "1"}
    r = await _raw(client, CHAT, _stream_body(CHAT, 200), headers)
    assert not r.terminated and r.body.endswith(b"data: [DONE]\n\n")
    assert _sse(r.body)[-2][1]["usage"]["completion_tokens"] == 200


async def test_close_after_done_is_ignored_for_json_and_loses_to_cut(client: Client) -> None:
    r = await _raw(client, CHAT, _body(CHAT, max_tokens=2), {"x-fake-close-after-done": "1"})
    assert r.terminated and orjson.loads(r.body)["usage"]["completion_tokens"] == 2

    r = await _raw(client, CHAT, _stream_body(CHAT, 5), {"x-fake-close-after-done": "1", "x-fake-cut-after": "2"})
    assert not r.terminated and b"[DONE]" not in r.body
    stats = await _stats(client)
    assert (stats["requests"], stats["cut_streams"]) == (1, 1)


# --------------------------------------------------------------------------- no usage


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES, COMPLETIONS, EMBEDDINGS])
async def test_no_usage_json(client: Client, path: str) -> None:
    resp = await client.post(path, json=_body(path, max_tokens=3), headers={"x-fake-no-usage": "1"})
    assert resp.status == 200
    raw = await resp.read()
    assert b"usage" not in raw
    normal = await (await client.post(path, json=_body(path, max_tokens=3))).json()
    assert "usage" in normal
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"]) == (2, 12)
    assert stats["completion_tokens"] == (0 if path == EMBEDDINGS else 6)


@pytest.mark.parametrize("path", STREAM_PATHS)
async def test_no_usage_stream(client: Client, path: str) -> None:
    resp = await client.post(path, json=_stream_body(path, 4), headers={"x-fake-no-usage": "1"})
    raw = await resp.read()
    assert b"usage" not in raw
    events = _sse(raw)
    assert _stream_text(path, events) == "tok0 tok1 tok2 tok3"
    if path in (CHAT, COMPLETIONS):
        assert events[-1] == (None, "[DONE]")
        assert all(d["choices"] for _, d in events[:-1])  # no usage chunk
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (1, 6, 4)


# --------------------------------------------------------------------------- served log


async def test_served_list_and_log(tmp_path: Path) -> None:
    log_path = tmp_path / "served.jsonl"
    async with TestClient(TestServer(build_app("h100", served_log=log_path))) as c:
        rid = {"x-tokenmeter-request-id": "req-1", "x-tokenmeter-tenant": "acme"}
        await (await c.post(CHAT, json=_body(CHAT, max_tokens=2), headers=rid)).read()
        await (await c.post(MESSAGES, json=_stream_body(MESSAGES, 3))).read()
        await _raw(c, CHAT, _stream_body(CHAT, 5), {"x-fake-cut-after": "2"})
        await (await c.post(CHAT, json=_body(CHAT), headers={"x-fake-status": "503"})).read()
        await (await c.post(EMBEDDINGS, json=_body(EMBEDDINGS), headers={"x-fake-no-usage": "1"})).read()
        await _raw(c, RESPONSES, _stream_body(RESPONSES, 2), {"x-fake-close-after-done": "1"})

        served = await _served(c)
        assert [(s["path"], s["stream"], s["status"], s["completed"]) for s in served] == [
            (CHAT, False, 200, True),
            (MESSAGES, True, 200, True),
            (CHAT, True, 200, False),
            (CHAT, False, 503, False),
            (EMBEDDINGS, False, 200, True),
            (RESPONSES, True, 200, True),
        ]
        assert served[0] == {
            "id": "chatcmpl-fake-h100-0",
            "x_tokenmeter_request_id": "req-1",
            "tenant": "acme",
            "path": CHAT,
            "stream": False,
            "status": 200,
            "prompt_tokens": 6,
            "completion_tokens": 2,
            "completed": True,
            "usage_reported": True,
        }
        assert served[1]["id"] == "msg_fake_h100_1" and served[1]["x_tokenmeter_request_id"] is None
        assert (served[2]["completion_tokens"], served[2]["id"]) == (2, "chatcmpl-fake-h100-2")  # sent before the cut
        assert served[3]["id"] is None and served[3]["prompt_tokens"] == 0
        assert served[4]["id"] == "embd-fake-h100-3" and served[4]["usage_reported"] is False
        assert served[5]["id"] == "resp_fake_h100_4" and served[5]["completion_tokens"] == 2

        lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
        assert lines == served

        # The completed entries are exactly what the stats counted.
        stats = await _stats(c)
        done = [s for s in served if s["completed"]]
        assert stats["requests"] == len(done)
        assert stats["prompt_tokens"] == sum(s["prompt_tokens"] for s in done)
        assert stats["completion_tokens"] == sum(s["completion_tokens"] for s in done)

        assert (await c.post("/fake/reset")).status == 200
        assert await _served(c) == []
        assert len(log_path.read_bytes().splitlines()) == 6  # the file is append-only


async def test_served_records_a_client_that_went_away(client: Client) -> None:
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    payload = orjson.dumps(_stream_body(CHAT, 200))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\nx-fake-chunk-delay-ms: 5\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    assert b"tok1" in await reader.readuntil(b"tok1")
    writer.close()

    for _ in range(200):
        served = await _served(client)
        if served:
            break
        await asyncio.sleep(0.02)
    assert len(served) == 1
    assert served[0]["completed"] is False and 2 <= served[0]["completion_tokens"] < 200
    stats = await _stats(client)
    assert (stats["requests"], stats["cut_streams"]) == (0, 0)


# --------------------------------------------------------------------------- Responses API


async def test_responses_json(client: Client) -> None:
    resp = await client.post(RESPONSES, json={"model": "gpt", "input": "hi there"})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert body["model"] == "gpt"
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    (part,) = message["content"]
    assert part["type"] == "output_text" and part["annotations"] == []
    assert part["text"] == " ".join(f"tok{i}" for i in range(16))
    assert body["usage"] == {
        "input_tokens": 2 + 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 16,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 21,
    }

    # A list of items (string or typed content), instructions, and a maximum -> "incomplete".
    body = {
        "input": [
            {"role": "user", "content": "a b"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "c d e"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "f"}, {"type": "input_image"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "ignored words"},
        ],
        "instructions": "be nice",
        "max_output_tokens": 3,
    }
    out = await (await client.post(RESPONSES, json=body)).json()
    assert out["usage"]["input_tokens"] == (2 + 3) + (3 + 3) + (1 + 3) + 3 + (2 + 3)
    assert out["usage"]["output_tokens"] == 3 and out["max_output_tokens"] == 3
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["model"] == "fake-model"

    for bad in ({"input": 3}, {"input": "x", "max_output_tokens": "3"}, {"input": "x", "instructions": 1}):
        assert (await client.post(RESPONSES, json=bad)).status == 400


@pytest.mark.parametrize(("max_tokens", "final"), [(None, "response.completed"), (4, "response.incomplete")])
async def test_responses_stream(client: Client, max_tokens: int | None, final: str) -> None:
    body: dict[str, Any] = {"model": "gpt", "input": "hello there world", "stream": True}
    if max_tokens is not None:
        body["max_output_tokens"] = max_tokens
    resp = await client.post(RESPONSES, json=body, headers={"x-tokenmeter-tenant": "t"})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(await resp.read())
    n = max_tokens or 16
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert all(d["type"] == name for name, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    text = " ".join(f"tok{i}" for i in range(n))
    assert _stream_text(RESPONSES, events) == text
    assert events[-4][1]["text"] == text
    item_ids = {d["item_id"] for _, d in events if "item_id" in d}
    assert item_ids == {events[2][1]["item"]["id"]}
    done = events[-1][1]["response"]
    assert done["status"] == ("incomplete" if max_tokens else "completed")
    assert done["output"][0]["content"][0]["text"] == text
    assert done["usage"]["input_tokens"] == 6 and done["usage"]["output_tokens"] == n
    assert done["usage"]["total_tokens"] == 6 + n
    assert (await _stats(client))["by_tenant"] == {"t": {"requests": 1, "prompt_tokens": 6, "completion_tokens": n}}


async def test_responses_stream_cut(client: Client) -> None:
    r = await _raw(client, RESPONSES, _stream_body(RESPONSES, 6), {"x-fake-cut-after": "2"})
    assert not r.terminated
    names = [name for name, _ in _sse(r.body)]
    assert names.count("response.output_text.delta") == 2 and "response.incomplete" not in names
    assert (await _stats(client))["cut_streams"] == 1


# --------------------------------------------------------------------------- embeddings


def test_item_token_counts() -> None:
    assert item_token_counts("a b c") == [3]
    assert item_token_counts(["a", "b c", ""]) == [1, 2, 0]
    assert item_token_counts([1, 2, 3, 4]) == [4]
    assert item_token_counts([[1, 2], [3]]) == [2, 1]
    for bad in (None, 3, [], ["a", 1], [True], {"x": 1}, [[1, "a"]]):
        assert item_token_counts(bad) is None


async def test_embeddings(client: Client) -> None:
    body = await (await client.post(EMBEDDINGS, json={"model": "emb", "input": "hello there"})).json()
    assert body["object"] == "list" and body["model"] == "emb"
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 1536 and item["embedding"] == embedding_vector(0, 1536)
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert list(body) == ["object", "data", "model", "usage"]  # usage at the end, as OpenAI sends it

    req = {"input": ["a b", "c"], "dimensions": 8, "encoding_format": "base64"}
    body = await (await client.post(EMBEDDINGS, json=req)).json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    decoded = struct.unpack("<8f", base64.b64decode(body["data"][1]["embedding"]))
    assert decoded == pytest.approx(embedding_vector(1, 8), abs=1e-7)
    assert body["usage"] == {"prompt_tokens": (2 + 3) + (1 + 3), "total_tokens": 9}

    tokens = await (await client.post(EMBEDDINGS, json={"input": [[1, 2, 3], [4]], "dimensions": 2})).json()
    assert tokens["usage"]["prompt_tokens"] == (3 + 3) + (1 + 3)

    bads: list[dict[str, Any]] = [
        {"input": []},
        {"input": "x", "dimensions": 0},
        {"input": "x", "encoding_format": "hex"},
        {},
    ]
    for bad in bads:
        assert (await client.post(EMBEDDINGS, json=bad)).status == 400
    stats = await _stats(client)
    assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (3, 5 + 9 + 10, 0)


# --------------------------------------------------------------------------- legacy completions


async def test_completions_json(client: Client) -> None:
    body = await (await client.post(COMPLETIONS, json={"model": "inst", "prompt": "say this", "max_tokens": 3})).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"text": "tok0 tok1 tok2", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    two = await (await client.post(COMPLETIONS, json={"prompt": ["a", "b c"]})).json()
    assert two["usage"]["prompt_tokens"] == (1 + 3) + (2 + 3)
    assert two["choices"][0]["finish_reason"] == "stop" and len(two["choices"]) == 1
    assert (await client.post(COMPLETIONS, json={"prompt": 5})).status == 400


async def test_completions_stream(client: Client) -> None:
    resp = await client.post(COMPLETIONS, json=_stream_body(COMPLETIONS, 3))
    events = [d for _, d in _sse(await resp.read())]
    assert events[-1] == "[DONE]"
    *tokens, finish, usage_chunk, _ = events
    assert [t["choices"][0]["text"] for t in tokens] == ["tok0", " tok1", " tok2"]
    assert all(t["object"] == "text_completion" and t["usage"] is None for t in tokens)
    assert finish["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3

    resp = await client.post(COMPLETIONS, json=_body(COMPLETIONS, stream=True))
    events = [d for _, d in _sse(await resp.read())]
    assert len(events) == 16 + 1 + 1 and all("usage" not in e for e in events[:-1])


# --------------------------------------------------------------------------- unchanged defaults


async def test_anthropic_empty_body_error(client: Client) -> None:
    resp = await client.post(MESSAGES, json=_body(MESSAGES), headers={"x-fake-status": "529", "x-fake-empty-body": "1"})
    assert resp.status == 529 and await resp.read() == b""
    served = await _served(client)
    assert [(s["status"], s["completed"]) for s in served] == [(529, False)]


async def test_default_chat_stream_bytes_are_unchanged(client: Client) -> None:
    r = await _raw(client, CHAT, _stream_body(CHAT, 2))
    base = '{"id":"chatcmpl-fake-ID","object":"chat.completion.chunk","created":0,"model":"m1"'
    expected = [
        base + ',"usage":null,"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}]}',
        base + ',"usage":null,"choices":[{"index":0,"delta":{"content":"tok0"},"logprobs":null,"finish_reason":null}]}',
        base
        + ',"usage":null,"choices":[{"index":0,"delta":{"content":" tok1"},"logprobs":null,"finish_reason":null}]}',
        base + ',"usage":null,"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]}',
        base + ',"usage":{"prompt_tokens":6,"completion_tokens":2,"total_tokens":8},"choices":[]}',
        "[DONE]",
    ]
    assert [_normalise(c).decode() for c in r.chunks] == [f"data: {e}\n\n" for e in expected]
    assert r.terminated and "x-fake-seed" not in r.headers
