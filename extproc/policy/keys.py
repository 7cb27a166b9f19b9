"""API keys are stored as SHA-256 digests; the raw key never reaches a log or a file."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tm-"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new raw API key: `tm-` and 256 random bits (URL-safe base64, 43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)
