"""`tokenmeter keys new`: create an API key, print it once, add its digest to the policy file.

The raw key goes to stdout and nowhere else (not a log, not the file). The policy file gets a new
entry under `keys:` as text, so its comments and formatting stay as they were; the result is
loaded with the strict loader before it replaces the file (a temporary file in the same directory,
then a rename: a running processor's hot reload sees either the old file or the new one, whole).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from extproc.policy.keys import generate_key, hash_key
from extproc.policy.loader import PolicyError, parse_policy, read_policy_text
from extproc.policy.model import Policy


class KeygenError(Exception):
    """A request that cannot be carried out; the message says why (never the key)."""


@dataclass(frozen=True)
class NewKey:
    raw: str  # shown once
    key_id: str
    sha256: str


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    n = sub.add_parser(
        "new",
        help="generate an API key, print it once (stdout), append its SHA-256 entry to the policy file",
    )
    n.add_argument("--policy", required=True, help="the policy YAML file to add the key to")
    n.add_argument("--tenant", required=True)
    n.add_argument("--project", required=True)
    n.add_argument("--team", default=None)
    n.add_argument("--id", dest="key_id", default=None,
                   help="the key's printable id (default: tenant-project[-team]-<random>)")
    n.add_argument("--expires", default=None,
                   help="when the key stops working: ISO-8601 with a UTC offset, e.g. 2026-12-31T00:00:00Z")
    n.set_defaults(func=run_new)


def run_new(args: argparse.Namespace) -> int:
    try:
        new = add_key(
            Path(args.policy), tenant=args.tenant, project=args.project, team=args.team,
            key_id=args.key_id, expires=args.expires,
        )
    except (KeygenError, PolicyError) as exc:
        print(f"tokenmeter: {exc}", file=sys.stderr)
        return 2
    print(new.raw)  # the only line on stdout, and the only time the key is shown
    sys.stdout.flush()
    print(
        f"tokenmeter: added key '{new.key_id}' to {args.policy}; the key above is not stored anywhere: "
        "keep it now",
        file=sys.stderr,
    )
    return 0


def add_key(
    path: Path,
    *,
    tenant: str,
    project: str,
    team: str | None = None,
    key_id: str | None = None,
    expires: str | None = None,
    raw: str | None = None,
) -> NewKey:
    """Generate a key (or use `raw`), append its entry to the policy at `path`, validated, atomically.
    On any error the file is left as it was."""
    target = Path(os.path.realpath(path))  # a symlinked policy: replace the file, keep the link
    text = read_policy_text(target)
    policy = parse_policy(text, str(path))  # a file that does not load now is fixed by hand first
    _check_owner(policy, tenant, project, team)
    if expires is not None:
        _check_timestamp(expires)
    if key_id is None:
        key_id = _default_id(policy, tenant, project, team)
    elif any(k.key_id == key_id for k in policy.keys_by_sha256.values()):
        raise KeygenError(f"{path}: a key with id '{key_id}' already exists")
    raw = raw if raw is not None else generate_key()
    digest = hash_key(raw)
    fields = [("id", key_id), ("sha256", digest), ("tenant", tenant), ("project", project)]
    if team is not None:
        fields.append(("team", team))
    if expires is not None:
        fields.append(("expires", expires))
    new_text = append_key_entry(text, fields)
    try:
        result = parse_policy(new_text, str(path))
    except PolicyError as exc:
        raise KeygenError(f"the new entry would not load, {path} is unchanged: {exc}") from None
    _check_only_added(policy, result, digest)
    _replace(target, text, new_text)
    return NewKey(raw=raw, key_id=key_id, sha256=digest)


def _check_owner(policy: Policy, tenant: str, project: str, team: str | None) -> None:
    where = policy.source
    known_tenant = policy.tenants.get(tenant)
    if known_tenant is None:
        raise KeygenError(f"{where}: unknown tenant '{tenant}' (tenants: {_names(policy.tenants)})")
    known_project = known_tenant.projects.get(project)
    if known_project is None:
        raise KeygenError(
            f"{where}: tenant '{tenant}' has no project '{project}' (projects: {_names(known_tenant.projects)})"
        )
    if team is not None and team not in known_project.teams:
        raise KeygenError(
            f"{where}: project '{tenant}.{project}' has no team '{team}' (teams: {_names(known_project.teams)})"
        )


def _check_only_added(before: Policy, after: Policy, digest: str) -> None:
    """The edited file must mean the old policy plus the new key, nothing else."""
    keys = dict(after.keys_by_sha256)
    added = keys.pop(digest, None)
    rest_same = replace(after, keys_by_sha256=before.keys_by_sha256) == before
    if added is None or keys != dict(before.keys_by_sha256) or not rest_same:
        raise KeygenError(f"{before.source}: the edit would change more than the keys list; add the entry by hand")


def _names(items: Mapping[str, object]) -> str:
    return ", ".join(sorted(items)) or "none"


def _check_timestamp(text: str) -> None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise KeygenError(
            f"--expires must be an ISO-8601 timestamp with a UTC offset, e.g. 2026-12-31T00:00:00Z; got '{text[:64]}'"
        )


def _default_id(policy: Policy, tenant: str, project: str, team: str | None) -> str:
    base = "-".join(p for p in (tenant, project, team) if p)[:120]
    taken = {k.key_id for k in policy.keys_by_sha256.values()}
    while True:
        key_id = f"{base}-{secrets.token_hex(3)}"
        if key_id not in taken:
            return key_id


# -- the text edit ----------------------------------------------------------------------


def append_key_entry(text: str, fields: list[tuple[str, str]]) -> str:
    """`text` with one more item at the end of its top-level `keys` list, written in the list's own
    style (a block list: indented like its items; a flow list: `{...}` before its `]`). Nothing else
    in the text changes. Values are names, digests and timestamps: none needs escaping."""
    for _, value in fields:
        if '"' in value or "\\" in value or not value.isprintable():
            raise KeygenError("key fields must be printable and carry no quotes or backslashes")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, MappingNode):
        raise KeygenError("the policy's top level is not a mapping")
    keys = next((v for k, v in root.value if isinstance(k, ScalarNode) and k.value == "keys"), None)
    if not isinstance(keys, SequenceNode):
        raise KeygenError("the policy has no `keys` list")
    if keys.flow_style or not keys.value:
        return _append_flow(text, keys, fields)
    return _append_block(text, keys, fields)


def _append_flow(text: str, keys: SequenceNode, fields: list[tuple[str, str]]) -> str:
    """After the last item (and its comma, if it has one), or right after the `[` of an empty list."""
    close = keys.end_mark.index - 1
    if not keys.flow_style or text[keys.start_mark.index] != "[" or text[close] != "]":
        raise KeygenError("cannot find the `keys` list in the text; add the entry by hand")
    item = "{" + ", ".join(f"{name}: {_scalar(name, value)}" for name, value in fields) + "}"
    if not keys.value:
        at = keys.start_mark.index + 1
        return text[:at] + item + text[at:]
    at = keys.value[-1].end_mark.index
    rest = text[at:close]
    if rest.lstrip().startswith(","):
        at += rest.index(",") + 1
        return text[:at] + " " + item + text[at:]
    return text[:at] + ", " + item + text[at:]


def _append_block(text: str, keys: SequenceNode, fields: list[tuple[str, str]]) -> str:
    dash = keys.start_mark.column  # the column of the items' "-"
    first = keys.value[0]
    inner = first.start_mark.column if first.start_mark.line == keys.start_mark.line else dash + 2
    lines = [f'{" " * dash}-{" " * (inner - dash - 1)}{fields[0][0]}: {_scalar(*fields[0])}']
    lines.extend(f'{" " * inner}{name}: {_scalar(name, value)}' for name, value in fields[1:])
    at = _end_of_last_item(text, keys.value[-1])
    head = text[:at]
    if head and not head.endswith("\n"):
        head += "\n"
    return head + "\n".join(lines) + "\n" + text[at:]


def _scalar(name: str, value: str) -> str:
    """A name plain when YAML reads it back as that string (`acme`), else double-quoted (`"123"`,
    `"true"`); a digest or a timestamp always quoted, as the policy examples write them."""
    if name not in ("sha256", "expires") and value and yaml.safe_load(value) == value:
        return value
    return f'"{value}"'


def _end_of_last_item(text: str, node: Node) -> int:
    """Where the text of `node` ends: after the line of its last scalar or flow collection (block
    collections end at the next token, which can be lines of comments further on)."""
    start = node.start_mark.index
    while isinstance(node, MappingNode | SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, MappingNode) else last
    if node.start_mark.index < start:  # an alias (*name) to a node defined further up
        raise KeygenError("the last key ends with a YAML alias: cannot tell where it ends; add the entry by hand")
    end = node.end_mark.index
    if node.end_mark.column == 0:  # a block scalar ends at the start of the line after it
        return end
    newline = text.find("\n", end)
    return len(text) if newline < 0 else newline + 1


def _replace(target: Path, old_text: str, new_text: str) -> None:
    """Write `new_text` to a temporary file beside `target` and rename it over `target`, unless the
    file changed since `old_text` was read (another edit: that one would be lost)."""
    mode = target.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(new_text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if read_policy_text(target) != old_text:
            raise KeygenError(f"{target} changed while the key was being added; nothing written, run it again")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
