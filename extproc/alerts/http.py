"""A minimal HTTP/1.1 client for one thing: POST a body, learn the status code.

The runtime has no HTTP client library, and the webhook needs little: one request per connection
(`Connection: close`), http or https (`ssl.create_default_context()`: the system's CAs, hostname
checked), the status line read and the rest ignored. Everything runs on the event loop's streams
(name resolution included, in the loop's executor), under one deadline per attempt, so a slow or
silent server costs the caller a timeout, never a blocked loop. Whatever the server sends that is
not an HTTP/1.x status line (garbage, a close mid-line, a line past `MAX_LINE`) is `HttpError`.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["MAX_LINE", "Endpoint", "HttpError", "post"]

MAX_LINE = 8192  # bytes of one status or header line
MAX_INTERIM = 8  # 1xx responses skipped before the final one
MAX_HEADERS = 100  # header lines of one 1xx response


class HttpError(Exception):
    """The server's answer is not HTTP/1.x."""


def _printable_ascii(text: str) -> bool:
    return text.isascii() and all(33 <= ord(c) < 127 for c in text)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to POST: parsed once (at start), used for every attempt."""

    https: bool
    host: str  # as connected to (an IPv6 literal without brackets)
    port: int
    target: str  # the request target: path and query
    host_header: str
    authorization: str | None = None  # from user:password in the URL (Basic)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """An http:// or https:// URL; ValueError for anything else."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        host = parts.hostname
        if not host or not _printable_ascii(host):
            raise ValueError("the URL needs an ASCII host name")
        port = parts.port or (443 if parts.scheme == "https" else 80)  # .port raises ValueError when bad
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not _printable_ascii(target):
            raise ValueError("the URL's path and query must be printable ASCII (percent-encode the rest)")
        shown = f"[{host}]" if ":" in host else host
        default = 443 if parts.scheme == "https" else 80
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.scheme == "https", host, port, target,
                   shown if port == default else f"{shown}:{port}", authorization)

    def __str__(self) -> str:
        """Scheme, host and port only: a path or query may hold a token, and this goes to logs."""
        return f"{'https' if self.https else 'http'}://{self.host_header}"

    def request(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        """The whole request: head and body."""
        head = [f"POST {self.target} HTTP/1.1", f"Host: {self.host_header}", "Connection: close",
                "User-Agent: tokenmeter", f"Content-Length: {len(body)}"]
        if self.authorization is not None:
            head.append(f"Authorization: {self.authorization}")
        for name, value in headers.items():
            if not _printable_ascii(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"unusable header {name!r}")
            head.append(f"{name}: {value}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()  # ValueError past the reader's limit (MAX_LINE)
    if not line.endswith(b"\n"):
        raise HttpError("connection closed mid-response")
    return line


async def read_status(reader: asyncio.StreamReader) -> int:
    """The final status code (interim 1xx responses skipped)."""
    for _ in range(MAX_INTERIM + 1):
        parts = (await _line(reader)).split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise HttpError("not an HTTP/1.x status line")
        status = int(parts[1])
        if not 100 <= status < 200 or status == 101:
            return status
        for _ in range(MAX_HEADERS):  # an interim response: its headers, then the next status line
            if (await _line(reader)).strip() == b"":
                break
        else:
            raise HttpError("too many header lines")
    raise HttpError("too many interim responses")


async def post(
    endpoint: Endpoint,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST `body` and return the status code. Raises TimeoutError past `timeout_s` (connecting,
    sending and reading together), OSError (ssl.SSLError included) when the connection fails, and
    HttpError or ValueError when the answer is not HTTP. `ssl_context` (https): made once by the
    caller, since making one reads the CA files."""
    if endpoint.https and ssl_context is None:
        raise ValueError("an https endpoint needs an SSL context")
    request = endpoint.request(body, headers)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            endpoint.host,
            endpoint.port,
            ssl=ssl_context if endpoint.https else None,
            server_hostname=endpoint.host if endpoint.https else None,
            limit=MAX_LINE,
        )
        try:
            writer.write(request)
            await writer.drain()
            return await read_status(reader)
        finally:
            writer.close()  # not awaited: a peer slow to close costs nothing
