"""Who is calling: the API key from the request headers, looked up by its SHA-256."""

from __future__ import annotations

from collections.abc import Mapping

from extproc.policy.keys import hash_key
from extproc.policy.model import ApiKey, Policy


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The raw key from `Authorization: Bearer <key>` or `x-api-key`, if any."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() or None if key else None


def identify(headers: Mapping[str, str], policy: Policy) -> ApiKey | None:
    raw = presented_key(headers)
    if raw is None:
        return None
    return policy.key_for_hash(hash_key(raw))
