"""A minimal HTTP client for the end-to-end tests (stdlib http.client: real HTTP/1.1 over TCP)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
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


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll `predicate` until it returns something truthy (or the timeout passes); return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def usage_records(path: Path) -> list[dict[str, Any]]:
    """The usage records of a ledger file so far (a torn last line of a killed writer is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def wait_record(path: Path, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The usage record of `request_id`, once written (settlement is off the request path)."""
    rec = wait_for(lambda: next((r for r in usage_records(path) if r["request_id"] == request_id), None), timeout)
    if rec is None:
        raise AssertionError(f"no usage record for {request_id} in {path}")
    return rec
