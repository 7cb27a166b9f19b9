"""A fake authenticator: the HTTP ext_authz service of `identity.trusted_headers`, for tests and the demo.

Envoy's ext_authz filter sends it each request's method, path and credentials (no body). It answers
from a table:

* a bearer token (or ``x-api-key``) in the table: 200 with the table's headers for it (the identity
  it asserts: tenant, project, team, subject), which Envoy sets on the request;
* an API key the gateway knows (its SHA-256 in the table's ``api_keys``, or a key of ``--policy``):
  200 with no headers, so the processor identifies the key as usual;
* no credentials: 200 with no headers (nothing to vouch for; the gateway refuses a request nobody
  identifies, and a verified JWT reaches here without its token, which jwt_authn removed);
* any other credential: 401 with a JSON error (Envoy passes the status on to the client).

The table is YAML (or JSON)::

    tokens:
      tok-alice: {x-auth-tenant: acme, x-auth-project: chat, x-auth-team: web, x-auth-user: alice}
    api_keys: ["b75e14d5..."]   # SHA-256 of raw keys let through without headers

Run: ``python -m extproc.fakes.authz --port 9000 --table table.yaml [--policy policy.yaml]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
import yaml
from aiohttp import web

from extproc.policy.keys import hash_key
from extproc.service.identity import presented_key

log = logging.getLogger("tokenmeter.fake_authz")


@dataclass(frozen=True)
class Table:
    """What the fake authenticator knows: tokens -> the headers it asserts, and API key digests."""

    tokens: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    api_keys: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str, extra_api_keys: Iterable[str] = ()) -> Table:
        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict) or set(doc) - {"tokens", "api_keys"}:
            raise ValueError("the table is a mapping with 'tokens' and 'api_keys'")
        tokens: dict[str, dict[str, str]] = {}
        for token, headers in (doc.get("tokens") or {}).items():
            if not isinstance(token, str) or not isinstance(headers, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                raise ValueError(f"tokens: {str(token)[:32]!r} must map to {{header: value}} strings")
            tokens[token] = {k.lower(): v for k, v in headers.items()}
        api_keys = doc.get("api_keys") or []
        if not isinstance(api_keys, list) or not all(isinstance(d, str) for d in api_keys):
            raise ValueError("api_keys must be a list of SHA-256 hex digests")
        return cls(tokens, frozenset(d.lower() for d in [*api_keys, *extra_api_keys]))

    def answer(self, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """The status and the headers of the answer to a check carrying `headers`."""
        credential = presented_key(headers)
        if credential is None:
            return 200, {}
        asserted = self.tokens.get(credential)
        if asserted is not None:
            return 200, dict(asserted)
        if hash_key(credential) in self.api_keys:
            return 200, {}
        return 401, {}


TABLE: web.AppKey[Table] = web.AppKey("table", Table)
_UNKNOWN = {"error": {"message": "Unknown credentials.", "type": "invalid_request_error", "code": "invalid_token"}}


async def _check(request: web.Request) -> web.Response:
    headers = {k.lower(): v for k, v in request.headers.items()}
    status, asserted = request.app[TABLE].answer(headers)
    log.debug("check %s %s -> %d %s", request.method, request.path, status, sorted(asserted))
    if status != 200:
        return web.json_response(_UNKNOWN, status=status, headers={"www-authenticate": "Bearer"})
    return web.Response(status=200, headers=asserted)


def build_app(table: Table) -> web.Application:
    app = web.Application()
    app[TABLE] = table
    # Envoy checks with the request's own method and path: every one is a check.
    app.router.add_route("*", "/{tail:.*}", _check)
    return app


def policy_key_digests(policy: Path) -> list[str]:
    """Every digest that names a key of the policy (current and rotated ones)."""
    from extproc.policy import load_policy

    return list(load_policy(policy).key_entries)


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        table = app[TABLE]
        log.info("fake authenticator on http://%s:%s (%d tokens, %d API keys)", host, port, len(table.tokens),
                 len(table.api_keys))
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.fakes.authz",
        description="Fake HTTP ext_authz authenticator: bearer tokens -> identity headers, from a table.",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--table", required=True, type=Path, help="YAML: tokens -> headers, api_keys -> digests")
    parser.add_argument("--policy", type=Path, default=None, help="also let this policy's API keys through")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = policy_key_digests(args.policy) if args.policy is not None else []
    table = Table.parse(args.table.read_text(), extra)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(build_app(table), args.host, args.port))


if __name__ == "__main__":
    main()
