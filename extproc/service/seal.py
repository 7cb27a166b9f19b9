"""An HMAC over the admission facts the processor puts in Envoy's dynamic metadata.

A request is settled from the facts that come back to the processor over its gRPC port, in Envoy's
access log entry (extproc.service.access_log). Anyone who can reach that port could send made-up
entries. With a shared secret (`tokenmeter serve --settle-secret-file`, the same file for every
replica) the processor seals the exact bytes of the facts it wrote at admission (the serialized
tokenmeter.v1.AdmissionFacts, extproc.protos.facts) and settles only entries whose seal holds over
the bytes that came back. Without one nothing is sealed or checked, and the port must be private
(a Unix socket, a network policy, mTLS).
"""

from __future__ import annotations

import hashlib
import hmac

from extproc.settings import check_secret, read_secret

SEAL_KEY = "seal"


class Seal:
    def __init__(self, secret: bytes) -> None:
        self._secret = check_secret(secret, "settle secret")

    @classmethod
    def from_file(cls, path: str) -> Seal:
        return cls(read_secret(path, "settle secret"))

    def sign(self, data: bytes) -> str:
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()[:32]

    def verify(self, data: bytes, given: str) -> bool:
        return hmac.compare_digest(given, self.sign(data))
