"""A minimal HTTP client for the end-to-end tests (stdlib http.client: real HTTP/1.1 over TCP)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool = True  # False: the connection ended before the end of the body (what came is in body)

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_data(self) -> list[Any]:
        out = []
        for line in self.body.decode().splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload != "[DONE]":
                    out.append(json.loads(payload))
        return out


def request(
    base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return Reply(resp.status, headers, resp.read())
        except http.client.IncompleteRead as cut:
            return Reply(resp.status, headers, cut.partial, complete=False)
    finally:
        conn.close()


def chat(
    base: str,
    key: str | None,
    *,
    stream: bool = False,
    max_tokens: int | None = 32,
    text: str = "hello there, how are you today",
    extra_headers: dict[str, str] | None = None,
    include_usage: bool | None = None,
) -> Reply:
    payload: dict[str, Any] = {"model": "llama-test", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if stream:
        payload["stream"] = True
    if include_usage is not None:
        payload["stream_options"] = {"include_usage": include_usage}
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    headers.update(extra_headers or {})
    return request(base, "POST", "/v1/chat/completions", json.dumps(payload).encode(), headers)


def fake_stats(port: int) -> Any:
    return request(f"http://127.0.0.1:{port}", "GET", "/fake/stats").json()
