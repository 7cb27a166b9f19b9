"""The audit log's line format and its verification: JSON Lines, hash-chained.

One event per line, written by `extproc.audit.log.AuditLog`::

    {"seq":0,"time":"2026-11-27T10:00:00.000000Z","type":"policy_loaded",...,"prev":"<64 hex>","hash":"<64 hex>"}

* ``seq``: 0 for the first line of the file, then +1 per line, no gaps.
* ``time``: when the event happened, UTC, ISO-8601 with microseconds and a ``Z``.
* ``type``: what happened (``extproc.audit.events`` builds the events); the event's own fields follow.
* ``prev``: the ``hash`` of the line before; for ``seq`` 0, ``GENESIS`` (a fixed value).
* ``hash``: the SHA-256 (hex) of this line's exact bytes *without* its ``,"hash":"..."`` member, i.e. of
  ``{"seq":...,"prev":"..."}``. It is always the last member, so anyone can check a line with standard
  tools: ``sed 's/,"hash":"[0-9a-f]*"}$/}/' | tr -d '\\n' | sha256sum``.

Why each line carries its own hash, and not only ``prev``: with only ``prev``, the last line's content is
covered by nothing (an edit of it could never be detected), and an edited line is only noticed on the
line *after* it, so "the first broken link" would point one line too far. With ``hash``, an edited line
fails its own check and is named; a line that was edited *and* given a recomputed hash is caught by the
next line's ``prev``; since ``hash`` covers ``prev`` and ``prev`` is the previous line's ``hash``,
each line commits to every byte of every line before it.

What `verify` detects, without anything outside the file:

* an edited byte anywhere (the line's own hash, or, if that was recomputed, the next line's ``prev``);
* an inserted line (a copied or invented line breaks ``seq`` or ``prev`` where it stands, or, if it is
  consistent with the lines before it, at the line after it), an empty line, a reordering;
* a deleted line anywhere but at the end: the first line (``seq`` 0 missing), any middle line
  (``seq`` gap, ``prev`` mismatch);
* a torn (incomplete) last line: the crash of a writer mid-line, or a truncation inside a line.

What it cannot detect from the file alone:

* whole lines deleted *from the end* (or the file emptied): what remains is a valid, shorter chain;
* a rewrite of the log from some line to its end with every hash recomputed (SHA-256 is public; there
  is no secret in the chain).

Both need an anchor kept outside the attacker's reach: `verify` reports the head (the last line's hash
and the count of events); `tokenmeter audit verify FILE` prints it, the writer logs it when it starts and
stops, and `verify(path, anchor=HASH)` fails unless the anchored line is still in the chain (so the
log still contains, unchanged, everything up to the moment the anchor was taken). Record the head
somewhere else (a ticket, a syslog host, a printout) to turn "cannot detect" into "detected".

A restarted writer continues the chain from the last line of the existing file (`read_tail`). A torn
last line (a crash mid-write) is not chained over silently: the writer replaces it by a
``torn_line_discarded`` event that keeps its bytes' length, SHA-256 and text, so the chain stays valid
and the loss is itself on the record. A last line that is complete but not an audit record is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# prev of the first line: the SHA-256 of a fixed text that names the format
GENESIS = hashlib.sha256(b"tokenmeter audit log v1").hexdigest()
# members every line has, written by the log itself: events may not use these names
RESERVED = frozenset({"seq", "time", "type", "prev", "hash"})

_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}\Z')
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_BLOCK = 64 * 1024


class ChainError(Exception):
    """A line that does not continue the chain; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int  # events verified (all of them when ok, those before the break otherwise)
    head_hash: str  # hash of the last verified line (GENESIS for an empty log)
    first_broken_line: int | None = None  # 1-based line number of the first broken link
    reason: str | None = None


@dataclass(frozen=True)
class Tail:
    """Where a writer continues an existing log."""

    next_seq: int
    head_hash: str
    good_size: int  # bytes up to and including the last newline
    torn: bytes = b""  # bytes after the last newline: a torn (incomplete) last line
    last_line_matches: bool = True  # whether the last complete line's content matches its hash


def utc_now() -> str:
    """The current time as the log writes it: UTC, microseconds, 'Z'."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_fields(fields: Mapping[str, Any]) -> bytes:
    """An event's own fields as a JSON object (raises ValueError/TypeError for unusable ones)."""
    clash = RESERVED.intersection(fields)
    if clash:
        raise ValueError(f"audit event fields may not be named {', '.join(sorted(clash))}")
    return orjson.dumps(dict(fields))


def encode_line(seq: int, time: str, event_type: str, fields_json: bytes, prev: str) -> tuple[bytes, str]:
    """One line (without its newline) and its hash. `fields_json` is `encode_fields`' output."""
    if not event_type:
        raise ValueError("an audit event needs a type")
    parts = [b'{"seq":', str(seq).encode(), b',"time":', orjson.dumps(time), b',"type":', orjson.dumps(event_type)]
    inner = fields_json.strip()[1:-1]
    if inner:
        parts += [b",", inner]
    parts += [b',"prev":"', prev.encode("ascii"), b'"}']
    unhashed = b"".join(parts)
    digest = hashlib.sha256(unhashed).hexdigest()
    return unhashed[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}', digest


