"""An HMAC over the admission facts the processor puts in Envoy's dynamic metadata.

With envoy/envoy-native.yaml (and envoy-observe.yaml) a request is settled from metadata that comes
back to the processor over its gRPC port (the access log entry, the meter stream). Anyone who can
reach that port could send made-up entries. With a shared secret (`tokenmeter serve
--settle-secret-file`, the same file for every replica) the processor seals what it wrote at
admission and settles only entries whose seal holds. Without one nothing is sealed or checked,
and the port must be private (a Unix socket, a network policy, mTLS).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import struct_pb2

SEAL_KEY = "seal"
# The facts a settlement depends on: who is charged, how much was reserved, what the record says.
SEALED = ("request_id", "tenant", "project", "team", "key_id", "reserved_tokens", "prompt_estimate",
          "time", "decision", "schema", "stream", "model", "pool")


def _canonical(values: Mapping[str, object]) -> bytes:
    parts = []
    for name in SEALED:
        v = values.get(name, "")
        if isinstance(v, bool):
            v = "1" if v else "0"
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        parts.append(f"{name}={v}")
    return "\x1f".join(parts).encode()


class Seal:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the settle secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_file(cls, path: str) -> Seal:
        return cls(Path(path).read_bytes().strip())

    def sign(self, values: Mapping[str, object]) -> str:
        return hmac.new(self._secret, _canonical(values), hashlib.sha256).hexdigest()[:32]

    def verify(self, fields: Mapping[str, struct_pb2.Value]) -> bool:
        given = fields.get(SEAL_KEY)
        if given is None:
            return False
        values: dict[str, object] = {}
        for name in SEALED:
            value = fields.get(name)
            if value is None:
                continue
            kind = value.WhichOneof("kind")
            values[name] = getattr(value, kind) if kind else ""
        return hmac.compare_digest(given.string_value, self.sign(values))
