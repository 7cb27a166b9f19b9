"""Recovery of the ledger from Envoy's own access log: `tokenmeter ledger recover`.

Where the truth lives: every request ends in two places, both written by Envoy. Its gRPC access log
brings the end to a processor, which settles Redis and appends the usage record to its ledger at
once (the fast path, never on the request path). Its JSON access log file has the same facts for
every request (the sealed admission facts, its usage counts, how the response ended) and is written
whatever happens to the processors. A processor killed with -9 loses what was in flight on it: the
entries Envoy had not delivered and the records not yet flushed (at most one flush interval, 100 ms);
a processor stopped for good leaves the requests that outlived its grace. Recovery reads Envoy's file
and ends every request the ledger lacks through the same function as the live path
(extproc.settlement.request_end), so a recovered record is the record it would have been. It is
idempotent (by request id): run it after any crash, or as a periodic job.

With `--redis`, what a recovered request used is also settled in Redis (a reservation already
settled is not touched again: the limiter's settle is idempotent per request).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extproc.limiter.types import Limiter
from extproc.policy.model import Policy
from extproc.records.record import UsageRecord
from extproc.service.inflight import Inflight
from extproc.service.seal import Seal
from extproc.service.telemetry import Telemetry
from extproc.settlement.admitted import Admitted
from extproc.settlement.request_end import RequestEnd, end_request
from extproc.settlement.settle import Settlement


@dataclass
class RecoverResult:
    lines: int = 0  # Envoy access log lines read
    recovered: int = 0  # records appended to the ledger
    present: int = 0  # already in the ledger
    unreadable: int = 0  # lines that are not JSON (e.g. a torn last line)


class _ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def emit(self, record: UsageRecord) -> None:
        self.records.append(record)


class _NoLimiter:
    """Nothing to settle: the ledger is recovered, Redis is left as it is."""

    async def reserve(self, r: Any) -> Any:  # pragma: no cover - never called here
        raise NotImplementedError

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@dataclass
class _RecoveryContext:
    policy: Policy
    settlement: Settlement
    seal: Seal | None
    telemetry: Telemetry
    inflight: Inflight[Admitted] = field(default_factory=Inflight)
    by_envoy_id: Inflight[str] = field(default_factory=Inflight)


def ledger_ids(path: Path) -> set[str]:
    """Request ids already in the ledger (a torn last line, left by a crash, is skipped)."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    for line in _lines(path):
        try:
            rid = orjson.loads(line).get("request_id")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(rid, str):
            ids.add(rid)
    return ids


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line


def _request_id(end: RequestEnd) -> str:
    if end.admission is not None:
        rid = end.admission.fields.get("request_id")
        if rid is not None and rid.string_value:
            return rid.string_value
    return f"envoy:{end.envoy_request_id}"


def recover(
    envoy_logs: Iterable[Path],
    ledger: Path,
    *,
    policy: Policy,
    seal: Seal | None = None,
    limiter: Limiter | None = None,
) -> RecoverResult:
    """Append to `ledger` a record for every request in `envoy_logs` it lacks; see the module doc."""
    result = RecoverResult()
    known = ledger_ids(ledger)
    sink = _ListSink()
    settlement = Settlement(limiter or _NoLimiter(), sink, Telemetry(), prices=lambda: policy.prices,
                            replica="ledger-recover")
    ctx = _RecoveryContext(policy, settlement, seal, Telemetry())
    for path in envoy_logs:
        for raw in _lines(path):
            result.lines += 1
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                result.unreadable += 1
                continue
            if not isinstance(line, dict):
                result.unreadable += 1
                continue
            end = RequestEnd.from_log_line(line)
            rid = _request_id(end)
            if rid in known:
                result.present += 1
                continue
            known.add(rid)
            end_request(ctx, end, recovering=True)
    if sink.records:
        _append(ledger, sink.records)
    result.recovered = len(sink.records)
    return result


def _append(ledger: Path, records: list[UsageRecord]) -> None:
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "ab") as f:
        if f.tell() > 0 and not _ends_with_newline(ledger):
            f.write(b"\n")  # after a torn last line: keep every record on a line of its own
        f.write(b"".join(rec.to_json() + b"\n" for rec in records))
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


async def recover_with_redis(
    envoy_logs: Iterable[Path], ledger: Path, *, policy: Policy, seal: Seal | None, redis_url: str
) -> RecoverResult:
    from extproc.limiter import limiter_from_url

    limiter = limiter_from_url(redis_url, deadline_ms=1000)
    try:
        result = recover(envoy_logs, ledger, policy=policy, seal=seal, limiter=limiter)
        await limiter.flush()
        return result
    finally:
        await limiter.aclose()


def run(args: Any) -> int:
    """`tokenmeter ledger recover` (extproc.cli)."""
    import sys

    from extproc.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    seal = Seal.from_file(args.settle_secret_file) if args.settle_secret_file else None
    logs = [Path(p) for p in args.envoy_log]
    missing = [str(p) for p in logs if not p.exists()]
    if missing:
        print(f"tokenmeter ledger recover: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    ledger = Path(args.usage_log)
    if args.redis:
        result = asyncio.run(recover_with_redis(logs, ledger, policy=policy, seal=seal, redis_url=args.redis))
    else:
        result = recover(logs, ledger, policy=policy, seal=seal)
    print(f"{ledger}: {result.recovered} records recovered from {result.lines} Envoy access log lines "
          f"({result.present} already in the ledger, {result.unreadable} unreadable)")
    return 0
