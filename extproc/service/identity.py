"""Who is calling: the API key from the request headers, looked up by its SHA-256.

A key the policy knows may still be refused: disabled, not valid yet, expired, or a rotated-out
digest past its grace period. `identify` answers with the key, or a `KeyRefusal` naming the problem
(the 403's error code) and the key (its id and owner: never the raw key or its digest).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from extproc.policy.keys import hash_key
from extproc.policy.model import ApiKey, KeyEntry, Policy


class KeyProblem(StrEnum):
    """Why a known key is refused; the value is the error code of the 403."""

    DISABLED = "key_disabled"
    NOT_YET_VALID = "key_not_yet_valid"
    EXPIRED = "key_expired"


@dataclass(frozen=True, slots=True)
class KeyRefusal:
    key: ApiKey
    problem: KeyProblem
    entry: KeyEntry

    @property
    def code(self) -> str:
        return self.problem.value

    @property
    def message(self) -> str:
        """What the caller is told: the key id and why, and when (never the key)."""
        key_id = self.key.key_id
        if self.problem is KeyProblem.DISABLED:
            reason = self.key.disabled_reason
            return f"API key '{key_id}' is disabled" + (f": {reason}" if reason else ".")
        if self.problem is KeyProblem.NOT_YET_VALID:
            return f"API key '{key_id}' is not valid before {_iso(self.entry.valid_from)}."
        if self.entry.rotated and (self.key.expires is None or self.entry.valid_until < self.key.expires):
            return (
                f"API key '{key_id}' was rotated; the previous key stopped being valid at "
                f"{_iso(self.entry.valid_until)}. Use the new key."
            )
        return f"API key '{key_id}' expired at {_iso(self.entry.valid_until)}."


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The raw key from `Authorization: Bearer <key>` or `x-api-key`, if any."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() or None if key else None


def identify(headers: Mapping[str, str], policy: Policy, now: float | None = None) -> ApiKey | KeyRefusal | None:
    """The caller's key, valid at `now` (epoch seconds; default: the clock); a `KeyRefusal` for a
    key the policy knows but refuses at `now`; None without a key, or with one the policy does not
    know. One dict lookup: the validity window of every digest is computed when the policy loads."""
    raw = presented_key(headers)
    if raw is None:
        return None
    entry = policy.key_entries.get(hash_key(raw))
    if entry is None:
        return None
    key = entry.key
    if key.disabled:
        return KeyRefusal(key, KeyProblem.DISABLED, entry)
    if now is None:
        now = time.time()
    if now < entry.valid_from:
        return KeyRefusal(key, KeyProblem.NOT_YET_VALID, entry)
    if now >= entry.valid_until:
        return KeyRefusal(key, KeyProblem.EXPIRED, entry)
    return key


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")
