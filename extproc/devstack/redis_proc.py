"""A real redis-server on a loopback port, for tests, the demo and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.devstack.binaries import find_redis_server
from extproc.devstack.commands import redis_argv
from extproc.devstack.ports import free_port, wait_for_port


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: str
    extra_args: tuple[str, ...] = field(default=())
    owns_workdir: bool = False  # made for this server: removed by close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its sockets open (a 'slow/hung Redis')."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """Stop for good, and remove the work directory this server was given (nothing is left in
        the temp folder)."""
        self.stop()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Start again on the same port (data is not persisted)."""
        self.stop()
        fresh = start_redis_server(self.port, extra_args=self.extra_args, workdir=self.workdir)
        self.proc = fresh.proc


def start_redis_server(
    port: int | None = None, *, extra_args: Sequence[str] = (), workdir: str | None = None
) -> RedisProcess:
    port = port or free_port()
    owns = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="tm-redis-")
    argv = redis_argv(port=port)
    args = [find_redis_server(), *argv[1:], "--bind", "127.0.0.1", "--dir", workdir, *extra_args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        if owns:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    return RedisProcess(port=port, proc=proc, workdir=workdir, extra_args=tuple(extra_args), owns_workdir=owns)
