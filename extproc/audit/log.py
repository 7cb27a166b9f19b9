"""Append audit events to a hash-chained JSON Lines file (`extproc.audit.chain`), off the request path.

Like `extproc.records.sink.JsonlSink`: `append` stamps the event's time, encodes its fields and queues
it (no I/O; call it from the event loop's thread); a background task collects events for up to
`flush_interval` seconds, then chains, appends and fsyncs them in a worker thread. The queue is
bounded: an event that finds it full is dropped and counted, and when writing resumes an
``events_dropped`` event says how many were lost (and why: ``queue_full`` or ``write_failed``), so
a gap in the record is itself on the record. `aclose` writes what is queued.

One writer per file: the chain has one head, so two processes appending to one file would fork it.
The writer holds an exclusive `flock` on the file while open and refuses a file another writer holds:
give each processor replica its own audit log. When it opens an existing file it continues the chain
from the file's last line (`chain.read_tail`); a torn last line (a crash mid-write) is replaced by a
``torn_line_discarded`` event that keeps its length, SHA-256 and text. The head (seq and hash) is
logged when the writer opens and closes: shipped off the host, those lines anchor the log's end.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.audit.chain import GENESIS, ChainError, encode_fields, encode_line, read_tail, utc_now
from extproc.audit.events import EVENTS_DROPPED, TORN_LINE_DISCARDED, AuditEvent, bounded

log = logging.getLogger("tokenmeter.audit")

MAX_BATCH = 10_000
TORN_TEXT_MAX = 4096


class AuditLogError(Exception):
    """The audit log cannot be opened for writing (held by another writer, or not continuable)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    time: str
    type: str
    fields_json: bytes


