"""A minimal HTTP client for the end-to-end tests (stdlib http.client: real HTTP/1.1 over TCP)."""

from __future__ import annotations

import http.client
import json
import socket
import struct
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


class OpenStream:
    """A streaming request whose response has begun (status and headers read) and is still open:
    the test decides how it ends (`finish`: read it to its end; `abort`: the client goes away)."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], rest: bytes) -> None:
        self.sock = sock
        self.status = status
        self.headers = headers
        self._raw = rest  # body bytes read so far (still chunk-encoded)

    def finish(self) -> Reply:
        """Read until the server closes the connection (the request asks for `Connection: close`)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self._raw += data
        except (ConnectionError, TimeoutError):
            reset = True  # what came is what there is
        else:
            reset = False
        finally:
            self.sock.close()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            body, complete = _dechunk(self._raw)
        else:
            body = self._raw
            length = self.headers.get("content-length")
            complete = not reset and (length is None or len(body) == int(length))
        return Reply(self.status, self.headers, body, complete=complete)

    def abort(self) -> None:
        """Close the connection at once with a reset, mid-response (a client that went away)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.sock.close()


def open_stream(
    base: str,
    key: str,
    *,
    model: str = "llama-test",
    max_tokens: int = 16,
    text: str = "hello there",
    extra_headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> OpenStream:
    """POST a streaming chat completion over a raw socket and return once the response's status and
    headers have come (for an admitted request: after admission, while the stream goes on)."""
    parts = urlsplit(base)
    payload = {"model": model, "max_tokens": max_tokens, "stream": True,
               "messages": [{"role": "user", "content": text}]}
    body = json.dumps(payload).encode()
    headers = {
        "host": f"{parts.hostname}:{parts.port}",
        "content-type": "application/json",
        "content-length": str(len(body)),
        "authorization": f"Bearer {key}",
        "connection": "close",
        **(extra_headers or {}),
    }
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout)
    try:
        sock.sendall(head.encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed before the response head: {raw!r}")
            raw += data
    except BaseException:
        sock.close()
        raise
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    response_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return OpenStream(sock, status, response_headers, rest)


def _dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The body of a chunked transfer, and whether its terminating zero-length chunk came."""
    out = b""
    while True:
        size_line, sep, rest = raw.partition(b"\r\n")
        if not sep:
            return out + raw, False
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return out + raw, False
        if size == 0:
            return out, True
        out += rest[:size]
        if len(rest) < size + 2:
            return out, False
        raw = rest[size + 2:]


def chat_model(
    base: str,
    key: str,
    model: str,
    *,
    max_tokens: int = 32,
    text: str = "hello there",
    extra_headers: dict[str, str] | None = None,
) -> Reply:
    """A non-streaming chat completion for `model` (`chat` asks for llama-test)."""
    payload = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}", **(extra_headers or {})}
    return request(base, "POST", "/v1/chat/completions", json.dumps(payload).encode(), headers)


def fake_served(port: int) -> list[dict[str, Any]]:
    """The requests a fake model server answered, oldest first (`GET /fake/served`)."""
    served: list[dict[str, Any]] = request(f"http://127.0.0.1:{port}", "GET", "/fake/served").json()
    return served
