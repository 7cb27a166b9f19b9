"""Compare the ledger with a model server's own usage export: `tokenmeter usage reconcile`.

The server's file is JSON Lines, in one of two shapes (told apart by the first line; a file
mixing them is an error):

* per request: one line per request the server answered, naming the request by the
  ``x-tokenmeter-request-id`` header it received (``x_tokenmeter_request_id``, or
  ``request_id``), with ``prompt_tokens`` and ``completion_tokens`` (or ``input_tokens`` and
  ``output_tokens``). Other keys are ignored; a line may carry the server's own ``id`` (shown when
  the line names no request id of ours). This is the served log of the fake model server
  (extproc/fakes/model_server.py ``--served-log``): ``{"id", "x_tokenmeter_request_id", "tenant",
  "path", "stream", "status", "prompt_tokens", "completion_tokens", "completed",
  "usage_reported"}``.
* per period: totals per hour, tenant and model: ``{"period_start": "2026-11-27T10:00:00Z",
  "tenant": "acme", "model": "llama-3.1-8b", "prompt_tokens": 1200, "completion_tokens": 800}``
  (``period_start`` RFC 3339 or unix seconds, at the start of a UTC hour; the model as the server
  names it; ``requests`` optional and not compared). One line per key; lines for the same key
  add up.

The ledger's side is every request that reached a model server: admitted (admitted, alert,
shadow) and not aborted, in the time range, on `pool` when one is given; tokens are the record's
prompt and completion tokens; the model the served one (else the requested one); a request counts
in the hour it was admitted.

Every disagreement is listed:
  * ``missing``: the ledger has it, the server's file does not;
  * ``extra``: the server's file has it, the ledger does not (or records it refused, aborted or on
    another pool); a per-request line without a request id of ours is always extra;
  * ``different``: both have it with different prompt or completion counts (a ledger estimate,
    a response cut after the server counted it, a retry that reached the server twice).
Server lines about requests the ledger has outside the time range are left out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extproc.records.ledger import LedgerError, TimeRange, iso_utc, parse_time
from extproc.records.record import UsageRecord
from extproc.records.report import text_table
from extproc.settlement.outcome import Ending

__all__ = [
    "Disagreement",
    "Reconciliation",
    "ServerUsage",
    "format_reconciliation",
    "read_server_usage",
    "reconcile",
]

HOUR = 3600


@dataclass(frozen=True, slots=True)
class Disagreement:
    kind: str  # missing | extra | different
    key: str  # the request id, or "period tenant model"
    ledger_prompt: int | None
    ledger_completion: int | None
    server_prompt: int | None
    server_completion: int | None
    note: str = ""


@dataclass
class _Counts:
    prompt: int = 0
    completion: int = 0
    entries: int = 0
    lines: list[int] = field(default_factory=list)

    def add(self, prompt: int, completion: int, line: int) -> None:
        self.prompt += prompt
        self.completion += completion
        self.entries += 1
        self.lines.append(line)


@dataclass
class ServerUsage:
    """A server's usage file: per request (by our request id) or per period."""

    per_period: bool
    by_request: dict[str, _Counts] = field(default_factory=dict)
    unnamed: list[tuple[int, str, int, int]] = field(default_factory=list)  # (line, server id, prompt, completion)
    by_period: dict[tuple[float, str, str], _Counts] = field(default_factory=dict)


@dataclass
class Reconciliation:
    per_period: bool
    compared: int  # requests (or periods) both sides have
    disagreements: list[Disagreement]

    def summary(self) -> str:
        what = "periods" if self.per_period else "requests"
        kinds = {k: sum(d.kind == k for d in self.disagreements) for k in ("missing", "extra", "different")}
        agreed = self.compared - kinds["different"]
        return (f"{agreed} {what} agree; {len(self.disagreements)} disagreements "
                f"(missing {kinds['missing']}, extra {kinds['extra']}, different {kinds['different']})")


