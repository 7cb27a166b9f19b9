"""A small policy file for the reload and audit tests, and how to edit one so a watcher sees it."""

from __future__ import annotations

import os
from pathlib import Path

from extproc.policy import hash_key


def small_policy(version: str, tokens_per_minute: int = 100, *, raw_key: str = "reload-raw") -> str:
    """One tenant, project and key ("web", whose raw key is `raw_key`) with a tokens-per-minute limit."""
    return f"""\
version: "{version}"
pools:
  - name: only
tenants:
  acme:
    projects:
      chat: {{}}
keys:
  - id: web
    sha256: "{hash_key(raw_key)}"
    tenant: acme
    project: chat
    limits: {{tokens_per_minute: {tokens_per_minute}}}
"""


def write_edit(path: Path, text: str) -> None:
    """Write and move the mtime forward, so an edit is seen even within one mtime tick."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    mtime = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(mtime, mtime))
