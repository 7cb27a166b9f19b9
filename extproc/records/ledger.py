"""The ledger: the usage records of one or more JSON Lines files, read through one reader.

`read_ledger` folds the records by request id: when a request id appears on more than one line
(a record written by a drain and again by crash recovery, a replayed file, two files given that
overlap), the LAST line read wins, in the order the files are given and their lines within each
file; the request keeps the place of its first line. Every report, export and reconciliation
reads the ledger this way, so they all count each request once and agree with each other.

A line that is not a usage record is an error naming the file and line (`LedgerError`), except
a last line without its newline that does not parse: a write torn by a crash, skipped and
reported in `Ledger.torn`.

Times (`--from`, `--to`) select records by their `time` (when the request was admitted or
refused), from included to excluded: [from, to).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from extproc.records.record import UsageRecord

__all__ = ["Ledger", "LedgerError", "TimeRange", "iso_utc", "parse_time", "read_ledger"]


class LedgerError(Exception):
    """A ledger that cannot be read: `file:line: reason`."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        super().__init__(file, line, reason)
        self.file, self.line, self.reason = file, line, reason

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line is not None else f"{self.file}: {self.reason}"


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start, end) in unix seconds; None: unbounded."""

    start: float | None = None
    end: float | None = None

    def __contains__(self, t: float) -> bool:
        return (self.start is None or t >= self.start) and (self.end is None or t < self.end)


@dataclass
class Ledger:
    records: list[UsageRecord]  # folded by request id, in [from, to)
    lines: int = 0  # record lines read (before folding and the time range)
    replaced: int = 0  # lines that an earlier line of the same request id gave way to
    torn: list[str] = field(default_factory=list)  # "file:line" of skipped torn last lines


def read_ledger(paths: str | Path | Sequence[str | Path], span: TimeRange | None = None) -> Ledger:
    """The records of `paths`, folded by request id (the last line wins), then those in `span`.
    Raises OSError when a file cannot be read, LedgerError on a line that is not a record."""
    if isinstance(paths, str | Path):
        paths = [paths]
    folded: dict[str, UsageRecord] = {}
    ledger = Ledger([])
    for path in paths:
        for rec in _read_file(Path(path), ledger):
            ledger.lines += 1
            if rec.request_id in folded:
                ledger.replaced += 1
            folded[rec.request_id] = rec
    span = span or TimeRange()
    ledger.records = [r for r in folded.values() if r.time in span]
    return ledger


def _read_file(path: Path, ledger: Ledger) -> Iterator[UsageRecord]:
    with path.open("rb") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield UsageRecord.from_json(line)
        except (ValueError, TypeError, KeyError) as exc:
            if number == len(lines) and not line.endswith(b"\n"):
                ledger.torn.append(f"{path}:{number}")
                continue
            raise LedgerError(str(path), number, f"not a usage record: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_time(text: str) -> float:
    """A time given on the command line, as unix seconds: ISO 8601 ("2026-11-27T10:00:00Z",
    "2026-11-27T10:00+01:00", "2026-11-27": midnight), UTC unless it names an offset; or unix
    seconds ("1767225600"). ValueError otherwise."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"not a time: {text!r}")
        return seconds
    try:
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-27T10:00:00Z, or unix seconds)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso_utc(t: float) -> str:
    """RFC 3339 in UTC with a Z, to the microsecond when there is a fraction: 2026-11-27T10:00:00.5Z."""
    when = datetime.fromtimestamp(t, UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return text + "Z"
