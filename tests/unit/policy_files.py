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


def trusted_headers_section(authorizer: str, subjects: str) -> str:
    """An `identity.trusted_headers` section for the policy text it is appended to: the authenticator
    "corp-sso" at `authorizer` asserts the tenant, project (else "chat"), team and subject headers
    (x-auth-tenant, x-auth-project, x-auth-team, x-auth-user). `subjects`: the YAML of its `subjects`
    list, each line indented by six spaces."""
    return f"""
identity:
  trusted_headers:
    name: corp-sso
    authorizer: "{authorizer}"
    tenant_header: x-auth-tenant
    project_header: x-auth-project
    default_project: chat
    team_header: x-auth-team
    subject_header: x-auth-user
    subjects:
{subjects}"""
