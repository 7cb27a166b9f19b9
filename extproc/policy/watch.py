"""Hot reload: keep the current policy, watch its file, swap in good edits, keep the last good on bad ones.

The file is looked at every `interval` seconds (`run`), and at once when asked (`request_reload`:
what the server's SIGHUP handler calls; `reload_now` synchronously). A cheap stat decides whether to
read it: which file the path resolves to (its real path, device and inode: a Kubernetes ConfigMap
update swaps the ``..data`` symlink onto a new directory, and the new file can have the same size and
mtime as the old one), its mtime and its size. An edit that changes none of these (an in-place rewrite
of the same length whose mtime was put back) is only seen on request: `request_reload` reads the file
whatever its stat says. Either way the SHA-256 of the text decides whether anything changed.

A read is only used when the file's stat is the same before and after it; a file that is still being
written is read again (a few times, then at the next look). A file read half-written anyway (a writer
that pauses) is a rejected edit: the last good policy stays, and the complete file loads once written.

With an audit sink (extproc.audit.AuditLog), every load that takes effect (the first one too) is
recorded as a ``policy_loaded`` event (version, SHA-256 of the file's bytes, what changed) and every
refused edit as ``policy_rejected`` (file, line, reason, the version kept), whatever triggered the look.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from extproc.audit.events import AuditEvent, policy_loaded, policy_rejected
from extproc.policy.loader import PolicyError, parse_policy, read_policy_text
from extproc.policy.model import Policy

logger = logging.getLogger("tokenmeter.policy")

Listener = Callable[[Policy], None]

# A read whose stat differs before and after it is retried this many times in all, this far apart;
# after that the file counts as still changing and the next look reads it again.
READ_ATTEMPTS = 3
READ_RETRY_S = 0.02


class AuditSink(Protocol):
    """Where audit events go (extproc.audit.AuditLog): must not block, may drop."""

    def append(self, event_type: str, /, **fields: Any) -> None: ...


@dataclass(frozen=True)
class _Stamp:
    """What a cheap stat says about the file; a different stamp means "read it again"."""

    target: str  # the path with every symlink resolved: a ConfigMap swap changes it
    device: int
    inode: int
    mtime_ns: int
    size: int


# The stamp of a file seen changing while it was read: equal to no real stamp, so the next look reads it.
_CHANGING = _Stamp("", -1, -1, -1, -1)


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
    `request_reload()` alone may be called from anywhere (a signal handler, another thread).
    """

    def __init__(self, path: str | Path, *, audit: AuditSink | None = None) -> None:
        self._path = Path(path)
        self._listeners: list[Listener] = []
        self._audit = audit
        self.last_error: PolicyError | None = None
        self.reload_failures: int = 0
        self._requested: str | None = None  # why a look was asked for, until `run` makes it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
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

    def reload_now(self, *, force: bool = False, reason: str | None = None) -> bool:
        """Check the file once, synchronously. True if a new policy was loaded.

        `force`: read it even if its stat looks unchanged. `reason` (e.g. "SIGHUP") is logged."""
        return self._apply(self._check(force), reason)

    def request_reload(self, reason: str = "reload requested") -> None:
        """Have `run()` read the file now, whatever its stat says (logged with `reason`).

        Never blocks and does no I/O: safe in a handler of `loop.add_signal_handler` (SIGHUP), from a
        plain `signal.signal` handler or from another thread. Before `run()` starts, the look happens
        as soon as it does."""
        self._requested = reason
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def run(self, interval: float = 1.0) -> None:
        """Look at the file every `interval` seconds, and when asked (`request_reload`), until cancelled."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            while True:
                if self._requested is None:
                    try:
                        await asyncio.wait_for(self._wake.wait(), interval)
                    except TimeoutError:
                        pass
                self._wake.clear()
                reason, self._requested = self._requested, None
                try:
                    outcome = await asyncio.to_thread(self._check, reason is not None)
                    self._apply(outcome, reason)
                except Exception:
                    logger.exception("policy watch of %s failed; will retry", self._path)
        finally:
            self._loop = self._wake = None

    # -- checking (blocking; safe to run in a worker thread) ------------------------------

    def _check(self, force: bool = False) -> _Outcome:
        stamp = _stat(self._path)
        if stamp == self._stamp and not force:
            return _Unchanged(stamp)
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(READ_RETRY_S)
            try:
                text: str | PolicyError = read_policy_text(self._path)
            except PolicyError as error:
                text = error
            # The same stat after the read as before: what was read is that file, whole. (A ConfigMap
            # swap can also remove the directory the path led to mid-read: a "not found" that the
            # new stat shows to be a swap, not a deletion.)
            after = _stat(self._path)
            if after == stamp:
                break
            stamp = after
        else:
            return _Unchanged(_CHANGING)
        if isinstance(text, PolicyError):
            return _Failed(stamp, f"{_UNREADABLE}{text.reason}", text)
        digest = _digest(text)
        if digest == self._digest:
            return _Unchanged(stamp)
        try:
            return _Loaded(stamp, digest, parse_policy(text, str(self._path)))
        except PolicyError as error:
            return _Failed(stamp, digest, error)

    # -- applying (on the caller's thread) ------------------------------------------------

    def _apply(self, outcome: _Outcome, reason: str | None = None) -> bool:
        self._stamp = outcome.stamp
        why = f" ({reason})" if reason else ""
        if isinstance(outcome, _Unchanged) or outcome.digest == self._digest:
            if reason is not None:
                self._report_unchanged(outcome, why)
            return False
        self._digest = outcome.digest
        if isinstance(outcome, _Failed):
            self._fail(outcome.error, outcome.digest, why)
            return False
        previous, self._current = self._current, outcome.policy
        self.last_error = None
        logger.info("policy reloaded from %s%s: version %s", self._path, why, outcome.policy.version)
        self._record(policy_loaded, outcome.policy, self._path, previous, file_sha256=outcome.digest)
        self._notify(outcome.policy)
        return True

    def _report_unchanged(self, outcome: _Outcome, why: str) -> None:
        """A requested look that changed nothing says so (a poll that changed nothing is silent)."""
        if outcome.stamp is _CHANGING:
            logger.info("policy %s is being written%s; it will be read again", self._path, why)
        elif self.last_error is not None:  # the digest is the refused file's: that file is still there
            logger.warning("policy reload%s: %s is still refused, keeping version %s: %s",
                           why, self._path, self._current.version, self.last_error)
        else:
            logger.info("policy reload%s: %s unchanged, version %s", why, self._path, self._current.version)

    def _fail(self, error: PolicyError, digest: str, why: str = "") -> None:
        self.last_error = error
        self.reload_failures += 1
        logger.error("policy reload%s failed, keeping version %s: %s", why, self._current.version, error)
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
        target = os.path.realpath(path)
    except OSError:
        return None
    return _Stamp(target, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