def _count(obj: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = obj.get(name)
        if value is not None:
            if type(value) is int and value >= 0:
                return value
            return None
    return None


def read_server_usage(path: str | Path) -> ServerUsage:
    """Read a server usage file; LedgerError (file:line: reason) on a line it cannot use."""
    file = str(path)
    usage: ServerUsage | None = None
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise LedgerError(file, number, f"not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise LedgerError(file, number, "each line must be a JSON object")
            period = "period_start" in obj
            if usage is None:
                usage = ServerUsage(per_period=period)
            elif usage.per_period != period:
                raise LedgerError(file, number, "per-period and per-request lines are mixed in one file")
            prompt = _count(obj, "prompt_tokens", "input_tokens")
            completion = _count(obj, "completion_tokens", "output_tokens")
            if prompt is None or completion is None:
                raise LedgerError(file, number, "prompt_tokens and completion_tokens must be non-negative integers")
            if period:
                _period_line(usage, obj, prompt, completion, file, number)
            else:
                rid = obj.get("x_tokenmeter_request_id") or obj.get("request_id")
                if isinstance(rid, str) and rid:
                    usage.by_request.setdefault(rid, _Counts()).add(prompt, completion, number)
                else:
                    server_id = obj.get("id")
                    usage.unnamed.append((number, str(server_id) if server_id else "", prompt, completion))
    return usage if usage is not None else ServerUsage(per_period=False)


def _period_line(usage: ServerUsage, obj: dict[str, Any], prompt: int, completion: int, file: str,
                 number: int) -> None:
    start = obj["period_start"]
    try:
        t = float(start) if isinstance(start, int | float) and not isinstance(start, bool) else parse_time(str(start))
    except ValueError as exc:
        raise LedgerError(file, number, f"period_start: {exc}") from None
    if t % HOUR:
        raise LedgerError(file, number, f"period_start {start!r} is not the start of a UTC hour")
    tenant, model = obj.get("tenant"), obj.get("model")
    if not isinstance(tenant, str) or not isinstance(model, str):
        raise LedgerError(file, number, "a per-period line needs tenant and model strings")
    usage.by_period.setdefault((t, tenant, model), _Counts()).add(prompt, completion, number)


def reached_server(rec: UsageRecord) -> bool:
    return rec.decision.admitted and rec.ending is not Ending.ABORTED


def reconcile(
    ledger: Sequence[UsageRecord], server: ServerUsage, *, span: TimeRange | None = None, pool: str | None = None
) -> Reconciliation:
    """`ledger`: every record of the ledger, folded (not only those in `span`: a server line about a
    request the ledger has outside the range is left out rather than called extra)."""
    span = span or TimeRange()
    if server.per_period:
        return _by_period(ledger, server, span, pool)
    return _by_request(ledger, server, span, pool)


def _model(rec: UsageRecord) -> str:
    return rec.response_model or rec.model or ""


def _by_request(ledger: Sequence[UsageRecord], server: ServerUsage, span: TimeRange,
                pool: str | None) -> Reconciliation:
    by_id = {r.request_id: r for r in ledger}
    out: list[Disagreement] = []
    compared = 0
    for rec in ledger:
        if rec.time not in span or not reached_server(rec) or (pool is not None and rec.pool != pool):
            continue
        seen = server.by_request.get(rec.request_id)
        if seen is None:
            out.append(Disagreement("missing", rec.request_id, rec.prompt_tokens, rec.completion_tokens, None, None,
                                    _ledger_note(rec)))
            continue
        compared += 1
        if (seen.prompt, seen.completion) != (rec.prompt_tokens, rec.completion_tokens) or seen.entries > 1:
            notes = [_ledger_note(rec)] if rec.usage_source == "estimated" or rec.ending is not Ending.COMPLETED else []
            if seen.entries > 1:
                notes.append(f"{seen.entries} server lines ({', '.join(map(str, seen.lines))})")
            out.append(Disagreement("different", rec.request_id, rec.prompt_tokens, rec.completion_tokens,
                                    seen.prompt, seen.completion, "; ".join(n for n in notes if n)))
    for rid, seen in server.by_request.items():
        known = by_id.get(rid)
        if known is not None and known.time not in span:
            continue
        if known is not None and reached_server(known) and (pool is None or known.pool == pool):
            continue  # compared above
        if known is None:
            note = "not in the ledger"
        elif not reached_server(known):
            note = f"the ledger records it {known.decision}/{known.ending}"
        else:
            note = f"the ledger records it on pool {known.pool or '(none)'}"
        out.append(Disagreement("extra", rid, None, None, seen.prompt, seen.completion,
                                f"{note} (line {seen.lines[0]})"))
    for line, server_id, prompt, completion in server.unnamed:
        out.append(Disagreement("extra", server_id or f"line {line}", None, None, prompt, completion,
                                f"names no request id of the gateway (line {line})"))
    return Reconciliation(False, compared, out)


def _ledger_note(rec: UsageRecord) -> str:
    parts = []
    if rec.usage_source == "estimated":
        parts.append("ledger estimated")
    if rec.ending is not Ending.COMPLETED:
        parts.append(f"ended {rec.ending}")
    if rec.status is not None and rec.status >= 400:
        parts.append(f"status {rec.status}")
    return ", ".join(parts)


def _by_period(ledger: Sequence[UsageRecord], server: ServerUsage, span: TimeRange,
               pool: str | None) -> Reconciliation:
    ours: dict[tuple[float, str, str], _Counts] = {}
    for rec in ledger:
        if rec.time not in span or not reached_server(rec) or (pool is not None and rec.pool != pool):
            continue
        key = (float(int(rec.time // HOUR) * HOUR), rec.tenant or "", _model(rec))
        ours.setdefault(key, _Counts()).add(rec.prompt_tokens, rec.completion_tokens, 0)
    theirs = {k: v for k, v in server.by_period.items() if k[0] in span}
    out: list[Disagreement] = []
    compared = 0
    for key in sorted(set(ours) | set(theirs)):
        name = f"{iso_utc(key[0])} {key[1] or '(none)'} {key[2] or '(none)'}"
        a, b = ours.get(key), theirs.get(key)
        if b is None:
            assert a is not None
            out.append(Disagreement("missing", name, a.prompt, a.completion, None, None, f"{a.entries} requests"))
        elif a is None:
            out.append(Disagreement("extra", name, None, None, b.prompt, b.completion, f"line {b.lines[0]}"))
        else:
            compared += 1
            if (a.prompt, a.completion) != (b.prompt, b.completion):
                out.append(Disagreement("different", name, a.prompt, a.completion, b.prompt, b.completion,
                                        f"{a.entries} requests in the ledger"))
    return Reconciliation(True, compared, out)


_COLUMNS = ("kind", "key", "ledger_prompt", "ledger_completion", "server_prompt", "server_completion", "note")


def _cells(d: Disagreement) -> list[str]:
    return [d.kind, d.key, *("" if v is None else str(v) for v in (d.ledger_prompt, d.ledger_completion,
                                                                   d.server_prompt, d.server_completion)), d.note]


def format_reconciliation(result: Reconciliation, fmt: str) -> str:
    if fmt == "json":
        doc = {
            "per_period": result.per_period,
            "compared": result.compared,
            "disagreements": [dict(zip(_COLUMNS, (d.kind, d.key, d.ledger_prompt, d.ledger_completion,
                                                  d.server_prompt, d.server_completion, d.note), strict=True))
                              for d in result.disagreements],
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_COLUMNS)
        writer.writerows(_cells(d) for d in result.disagreements)
        return buf.getvalue().rstrip("\n")
    lines = [result.summary()]
    if result.disagreements:
        header = ("kind", "request" if not result.per_period else "period tenant model", "ledger prompt",
                  "ledger completion", "server prompt", "server completion", "note")
        lines.append(text_table(header, [_cells(d) for d in result.disagreements],
                            right=[False, False, True, True, True, True, False]))
    return "\n".join(lines)
