"""Append usage records to a JSON Lines file, off the request path.

Records are queued in memory and written by a background task in batches: it collects records
for up to `flush_interval` seconds, then appends and fsyncs them in a worker thread, so the event
loop never blocks on disk and the thread hop and fsync happen a few times a second, not per
request. A crash loses at most the last interval of records (the limiter state is in Redis either
way). On shutdown the queue is drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from extproc.records.record import UsageRecord

log = logging.getLogger("tokenmeter.records")


class JsonlSink:
    def __init__(self, path: str | Path, *, max_queue: int = 100_000, flush_interval: float = 0.1) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self._gathering: list[UsageRecord] = []  # taken from the queue, not yet handed to a write
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-sink")

    def emit(self, record: UsageRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("usage queue full: record %s dropped", record.request_id)

    async def _run(self) -> None:
        while True:
            self._gathering.append(await self._queue.get())
            await asyncio.sleep(self.flush_interval)  # let a batch gather
            while not self._queue.empty() and len(self._gathering) < 10_000:
                self._gathering.append(self._queue.get_nowait())
            batch, self._gathering = self._gathering, []
            await self._write(batch)

    async def _write(self, batch: list[UsageRecord]) -> None:
        data = b"".join(r.to_json() + b"\n" for r in batch)
        try:
            await asyncio.to_thread(self._append, data)
            self.written += len(batch)
        except OSError:
            log.exception("cannot write usage records to %s", self.path)
            self.dropped += len(batch)

    def _append(self, data: bytes) -> None:
        # One O_APPEND write per batch: several processor processes can share one file without
        # interleaving lines (the kernel appends each write whole at the end of a regular file).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        rest, self._gathering = self._gathering, []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        if rest:
            await self._write(rest)


def read_records(path: str | Path) -> list[UsageRecord]:
    """The records of a usage log, folded by request id (the last line wins): the ledger reader,
    extproc.records.ledger.read_ledger."""
    from extproc.records.ledger import read_ledger

    return read_ledger(path).records
