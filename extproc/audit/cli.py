"""`tokenmeter audit verify FILE` and `tokenmeter audit show FILE`: the audit log, offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from extproc.audit.chain import is_hash, read_events, verify


def _hash(text: str) -> str:
    if not is_hash(text):
        raise argparse.ArgumentTypeError("an anchor is a head hash: 64 lowercase hex characters")
    return text


def _verify(args: argparse.Namespace) -> int:
    try:
        result = verify(args.file, anchor=args.anchor)
    except OSError as exc:
        print(f"tokenmeter: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"{args.file}:{result.first_broken_line}: {result.reason}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({result.lines} events, head {result.head_hash})")
    return 0


def _show(args: argparse.Namespace) -> int:
    types = set(args.type or ())
    try:
        for number, event in read_events(args.file):
            if event is None:
                print(f"{args.file}:{number}: not an audit record", file=sys.stderr)
                continue
            if types and event.get("type") not in types:
                continue
            if args.json:
                print(orjson.dumps(event).decode())
            else:
                print(_line(event))
    except OSError as exc:
        print(f"tokenmeter: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0
    return 0


def _line(event: dict[str, Any]) -> str:
    head = f"{event.get('seq')!s:>6} {event.get('time')} {event.get('type')}"
    rest = " ".join(
        f"{name}={value if isinstance(value, str) and value.isprintable() else orjson.dumps(value).decode()}"
        for name, value in event.items()
        if name not in ("seq", "time", "type", "prev", "hash") and value is not None
    )
    return f"{head} {rest}" if rest else head


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """The `audit` subcommands, under `parser` (the `tokenmeter audit` parser)."""
    sub = parser.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser("verify", help="check an audit log's hash chain; name the first broken link",
                       description="Exit 0: the chain holds (prints the event count and the head hash: keep "
                       "it elsewhere as an anchor). Exit 1: FILE:LINE: the first broken link. Exit 2: unreadable.")
    v.add_argument("file")
    v.add_argument("--anchor", type=_hash, default=None,
                   help="a head hash recorded earlier: fail unless that line is still in the log "
                   "(detects lines deleted from the end, and a rewritten log)")
    v.set_defaults(func=_verify)
    s = sub.add_parser("show", help="print an audit log's events (does not verify: use verify)")
    s.add_argument("file")
    s.add_argument("--type", action="append", metavar="TYPE",
                   help="only events of this type (policy_loaded, policy_rejected, enforcement, breaker, "
                   "events_dropped, torn_line_discarded); repeatable")
    s.add_argument("--json", action="store_true", help="print each event as JSON")
    s.set_defaults(func=_show)
