"""Hot reload: keep the current policy, poll its file, swap in good edits, keep the last good on bad ones.

With an audit sink (extproc.audit.AuditLog), every load that takes effect (the first one too) is
recorded as a ``policy_loaded`` event (version, SHA-256 of the file's bytes, what changed) and every
refused edit as ``policy_rejected`` (file, line, reason, the version kept).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from extproc.audit.events import AuditEvent, policy_loaded, policy_rejected
from extproc.policy.loader import PolicyError, parse_policy, read_policy_text
from extproc.policy.model import Policy

logger = logging.getLogger("tokenmeter.policy")

Listener = Callable[[Policy], None]


class AuditSink(Protocol):
    """Where audit events go (extproc.audit.AuditLog): must not block, may drop."""

    def append(self, event_type: str, /, **fields: Any) -> None: ...


@dataclass(frozen=True)
class _Stamp:
    """What a cheap stat says about the file; a different stamp means "read it again"."""

    device: int
    inode: int
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class _Loaded:
    stamp: _Stamp | None
    digest: str
    policy: Policy


@dataclass(frozen=True)
class _Failed:
    stamp: _Stamp | None
    digest: str  # of the bad text, so the same bad file is reported once
    error: PolicyError


@dataclass(frozen=True)
class _Unchanged:
    stamp: _Stamp | None


_Outcome = _Loaded | _Failed | _Unchanged


class PolicyStore:
    """Holds the current policy of one file and reloads it when the file changes.

    Use from one thread (the event loop's): `run()` does the file I/O and parsing in a
    worker thread, but swaps the policy and calls listeners on the caller's thread.
    """

    def __init__(self, path: str | Path, *, audit: AuditSink | None = None) -> None:
        self._path = Path(path)
        self._listeners: list[Listener] = []
        self._audit = audit
        self.last_error: PolicyError | None = None
        self.reload_failures: int = 0
        # stat before reading: a write that lands after the read still changes the stamp
        self._stamp = _stat(self._path)
        digest: str | None = None
        try:
            text = read_policy_text(self._path)
            self._digest = digest = _digest(text)
            self._current = parse_policy(text, str(self._path))
        except PolicyError as error:
            self._record(policy_rejected, self._path, error, file_sha256=digest)
            raise
        self._record(policy_loaded, self._current, self._path, None, file_sha256=self._digest)

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def path(self) -> Path:
        return self._path

    def add_listener(self, callback: Listener) -> None:
        """Call `callback(policy)` after each successful reload (not for the first load)."""
        self._listeners.append(callback)

    def reload_now(self) -> bool:
        """Check the file once, synchronously. True if a new policy was loaded."""
        return self._apply(self._check())

    async def run(self, interval: float = 1.0) -> None:
        """Poll the file every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                outcome = await asyncio.to_thread(self._check)
                self._apply(outcome)
            except Exception:
                logger.exception("policy watch of %s failed; will retry", self._path)

    # -- checking (blocking; safe to run in a worker thread) ------------------------------

    def _check(self) -> _Outcome:
        stamp = _stat(self._path)
        if stamp == self._stamp:
            return _Unchanged(stamp)
        try:
            text = read_policy_text(self._path)
        except PolicyError as error:
            return _Failed(stamp, f"{_UNREADABLE}{error.reason}", error)
        digest = _digest(text)
        if digest == self._digest:
            return _Unchanged(stamp)
        try:
            return _Loaded(stamp, digest, parse_policy(text, str(self._path)))
        except PolicyError as error:
            return _Failed(stamp, digest, error)

    # -- applying (on the caller's thread) ------------------------------------------------

    def _apply(self, outcome: _Outcome) -> bool:
        self._stamp = outcome.stamp
        if isinstance(outcome, _Unchanged) or outcome.digest == self._digest:
            return False
        self._digest = outcome.digest
        if isinstance(outcome, _Failed):
            self._fail(outcome.error, outcome.digest)
            return False
        previous, self._current = self._current, outcome.policy
        self.last_error = None
        logger.info("policy reloaded from %s: version %s", self._path, outcome.policy.version)
        self._record(policy_loaded, outcome.policy, self._path, previous, file_sha256=outcome.digest)
        self._notify(outcome.policy)
        return True

    def _fail(self, error: PolicyError, digest: str) -> None:
        self.last_error = error
        self.reload_failures += 1
        logger.error("policy reload failed, keeping version %s: %s", self._current.version, error)
        sha256 = None if digest.startswith(_UNREADABLE) else digest
        self._record(policy_rejected, self._path, error, kept_version=self._current.version, file_sha256=sha256)

    def _record(self, build: Callable[..., AuditEvent], *args: Any, **kwargs: Any) -> None:
        """Hand an event to the audit sink; an audit failure never changes what the store does."""
        if self._audit is None:
            return
        try:
            event = build(*args, **kwargs)
            self._audit.append(event.type, **event.fields)
        except Exception:
            logger.exception("cannot record a policy audit event for %s", self._path)

    def _notify(self, policy: Policy) -> None:
        for listener in list(self._listeners):
            try:
                listener(policy)
            except Exception:
                logger.exception("policy listener %r failed", listener)


_UNREADABLE = "unreadable:"  # the digest of a file that could not be read: the reason, not a hash


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stat(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stamp(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
