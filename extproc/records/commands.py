"""`tokenmeter usage ...`: reports, exports and reconciliation of the ledger (the JSON Lines usage
log `tokenmeter serve --usage-log` writes).

    tokenmeter usage report [--by tenant,project,team,key,model,pool] [--from T] [--to T]
                            [--format table|csv|json] [--policy FILE] [--usage-log PATH ...]
    tokenmeter usage export --format csv|cloudevents|jsonl [--from T] [--to T] [--output FILE]
                            [--source S] [--type T] [--subject tenant|project|team|key] [--usage-log PATH ...]
    tokenmeter usage reconcile --server-usage FILE [--pool P] [--from T] [--to T]
                               [--format table|csv|json] [--usage-log PATH ...]

Every command reads the ledger through extproc.records.ledger (folded by request id: the last line
of a request wins; several --usage-log files are read in order as one ledger). Times are ISO 8601
(UTC unless an offset is given) or unix seconds, and select records by admission time in [from, to).
Exit status: 0; 2 when the ledger (or a file given) cannot be read; reconcile 1 when it found any
disagreement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from extproc.policy.model import Policy
    from extproc.records.ledger import Ledger, TimeRange

__all__ = ["add_usage_parser", "warn_unpriced"]

DEFAULT_USAGE_LOG = "var/usage.jsonl"


def warn_unpriced(file: str, policy: Policy) -> None:
    """`tokenmeter policy check`: warn (stderr) about models whose records would carry no cost."""
    from extproc.billing import price_warnings

    for warning in price_warnings(policy):
        print(f"{file}: warning: {warning}", file=sys.stderr)


def _time(text: str) -> float:
    from extproc.records.ledger import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _span(args: argparse.Namespace) -> TimeRange:
    from extproc.records.ledger import TimeRange

    return TimeRange(args.start, args.end)


def _ledger(args: argparse.Namespace, *, span: bool = True) -> Ledger | None:
    """The ledger of --usage-log, or None after printing why it cannot be read."""
    from extproc.records.ledger import LedgerError, read_ledger

    paths = args.usage_log or [DEFAULT_USAGE_LOG]
    try:
        ledger = read_ledger(paths, _span(args) if span else None)
    except OSError as exc:
        print(f"tokenmeter: cannot read {exc.filename or paths[0]}: {exc.strerror or exc}", file=sys.stderr)
        return None
    except LedgerError as exc:
        print(f"tokenmeter: {exc}", file=sys.stderr)
        return None
    for where in ledger.torn:
        print(f"tokenmeter: {where}: warning: skipped a torn last line (a write cut by a crash)", file=sys.stderr)
    return ledger


def _report(args: argparse.Namespace) -> int:
    from extproc.records.report import actions_of, format_report, parse_dimensions, usage_report

    try:
        by = parse_dimensions(args.by)
    except ValueError as exc:
        print(f"tokenmeter: --by: {exc}", file=sys.stderr)
        return 2
    actions = None
    if args.policy:
        from extproc.policy import PolicyError, load_policy

        try:
            actions = actions_of(load_policy(args.policy))
        except PolicyError as exc:
            print(f"tokenmeter: {exc}", file=sys.stderr)
            return 2
    ledger = _ledger(args)
    if ledger is None:
        return 2
    print(format_report(usage_report(ledger.records, by, actions=actions), args.format))
    return 0


def _export(args: argparse.Namespace) -> int:
    from collections.abc import Iterator

    from extproc.records.export import Totals, export_cloudevents, export_csv, export_jsonl, ledger_totals

    ledger = _ledger(args)
    if ledger is None:
        return 2
    exported = Totals()
    chunks: Iterator[bytes]
    if args.format == "jsonl":
        chunks = export_jsonl(ledger.records)
        exported = ledger_totals(ledger.records)
    elif args.format == "csv":
        chunks = (line.encode() for line in export_csv(ledger.records, exported))
    else:
        chunks = export_cloudevents(ledger.records, exported, source=args.source, type_=args.type,
                                    subject=args.subject)
    try:
        if args.output:
            with Path(args.output).open("wb") as f:
                _write(f, chunks)
        else:
            _write(sys.stdout.buffer, chunks)
            sys.stdout.buffer.flush()
    except OSError as exc:
        print(f"tokenmeter: cannot write {args.output or 'stdout'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    ledger_total = ledger_totals(ledger.records)
    if (exported.tokens, exported.cost()) != (ledger_total.tokens, ledger_total.cost()):  # never: a bug
        print(f"tokenmeter: export totals differ from the ledger's: {exported.describe()} != "
              f"{ledger_total.describe()}", file=sys.stderr)
        return 3
    print(f"tokenmeter: exported {args.format}: {exported.describe()} (ledger: {len(ledger.records)} records)",
          file=sys.stderr)
    return 0


def _write(out: BinaryIO, chunks: Any) -> None:
    for chunk in chunks:
        out.write(chunk)


def _reconcile(args: argparse.Namespace) -> int:
    from extproc.records.ledger import LedgerError
    from extproc.records.reconcile import format_reconciliation, read_server_usage, reconcile

    try:
        server = read_server_usage(args.server_usage)
    except OSError as exc:
        print(f"tokenmeter: cannot read {args.server_usage}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:
        print(f"tokenmeter: {exc}", file=sys.stderr)
        return 2
    ledger = _ledger(args, span=False)  # all of it: server lines about requests outside the range are left out
    if ledger is None:
        return 2
    result = reconcile(ledger.records, server, span=_span(args), pool=args.pool)
    print(format_reconciliation(result, args.format))
    if args.format != "table":
        print(f"tokenmeter: {result.summary()}", file=sys.stderr)
    return 1 if result.disagreements else 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--usage-log", action="append", metavar="PATH",
                   help=f"the ledger: a JSON Lines usage log (default {DEFAULT_USAGE_LOG}); repeat to read several "
                   "as one (a request id on several lines: the last line read wins)")
    p.add_argument("--from", dest="start", type=_time, default=None, metavar="T",
                   help="records admitted at or after T (ISO 8601, UTC unless an offset is given, or unix seconds)")
    p.add_argument("--to", dest="end", type=_time, default=None, metavar="T", help="records admitted before T")


def add_usage_parser(sub: Any) -> None:
    """Add `usage` and its subcommands to the top-level subparsers `sub`."""
    u = sub.add_parser("usage", help="reports, billing exports and reconciliation of the usage ledger")
    usub = u.add_subparsers(dest="usage_command", required=True)

    r = usub.add_parser("report", help="usage and cost grouped by tenant, project, team, key, model or pool")
    _common(r)
    r.add_argument("--by", default="tenant", metavar="DIMS",
                   help="comma-separated: tenant,project,team,key,model,pool (default tenant); project adds "
                   "tenant, team adds tenant and project")
    r.add_argument("--format", choices=("table", "csv", "json"), default="table")
    r.add_argument("--policy", default=None, metavar="FILE",
                   help="classify shadow records without decided_by by this policy's limit actions")
    r.set_defaults(func=_report)

    e = usub.add_parser("export", help="export the ledger for billing: FOCUS CSV, CloudEvents, JSON Lines")
    _common(e)
    e.add_argument("--format", choices=("csv", "cloudevents", "jsonl"), required=True)
    e.add_argument("--output", "-o", default=None, metavar="FILE", help="write here instead of stdout")
    e.add_argument("--source", default="tokenmeter", help="CloudEvents source (default tokenmeter)")
    e.add_argument("--type", default="tokenmeter.usage", help="CloudEvents type (default tokenmeter.usage)")
    e.add_argument("--subject", choices=("tenant", "project", "team", "key"), default="tenant",
                   help="CloudEvents subject: the billed entity (default tenant)")
    e.set_defaults(func=_export)

    c = usub.add_parser("reconcile", help="compare the ledger with a model server's own usage export")
    _common(c)
    c.add_argument("--server-usage", required=True, metavar="FILE",
                   help="the server's usage: JSON Lines per request (x_tokenmeter_request_id, prompt_tokens, "
                   "completion_tokens) or per hour (period_start, tenant, model, prompt_tokens, completion_tokens)")
    c.add_argument("--pool", default=None, help="compare only the ledger's requests on this pool (the server's)")
    c.add_argument("--format", choices=("table", "csv", "json"), default="table")
    c.set_defaults(func=_reconcile)
