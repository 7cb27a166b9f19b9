"""The command lines of every service in the stack, in one place.

The demo, the end-to-end tests, the benchmark and docker-compose.yml all run these commands;
tests/e2e/test_compose_lockstep.py checks that docker-compose.yml says exactly what these say.
"""

from __future__ import annotations


def processor_argv(
    *, policy: str, listen: str, redis: str | None, usage_log: str, extra: tuple[str, ...] = ()
) -> list[str]:
    argv = ["tokenmeter", "serve", "--policy", policy, "--listen", listen, "--usage-log", usage_log]
    if redis:
        argv += ["--redis", redis]
    return argv + list(extra)


def fake_model_argv(*, pool: str, host: str, port: int) -> list[str]:
    return ["python", "-m", "extproc.fakes.model_server", "--pool", pool, "--host", host, "--port", str(port)]


def fake_authz_argv(*, table: str, host: str, port: int, policy: str | None = None) -> list[str]:
    """The fake authenticator (`identity.trusted_headers`): tokens of `table` -> identity headers."""
    argv = ["python", "-m", "extproc.fakes.authz", "--table", table, "--host", host, "--port", str(port)]
    return argv + (["--policy", policy] if policy else [])


def envoy_argv(*, config: str, concurrency: int = 1) -> list[str]:
    return ["envoy", "-c", config, "--concurrency", str(concurrency), "--log-level", "warn"]


def redis_argv(*, port: int) -> list[str]:
    return ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
