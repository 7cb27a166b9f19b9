"""A real local HTTP server for the alert webhook tests, scripted per connection.

Each connection takes the next behaviour from `script` (the last one repeats): answer with a status,
close without answering, send garbage, close mid-status-line, or never answer. Every request read in
full is kept (target, headers, body), whatever is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

CLOSE = "close"  # read the request, close without a byte
GARBAGE = "garbage"  # a line that is not a status line
HALF = "half"  # half a status line, then close
SILENT = "silent"  # read the request, answer nothing, keep the connection open
LONG = "long"  # a status line far longer than the client reads
INTERIM = "interim"  # 100 Continue, then 204


@dataclass(frozen=True)
class Received:
    target: str
    headers: dict[str, str]  # names lowercased
    body: bytes


class Receiver:
    def __init__(self, script: list[int | str]) -> None:
        self.script = script
        self.received: list[Received] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    def url(self, path: str = "/hook", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self._held:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = self.script[min(self.connections, len(self.script) - 1)]
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received.append(Received(lines[0].split(" ")[1], headers, body))
            if behaviour == SILENT:
                self._held.append(writer)
                return
            if behaviour == GARBAGE:
                writer.write(b"\x00\xffnot http at all\r\n\r\n")
            elif behaviour == HALF:
                writer.write(b"HTTP/1.1 2")
            elif behaviour == LONG:
                writer.write(b"HTTP/1.1 200 " + b"x" * 100_000 + b"\r\n\r\n")
            elif behaviour == INTERIM:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            elif isinstance(behaviour, int):
                writer.write(f"HTTP/1.1 {behaviour} Whatever\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@contextlib.asynccontextmanager
async def receiver(script: list[int | str], ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    r = Receiver(script)
    await r.start(ssl_context)
    try:
        yield r
    finally:
        await r.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