class _ChainWriter:
    """The blocking part: the open file, the chain's head, one locked write (and fsync) per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0  # of the next line
        self.head = GENESIS
        self._fd: int | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        with self._lock:
            if self._fd is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise AuditLogError(
                        f"{self.path} is open by another audit writer (one writer per file: give each "
                        "processor its own audit log)"
                    ) from None
                try:
                    tail = read_tail(fd)
                except ChainError as exc:
                    raise AuditLogError(
                        f"{self.path}: {exc.reason}; not continuing it (run `tokenmeter audit verify "
                        f"{self.path}` and move the file aside)"
                    ) from None
                self.seq, self.head = tail.next_seq, tail.head_hash
                if not tail.last_line_matches:
                    log.warning("audit log %s: its last line does not match its hash (edited?); "
                                "`tokenmeter audit verify` will report it", self.path)
                if tail.torn:
                    self._replace_torn(fd, tail.good_size, tail.torn)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            log.info("audit log %s: %s at seq %d, head %s", self.path,
                     "continuing" if self.seq else "starting", self.seq, self.head)

    def _replace_torn(self, fd: int, good_size: int, torn: bytes) -> None:
        """Overwrite the torn last line by an event describing it, then cut what is left of it.

        The event is on disk before a byte of the torn line is removed: a crash in between leaves a
        shorter torn tail, described again by the next writer, never a silent loss.
        """
        pending = _Pending(utc_now(), TORN_LINE_DISCARDED, encode_fields({
            "bytes": len(torn),
            "sha256": hashlib.sha256(torn).hexdigest(),
            "text": bounded(torn.decode("utf-8", "replace"), TORN_TEXT_MAX),
            "after_seq": self.seq - 1 if self.seq else None,
        }))
        line, digest = encode_line(self.seq, pending.time, pending.type, pending.fields_json, self.head)
        data = line + b"\n"
        _pwrite_all(fd, data, good_size)
        os.ftruncate(fd, good_size + len(data))
        os.fsync(fd)
        log.warning("audit log %s: discarded a torn last line of %d bytes (recorded as seq %d)",
                    self.path, len(torn), self.seq)
        self.seq, self.head = self.seq + 1, digest

    def write(self, batch: Sequence[_Pending]) -> None:
        """Chain and append `batch` in one write, then fsync. On failure nothing of it stays."""
        if not batch:
            return
        with self._lock:
            fd = self._fd
            if fd is None:
                raise OSError(f"audit log {self.path} is not open")
            seq, head = self.seq, self.head
            lines = []
            for p in batch:
                line, head = encode_line(seq, p.time, p.type, p.fields_json, head)
                lines.append(line)
                seq += 1
            data = b"\n".join(lines) + b"\n"
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                try:  # a partial write would leave a torn line in the middle of the chain
                    os.ftruncate(fd, before)
                except OSError:
                    log.exception("audit log %s: cannot cut a failed write back", self.path)
                raise
            self.seq, self.head = seq, head

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the flock
            log.info("audit log %s: closed at seq %d, head %s", self.path, self.seq, self.head)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    # Linux ignores pwrite's offset on an O_APPEND descriptor: clear the flag for this write.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


class AuditLog:
    """The processor's audit log: `start()`, `append()`/`record()` from the loop, `aclose()` at the end.

    Without a running loop (the CLI, tests): `open()`, `append_now()`, `close()`.
    """

    def __init__(self, path: str | Path, *, max_queue: int = 10_000, flush_interval: float = 0.1) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self._writer = _ChainWriter(self.path)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self._gathering: list[_Pending] = []  # taken from the queue, not yet handed to a write
        self._inflight: asyncio.Future[None] | None = None
        # lost and not yet reported in an events_dropped event: reason -> [count, first time, last time]
        self._unreported: dict[str, list[Any]] = {}
        self.written = 0
        self.dropped = 0

    @property
    def head(self) -> tuple[int, str]:
        """(seq of the next line, hash of the last line written): the anchor to keep elsewhere."""
        return self._writer.seq, self._writer.head

    def open(self) -> None:
        """Open the file and continue its chain (blocking, quick: reads the last line only)."""
        self._writer.open()

    def start(self) -> None:
        self.open()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-log")

    def append(self, event_type: str, /, **fields: Any) -> None:
        """Queue an event (never blocks). A bad field (reserved name, not JSON) raises at once."""
        if not event_type:
            raise ValueError("an audit event needs a type")
        pending = _Pending(utc_now(), event_type, encode_fields(fields))
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self.dropped += 1
            self._lost("queue_full", 1, pending.time)
            log.error("audit queue full: %s event dropped", event_type)

    def record(self, event: AuditEvent) -> None:
        self.append(event.type, **event.fields)

    def append_now(self, event_type: str, /, **fields: Any) -> None:
        """Write one event synchronously (opens the file if needed). For the CLI and tests, not the loop."""
        if not event_type:
            raise ValueError("an audit event needs a type")
        batch = [_Pending(utc_now(), event_type, encode_fields(fields))]
        self.open()
        markers, taken = self._markers()
        try:
            self._writer.write(batch + markers)
        except OSError:
            self._restore(taken)
            raise
        self.written += 1

    def close(self) -> None:
        """Close the file (after `append_now`); events still queued stay unwritten: use `aclose`."""
        markers, _ = self._markers()
        if markers and self._writer.is_open:
            self._writer.write(markers)
        self._writer.close()

    async def _run(self) -> None:
        while True:
            self._gathering.append(await self._queue.get())
            await asyncio.sleep(self.flush_interval)  # let a batch gather
            while not self._queue.empty() and len(self._gathering) < MAX_BATCH:
                self._gathering.append(self._queue.get_nowait())
            batch, self._gathering = self._gathering, []
            self._inflight = asyncio.ensure_future(self._write(batch))
            # shielded: cancelled by aclose, the batch still completes (and is counted) before it returns
            await asyncio.shield(self._inflight)
            self._inflight = None

    async def _write(self, batch: list[_Pending]) -> None:
        markers, taken = self._markers()
        try:
            await asyncio.to_thread(self._writer.write, batch + markers)
        except Exception:  # OSError (disk full, I/O error); anything else is a bug, but is counted too
            log.exception("cannot write audit events to %s", self.path)
            self._restore(taken)
            if batch:
                self.dropped += len(batch)
                self._lost("write_failed", len(batch), batch[0].time, batch[-1].time)
            return
        self.written += len(batch)

    def _lost(self, reason: str, count: int, first: str, last: str | None = None) -> None:
        last = last or first
        entry = self._unreported.get(reason)
        if entry is None:
            self._unreported[reason] = [count, first, last]
        else:  # the times are ISO-8601 UTC of one format: they sort as text
            entry[0] += count
            entry[1], entry[2] = min(entry[1], first), max(entry[2], last)

    def _restore(self, taken: dict[str, list[Any]]) -> None:
        for reason, (count, first, last) in taken.items():
            self._lost(reason, count, first, last)

    def _markers(self) -> tuple[list[_Pending], dict[str, list[Any]]]:
        """events_dropped events for what was lost since the last report (and the counts they take)."""
        taken, self._unreported = self._unreported, {}
        now = utc_now()
        markers = [
            _Pending(now, EVENTS_DROPPED, encode_fields({"reason": reason, "count": count, "first": first,
                                                         "last": last}))
            for reason, (count, first, last) in taken.items()
        ]
        return markers, taken

    async def aclose(self) -> None:
        """Write everything queued (and any drop report), then close the file."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._inflight is not None:
            try:
                await self._inflight
            finally:
                self._inflight = None
        rest, self._gathering = self._gathering, []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        if (rest or self._unreported) and not self._writer.is_open:
            await asyncio.to_thread(self._writer.open)  # appended to, never started
        if rest or self._unreported:
            await self._write(rest)
        await asyncio.to_thread(self._writer.close)