def check_line(raw: bytes, expected_seq: int, expected_prev: str) -> tuple[dict[str, Any], str]:
    """Check one line (without its newline) as the successor of the chain so far.

    Returns the parsed event and its hash, or raises ChainError naming what is wrong.
    """
    if not raw.strip():
        return _fail("empty line: a line was inserted here, or a record was cut")
    suffix = _HASH_SUFFIX.search(raw)
    if suffix is None:
        return _fail('not an audit record: it does not end with a "hash" member (edited, or foreign text)')
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _fail("not valid JSON: the line was edited or cut")
    if not isinstance(event, dict):
        return _fail("not a JSON object")
    claimed = suffix.group(1).decode("ascii")
    if hashlib.sha256(raw[: suffix.start()] + b"}").hexdigest() != claimed:
        return _fail("content does not match its hash: the line was edited")
    seq = event.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return _fail("seq is missing or not an integer")
    if seq > expected_seq:
        missing = seq - expected_seq
        return _fail(
            f"seq is {seq}, expected {expected_seq}: {missing} line{'s' if missing > 1 else ''} "
            "deleted before this one"
        )
    if seq < expected_seq:
        return _fail(f"seq is {seq}, expected {expected_seq}: a line was inserted, repeated or moved here")
    prev = event.get("prev")
    if prev != expected_prev:
        if expected_seq == 0:
            return _fail("prev is not the genesis value: this is not the first line of a chain")
        return _fail(
            "prev does not match the hash of the line before: that line was rewritten, "
            "or lines before this one were replaced"
        )
    time = event.get("time")
    if not isinstance(time, str) or not _is_timestamp(time):
        return _fail("time is missing or not an ISO-8601 timestamp")
    if not isinstance(event.get("type"), str) or not event["type"]:
        return _fail("type is missing or empty")
    return event, claimed


def verify(path: str | Path, anchor: str | None = None) -> VerifyResult:
    """Check the chain of the log at `path` from its first line to its last.

    `anchor`: a head hash recorded earlier (elsewhere); the log must still contain that line.
    Raises OSError when the file cannot be read.
    """
    seq, head, number = 0, GENESIS, 0
    seen_anchor = anchor is None or anchor == GENESIS
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return VerifyResult(
                    False, seq, head, number,
                    "incomplete last line (no newline at its end): a write cut short by a crash, or a "
                    "truncated file; a restarted writer records and discards it",
                )
            try:
                _, head = check_line(raw[:-1], seq, head)
            except ChainError as exc:
                return VerifyResult(False, seq, head, number, exc.reason)
            seq += 1
            if not seen_anchor and head == anchor:
                seen_anchor = True
    if not seen_anchor:
        return VerifyResult(
            False, seq, head, number + 1,
            f"anchor {anchor} is not in the log: lines were deleted from its end, or it was rewritten",
        )
    return VerifyResult(True, seq, head)


def read_events(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, event) for every line, without checking the chain; None for an unreadable line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                event = None
            yield number, event if isinstance(event, dict) else None


def read_tail(fd: int) -> Tail:
    """Where a writer continues the log open at `fd` (readable): the last complete line's seq and hash.

    Reads backwards from the end, so it costs one block or so however long the log is. Raises
    ChainError when the last complete line is not an audit record (the writer must not chain to it).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return Tail(0, GENESIS, 0)
    end = size  # the good part ends at the last newline
    torn = b""
    last_byte = os.pread(fd, 1, size - 1)
    if last_byte != b"\n":
        newline = _rfind_newline(fd, size)
        end = newline + 1  # 0 when there is no newline at all
        torn = os.pread(fd, size - end, end)
    if end == 0:
        return Tail(0, GENESIS, 0, torn)
    start = _rfind_newline(fd, end - 1) + 1
    raw = os.pread(fd, end - 1 - start, start)
    suffix = _HASH_SUFFIX.search(raw)
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        event = None
    seq = event.get("seq") if isinstance(event, dict) else None
    if suffix is None or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ChainError("the last complete line is not an audit record")
    claimed = suffix.group(1).decode("ascii")
    matches = hashlib.sha256(raw[: suffix.start()] + b"}").hexdigest() == claimed
    return Tail(seq + 1, claimed, end, torn, matches)


def is_hash(text: str) -> bool:
    return _HEX64.fullmatch(text) is not None


def _fail(reason: str) -> tuple[dict[str, Any], str]:
    raise ChainError(reason)


def _is_timestamp(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _rfind_newline(fd: int, before: int) -> int:
    """Offset of the last newline before offset `before`, or -1."""
    pos = before
    while pos > 0:
        start = max(0, pos - _TAIL_BLOCK)
        block = os.pread(fd, pos - start, start)
        found = block.rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1
