"""API keys are stored as SHA-256 digests; the raw key never reaches a log or a file."""

from __future__ import annotations

import hashlib


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()
