"""Load a policy file into `Policy` values, validating strictly.

The YAML is composed into nodes (not constructed into plain Python values) so that every
error can name the line of the node at fault. Every failure, from a missing file to a bad
limit, is a `PolicyError` carrying file, line and reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from extproc.billing.catalog import RATE_KINDS, ModelPrices, PriceCatalog, RateOverride
from extproc.policy.model import (
    Action,
    ApiKey,
    Identity,
    JwtProvider,
    Limits,
    Mode,
    OverCap,
    Period,
    Policy,
    Pool,
    PreviousDigest,
    Project,
    RequestRules,
    Team,
    Tenant,
)

_E = TypeVar("_E", bound=StrEnum)

_TAG_STR = "tag:yaml.org,2002:str"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_MERGE = "tag:yaml.org,2002:merge"
_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TAG_NAMES = {
    _TAG_BOOL: "a boolean",
    _TAG_NULL: "null",
    "tag:yaml.org,2002:float": "a float",
    _TAG_INT: "an integer",
    _TAG_STR: "a string",
    _TAG_TIMESTAMP: "a date",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# names end up in Redis keys, metric labels and routing metadata: keep them plain
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CONSTRUCTOR = SafeConstructor()

_TOP_KEYS = (
    "version", "mode", "request", "redis", "models", "aliases", "pools", "tenants", "keys", "prices", "identity"
)
_REQUIRED_TOP_KEYS = ("version", "tenants", "keys", "pools")
_LIMIT_INT_KEYS = (
    "tokens_per_minute",
    "requests_per_minute",
    "requests_per_hour",
    "quota_tokens",
    "quota_requests",
)
_LIMIT_KEYS = (*_LIMIT_INT_KEYS, "quota_period", "action")
_REQUEST_KEYS = ("max_body_bytes", "default_max_tokens", "max_tokens_cap", "over_cap")
_POOL_KEYS = ("name", "tokens_per_minute", "endpoints", "reports_usage")
_TENANT_KEYS = ("limits", "projects", "mode")
_PROJECT_KEYS = ("limits", "teams")
_TEAM_KEYS = ("limits",)
_APIKEY_KEYS = (
    "id", "sha256", "tenant", "project", "team", "limits", "disabled", "reason", "not_before", "expires", "previous",
    "models",
)
_PREVIOUS_KEYS = ("sha256", "valid_until")
_REASON_MAX = 200
_PRICES_KEYS = ("version", "currency", "models", "default")
_MODEL_PRICE_KEYS = (*RATE_KINDS, "pools")
_CURRENCY = re.compile(r"[A-Z]{3}")
_IDENTITY_KEYS = ("jwt",)
_JWT_KEYS = (
    "name", "issuer", "audiences", "jwks", "tenant_claim", "project_claim", "default_project", "team_claim", "subjects"
)
_SUBJECT_KEYS = ("sub", "limits")
_CLAIM = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


class PolicyError(Exception):
    """A policy file that cannot be used: `file:line: reason` (line is 1-based, may be unknown)."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        super().__init__(file, line, reason)
        self.file = file
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


class _Invalid(Exception):
    """Raised while walking the nodes; turned into a PolicyError naming the source."""

    def __init__(self, node: Node | None, reason: str) -> None:
        super().__init__(reason)
        self.line = _line(node) if node is not None else None
        self.reason = reason


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path`."""
    return parse_policy(read_policy_text(path), str(path))


def read_policy_text(path: str | Path) -> str:
    """The text of a policy file; any failure to read it is a PolicyError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PolicyError(str(path), None, "policy file not found") from None
    except IsADirectoryError:
        raise PolicyError(str(path), None, "policy path is a directory, not a file") from None
    except OSError as exc:
        raise PolicyError(str(path), None, f"cannot read policy file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(str(path), line, "policy file is not valid UTF-8") from None


def parse_policy(text: str, source: str) -> Policy:
    """Validate policy YAML `text`; `source` names it in errors and in `Policy.source`."""
    root = _compose(text, source)
    try:
        return _policy(root, source)
    except _Invalid as exc:
        raise PolicyError(source, exc.line, exc.reason) from None
    except RecursionError:
        raise PolicyError(source, None, "policy is nested too deeply") from None


# -- YAML -------------------------------------------------------------------------------


def _compose(text: str, source: str) -> Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = ": ".join(p for p in (exc.context, exc.problem) if p)
        raise PolicyError(source, line, f"invalid YAML: {reason or 'syntax error'}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise PolicyError(source, line, f"invalid YAML: unacceptable character {char}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise PolicyError(source, None, f"invalid YAML: {first}") from None
    except RecursionError:
        raise PolicyError(source, None, "invalid YAML: nested too deeply") from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == _TAG_NULL):
        raise PolicyError(source, None, "policy file is empty")
    return root


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _TAG_NAMES.get(node.tag, f"a value tagged {node.tag}")


@dataclass(frozen=True)
class _Field:
    key: Node
    value: Node


@dataclass(frozen=True)
class _Map:
    """A YAML mapping whose keys have been checked: strings, unique, all allowed."""

    node: Node
    where: str
    fields: Mapping[str, _Field]

    def get(self, key: str) -> Node | None:
        found = self.fields.get(key)
        return found.value if found is not None else None

    def require(self, key: str) -> Node:
        found = self.fields.get(key)
        if found is None:
            raise _Invalid(self.node, f"missing required key '{key}' in {self.where or 'the top level'}")
        return found.value

    def sub(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key


def _map_node(node: Node, where: str, allowed: Iterable[str] | None) -> _Map:
    """Check a mapping node. `allowed=None` means the keys are names (tenants, projects...)."""
    if not isinstance(node, MappingNode):
        raise _Invalid(node, f"{where or 'policy'} must be a mapping, got {_kind(node)}")
    allowed_keys = tuple(allowed) if allowed is not None else None
    fields: dict[str, _Field] = {}
    for key_node, value_node in node.value:
        key = _key_text(key_node, where, names=allowed_keys is None)
        if allowed_keys is not None and key not in allowed_keys:
            raise _Invalid(
                key_node,
                f"unknown key '{key}' in {where or 'the top level'} (allowed: {', '.join(allowed_keys)})",
            )
        if key in fields:
            first = _line(fields[key].key)
            raise _Invalid(
                key_node, f"duplicate key '{key}' in {where or 'the top level'} (first at line {first})"
            )
        fields[key] = _Field(key_node, value_node)
    return _Map(node, where, fields)


def _key_text(node: Node, where: str, *, names: bool) -> str:
    place = where or "the top level"
    if isinstance(node, ScalarNode) and node.tag == _TAG_MERGE:
        raise _Invalid(node, f"YAML merge keys (<<) are not supported in {place}")
    if not isinstance(node, ScalarNode) or node.tag != _TAG_STR:
        hint = " (quote it)" if isinstance(node, ScalarNode) else ""
        raise _Invalid(node, f"keys in {place} must be strings, got {_kind(node)}{hint}")
    text = str(node.value)
    if names:
        _check_name(node, text, place)
    return text


def _check_name(node: Node, text: str, place: str) -> None:
    if not _NAME.fullmatch(text):
        raise _Invalid(
            node,
            f"invalid name '{text}' in {place}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)",
        )


# -- scalars ----------------------------------------------------------------------------


def _string(node: Node, where: str) -> str:
    if not isinstance(node, ScalarNode) or node.tag != _TAG_STR:
        hint = " (quote it)" if isinstance(node, ScalarNode) else ""
        raise _Invalid(node, f"{where} must be a string, got {_kind(node)}{hint}")
    text = str(node.value)
    if not text.strip():
        raise _Invalid(node, f"{where} must not be empty")
    return text


def _name(node: Node, where: str) -> str:
    text = _string(node, where)
    _check_name(node, text, where)
    return text


def _positive_int(node: Node, where: str) -> int:
    if not isinstance(node, ScalarNode) or node.tag != _TAG_INT:
        raise _Invalid(node, f"{where} must be a positive integer, got {_kind(node)}")
    value = _CONSTRUCTOR.construct_yaml_int(node)
    if value <= 0:
        raise _Invalid(node, f"{where} must be a positive integer, got {value}")
    return value


def _optional_int(m: _Map, key: str) -> int | None:
    node = m.get(key)
    return _positive_int(node, m.sub(key)) if node is not None else None


def _optional_bool(m: _Map, key: str, default: bool) -> bool:
    node = m.get(key)
    if node is None:
        return default
    if not isinstance(node, ScalarNode) or node.tag != _TAG_BOOL:
        raise _Invalid(node, f"{m.sub(key)} must be true or false, got {_kind(node)}")
    return bool(_CONSTRUCTOR.construct_yaml_bool(node))


def _enum(node: Node, enum: type[_E], where: str) -> _E:
    choices = ", ".join(member.value for member in enum)
    if not isinstance(node, ScalarNode) or node.tag != _TAG_STR:
        raise _Invalid(node, f"{where} must be one of: {choices}; got {_kind(node)}")
    try:
        return enum(node.value)
    except ValueError:
        field = where.rsplit(".", 1)[-1]
        raise _Invalid(
            node, f"{where}: unknown {field} '{node.value}' (expected one of: {choices})"
        ) from None


def _optional_enum(m: _Map, key: str, enum: type[_E], default: _E) -> _E:
    node = m.get(key)
    return _enum(node, enum, m.sub(key)) if node is not None else default


# -- sections ---------------------------------------------------------------------------


def _policy(root: Node, source: str) -> Policy:
    top = _map_node(root, "", _TOP_KEYS)
    for key in _REQUIRED_TOP_KEYS:
        top.require(key)
    version = _string(top.require("version"), "version")
    mode = _optional_enum(top, "mode", Mode, Mode.ENFORCE)
    request = _request(top.get("request"))
    _redis(top.get("redis"))
    pools = _pools(top.require("pools"))
    tenants = _tenants(top.require("tenants"))
    models = _models(top.get("models"))
    aliases = _aliases(top.get("aliases"), models)
    keys = _keys(top.require("keys"), tenants, _Models(models, aliases))
    prices = _prices(top.get("prices"), pools)
    identity = _identity(top.get("identity"), source)
    return Policy(
        version, mode, request, pools, tenants, keys, source=source, models=models, prices=prices,
        identity=identity, aliases=aliases,
    )


def _models(node: Node | None) -> frozenset[str]:
    """The models this gateway serves: the only values a model takes as a metric label."""
    if node is None:
        return frozenset()
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, f"models must be a list of model names, got {_kind(node)}")
    names = [_string(item, "models[]") for item in node.value]
    for item, name in zip(node.value, names, strict=True):
        if len(name) > 256:
            raise _Invalid(item, f"model name is {len(name)} characters; at most 256")
    return frozenset(names)


@dataclass(frozen=True)
class _Models:
    """What a key's `models` allow-list is checked against: the served models and the aliases."""

    served: frozenset[str]  # empty: the policy lists none (any name goes)
    aliases: Mapping[str, str]


def _aliases(node: Node | None, models: frozenset[str]) -> dict[str, str]:
    """`aliases`: client model name -> the canonical model it stands for (one of `models`, when the
    policy lists them). An alias is not itself a served model, nor another alias's target."""
    if node is None:
        return {}
    fields = _model_names(node, "aliases", "models")
    out: dict[str, str] = {}
    for name, f in fields.items():
        target = _string(f.value, f"aliases.{name}")
        if len(target) > 256:
            raise _Invalid(f.value, f"aliases.{name}: model name is {len(target)} characters; at most 256")
        if name in models:
            raise _Invalid(f.key, f"alias '{name}' is a model listed under models: an alias names another model")
        if models and target not in models:
            raise _Invalid(f.value, f"alias '{name}' names '{target}', which is not listed under models")
        if target == name:
            raise _Invalid(f.value, f"alias '{name}' names itself")
        out[name] = target
    for name, f in fields.items():
        if out[name] in out:
            raise _Invalid(f.value, f"alias '{name}' names '{out[name]}', which is itself an alias; name the model")
    return out


def _key_models(node: Node, where: str, key_id: str, known: _Models) -> frozenset[str]:
    """A key's allow-list: the canonical models it may ask for (aliases resolved)."""
    if not isinstance(node, SequenceNode) or not node.value:
        raise _Invalid(
            node, f"key '{key_id}': {where} must be a non-empty list of model names (omit it to allow every model), "
            f"got {_kind(node)}")
    out: set[str] = set()
    lines: dict[str, int] = {}
    for item in node.value:
        name = _string(item, f"{where}[]")
        if len(name) > 256:
            raise _Invalid(item, f"key '{key_id}': model name is {len(name)} characters; at most 256")
        if name in lines:
            raise _Invalid(item, f"key '{key_id}': duplicate model '{name}' in {where} (first at line {lines[name]})")
        lines[name] = _line(item)
        canonical = known.aliases.get(name, name)
        if known.served and canonical not in known.served:
            raise _Invalid(item, f"key '{key_id}': model '{name}' in {where} is not listed under models")
        out.add(canonical)
    return frozenset(out)


def _request(node: Node | None) -> RequestRules:
    if node is None:
        return RequestRules()
    m = _map_node(node, "request", _REQUEST_KEYS)
    defaults = RequestRules()
    rules = RequestRules(
        max_body_bytes=_optional_int(m, "max_body_bytes") or defaults.max_body_bytes,
        default_max_tokens=_optional_int(m, "default_max_tokens") or defaults.default_max_tokens,
        max_tokens_cap=_optional_int(m, "max_tokens_cap") or defaults.max_tokens_cap,
        over_cap=_optional_enum(m, "over_cap", OverCap, defaults.over_cap),
    )
    if rules.default_max_tokens > rules.max_tokens_cap:
        raise _Invalid(
            m.get("default_max_tokens") or m.get("max_tokens_cap") or node,
            f"request.default_max_tokens ({rules.default_max_tokens}) exceeds "
            f"request.max_tokens_cap ({rules.max_tokens_cap})",
        )
    return rules


def _redis(node: Node | None) -> None:
    """`redis` was a policy section; it is a process setting now (read once at start, where a policy
    edit would silently have done nothing): refused with where it went."""
    if node is not None:
        raise _Invalid(
            node,
            "the redis section is no longer part of the policy (it never took effect on reload): "
            "use `tokenmeter serve --redis-deadline-ms N --redis-failure-mode fail_open|fail_closed`",
        )


def _limits(node: Node | None, where: str) -> Limits:
    if node is None:
        return Limits()
    m = _map_node(node, where, _LIMIT_KEYS)
    defaults = Limits()
    return Limits(
        tokens_per_minute=_optional_int(m, "tokens_per_minute"),
        requests_per_minute=_optional_int(m, "requests_per_minute"),
        requests_per_hour=_optional_int(m, "requests_per_hour"),
        quota_tokens=_optional_int(m, "quota_tokens"),
        quota_requests=_optional_int(m, "quota_requests"),
        quota_period=_optional_enum(m, "quota_period", Period, defaults.quota_period),
        action=_optional_enum(m, "action", Action, defaults.action),
    )


def _pools(node: Node) -> tuple[Pool, ...]:
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, f"pools must be a list, got {_kind(node)}")
    if not node.value:
        raise _Invalid(node, "pools must list at least one pool")
    pools: list[Pool] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(node.value):
        m = _map_node(item, f"pools[{index}]", _POOL_KEYS)
        name_node = m.require("name")
        name = _name(name_node, m.sub("name"))
        if name in seen:
            raise _Invalid(name_node, f"duplicate pool name '{name}' (first at line {seen[name]})")
        seen[name] = _line(name_node)
        pools.append(Pool(
            name=name, tokens_per_minute=_optional_int(m, "tokens_per_minute"), endpoints=_endpoints(m),
            reports_usage=_optional_bool(m, "reports_usage", True),
        ))
    _check_overflow_last(node, pools)
    return tuple(pools)


_ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def _endpoints(m: _Map) -> tuple[str, ...]:
    node = m.get("endpoints")
    if node is None:
        return ()
    where = m.sub("endpoints")
    if not isinstance(node, SequenceNode) or not node.value:
        raise _Invalid(node, f"{where} must be a non-empty list of \"host:port\"")
    out: list[str] = []
    for item in node.value:
        text = _string(item, where)
        match = _ENDPOINT.fullmatch(text)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise _Invalid(item, f"{where}: '{text}' is not host:port (e.g. model-h100:8000)")
        out.append(text)
    return tuple(out)


def _check_overflow_last(node: SequenceNode, pools: list[Pool]) -> None:
    """A pool without a ceiling always has room, so any pool after it could never serve."""
    for index, pool in enumerate(pools[:-1]):
        if pool.tokens_per_minute is None:
            later = ", ".join(p.name for p in pools[index + 1 :])
            raise _Invalid(
                node.value[index],
                f"pool '{pool.name}' has no tokens_per_minute ceiling, so the pools after it "
                f"({later}) could never serve; put the overflow pool last",
            )


def _tenants(node: Node) -> dict[str, Tenant]:
    m = _map_node(node, "tenants", None)
    return {name: _tenant(name, f.value, f"tenants.{name}") for name, f in m.fields.items()}


def _tenant(name: str, node: Node, where: str) -> Tenant:
    m = _body(node, where, _TENANT_KEYS)
    projects_node = m.get("projects")
    projects: dict[str, Project] = {}
    if projects_node is not None:
        pm = _map_node(projects_node, f"{where}.projects", None)
        projects = {p: _project(p, f.value, f"{pm.where}.{p}") for p, f in pm.fields.items()}
    mode = _optional_enum(m, "mode", Mode, Mode.ENFORCE) if m.get("mode") is not None else None
    return Tenant(name=name, limits=_limits(m.get("limits"), m.sub("limits")), projects=projects, mode=mode)


def _project(name: str, node: Node, where: str) -> Project:
    m = _body(node, where, _PROJECT_KEYS)
    teams_node = m.get("teams")
    teams: dict[str, Team] = {}
    if teams_node is not None:
        tm = _map_node(teams_node, f"{where}.teams", None)
        teams = {t: _team(t, f.value, f"{tm.where}.{t}") for t, f in tm.fields.items()}
    return Project(name=name, limits=_limits(m.get("limits"), m.sub("limits")), teams=teams)


def _team(name: str, node: Node, where: str) -> Team:
    m = _body(node, where, _TEAM_KEYS)
    return Team(name=name, limits=_limits(m.get("limits"), m.sub("limits")))


def _body(node: Node, where: str, allowed: Iterable[str]) -> _Map:
    """A tenant/project/team body: a mapping, or empty (`name:` or `name: {}`)."""
    if isinstance(node, ScalarNode) and node.tag == _TAG_NULL:
        return _Map(node, where, {})
    return _map_node(node, where, allowed)


# -- API keys ---------------------------------------------------------------------------


def _keys(node: Node, tenants: Mapping[str, Tenant], models: _Models) -> dict[str, ApiKey]:
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, f"keys must be a list, got {_kind(node)}")
    by_sha: dict[str, ApiKey] = {}
    # every digest in the file, current or rotated out: (key id, line), for duplicate errors
    digests: dict[str, tuple[str, int]] = {}
    id_lines: dict[str, int] = {}
    for index, item in enumerate(node.value):
        m = _map_node(item, f"keys[{index}]", _APIKEY_KEYS)
        id_node = m.require("id")
        key_id = _name(id_node, m.sub("id"))
        if key_id in id_lines:
            raise _Invalid(id_node, f"duplicate key id '{key_id}' (first at line {id_lines[key_id]})")
        id_lines[key_id] = _line(id_node)
        key = _api_key(m, key_id, tenants, digests, models)
        by_sha[key.sha256] = key
    return by_sha


def _claim_digest(
    digests: dict[str, tuple[str, int]], digest: str, key_id: str, node: Node, what: str
) -> None:
    """A digest names one key: a second use (as a current or a previous digest) is an error that
    names the keys and lines, never the digest."""
    if digest in digests:
        other, line = digests[digest]
        owner = "this key" if other == key_id else f"key '{other}'"
        raise _Invalid(node, f"key '{key_id}': {what}, already used by {owner} at line {line}")
    digests[digest] = (key_id, _line(node))


def _api_key(
    m: _Map, key_id: str, tenants: Mapping[str, Tenant], digests: dict[str, tuple[str, int]], models: _Models
) -> ApiKey:
    tenant_node, project_node, team_node = m.require("tenant"), m.require("project"), m.get("team")
    tenant = _name(tenant_node, m.sub("tenant"))
    project = _name(project_node, m.sub("project"))
    team = _name(team_node, m.sub("team")) if team_node is not None else None
    known_tenant = tenants.get(tenant)
    if known_tenant is None:
        raise _Invalid(tenant_node, f"key '{key_id}': unknown tenant '{tenant}' (not under tenants)")
    known_project = known_tenant.projects.get(project)
    if known_project is None:
        raise _Invalid(project_node, f"key '{key_id}': tenant '{tenant}' has no project '{project}'")
    if team is not None and team_node is not None and team not in known_project.teams:
        raise _Invalid(team_node, f"key '{key_id}': project '{tenant}.{project}' has no team '{team}'")
    disabled = _optional_bool(m, "disabled", False)
    not_before = _optional_timestamp(m, "not_before", key_id)
    expires = _optional_timestamp(m, "expires", key_id)
    if not_before is not None and expires is not None and expires <= not_before:
        raise _Invalid(m.get("expires"), f"key '{key_id}': expires must be later than not_before")
    sha_node = m.require("sha256")
    sha = _sha256(sha_node, key_id)
    _claim_digest(digests, sha, key_id, sha_node, "duplicate sha256")
    previous_node = m.get("previous")
    previous = _previous(previous_node, m.sub("previous"), key_id) if previous_node is not None else []
    for prev, prev_node in previous:
        _claim_digest(digests, prev.sha256, key_id, prev_node, "duplicate previous sha256")
    models_node = m.get("models")
    return ApiKey(
        key_id=key_id,
        sha256=sha,
        tenant=tenant,
        project=project,
        team=team,
        limits=_limits(m.get("limits"), m.sub("limits")),
        disabled=disabled,
        disabled_reason=_reason(m, key_id, disabled),
        not_before=not_before,
        expires=expires,
        previous=tuple(prev for prev, _ in previous),
        models=_key_models(models_node, m.sub("models"), key_id, models) if models_node is not None else None,
    )


def _reason(m: _Map, key_id: str, disabled: bool) -> str | None:
    """Why a key is disabled: told to its caller in the 403, so one short printable line."""
    node = m.get("reason")
    if node is None:
        return None
    if not disabled:
        raise _Invalid(node, f"key '{key_id}': reason is only for a disabled key (add disabled: true)")
    text = _string(node, m.sub("reason"))
    if len(text) > _REASON_MAX or not text.isprintable():
        raise _Invalid(
            node, f"key '{key_id}': reason must be one printable line of at most {_REASON_MAX} characters"
        )
    return text


def _previous(node: Node, where: str, key_id: str) -> list[tuple[PreviousDigest, Node]]:
    """Digests of the key before a rotation, each accepted until its valid_until (with the node of
    its sha256, for duplicate errors)."""
    if not isinstance(node, SequenceNode) or not node.value:
        raise _Invalid(
            node, f"{where} must be a non-empty list of {{sha256: ..., valid_until: <timestamp>}}, got {_kind(node)}"
        )
    out: list[tuple[PreviousDigest, Node]] = []
    for index, item in enumerate(node.value):
        m = _map_node(item, f"{where}[{index}]", _PREVIOUS_KEYS)
        sha_node = m.require("sha256")
        sha = _sha256(sha_node, key_id)
        until = _timestamp(m.require("valid_until"), m.sub("valid_until"), key_id)
        out.append((PreviousDigest(sha256=sha, valid_until=until), sha_node))
    return out


def _optional_timestamp(m: _Map, key: str, key_id: str) -> float | None:
    node = m.get(key)
    return _timestamp(node, m.sub(key), key_id) if node is not None else None


def _timestamp(node: Node, where: str, key_id: str) -> float:
    """An ISO-8601 timestamp with a UTC offset (2026-01-31T00:00:00Z, ...+02:00), quoted or not, as
    epoch seconds. Without an offset the instant would depend on the host's zone: refused."""
    expected = f"key '{key_id}': {where} must be an ISO-8601 timestamp with a UTC offset, e.g. 2026-01-31T00:00:00Z"
    if not isinstance(node, ScalarNode) or node.tag not in (_TAG_STR, _TAG_TIMESTAMP):
        raise _Invalid(node, f"{expected}; got {_kind(node)}")
    text = str(node.value).strip()
    shown = text if len(text) <= 64 else text[:64] + "..."
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _Invalid(node, f"{expected}; got '{shown}'") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise _Invalid(node, f"{expected}; '{shown}' has no offset (add Z or +HH:MM)")
    return when.timestamp()


def _sha256(node: Node, key_id: str) -> str:
    """The digest text. Never echo the value: a raw key pasted here must not reach a log."""
    hint = "hash the raw key with `tokenmeter hash-key`"
    if not isinstance(node, ScalarNode):
        raise _Invalid(node, f"key '{key_id}': sha256 must be a string, got {_kind(node)}; {hint}")
    text = str(node.value)
    if _SHA256.fullmatch(text):
        return text
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise _Invalid(node, f"key '{key_id}': sha256 must be lowercase hex")
    raise _Invalid(
        node,
        f"key '{key_id}': sha256 must be 64 lowercase hex characters (got {len(text)} characters); {hint}",
    )


# -- prices -----------------------------------------------------------------------------


def _prices(node: Node | None, pools: tuple[Pool, ...]) -> PriceCatalog | None:
    """The price catalog (extproc.billing.catalog): version, currency, per-model rates per million
    tokens with per-pool overrides, and an optional default for models not listed."""
    if node is None:
        return None
    m = _map_node(node, "prices", _PRICES_KEYS)
    version = _string(m.require("version"), "prices.version")
    currency_node = m.require("currency")
    currency = _string(currency_node, "prices.currency")
    if not _CURRENCY.fullmatch(currency):
        raise _Invalid(currency_node, f"prices.currency must be an ISO 4217 code such as USD or EUR, got '{currency}'")
    pool_names = tuple(p.name for p in pools)
    models: dict[str, ModelPrices] = {}
    models_node = m.get("models")
    if models_node is not None:
        for name, f in _model_names(models_node, "prices.models").items():
            models[name] = _model_prices(f.value, f"prices.models.{name}", pool_names)
    default_node = m.get("default")
    default = _model_prices(default_node, "prices.default", pool_names) if default_node is not None else None
    if not models and default is None:
        raise _Invalid(node, "prices must price at least one model (prices.models) or give a prices.default")
    return PriceCatalog(version=version, currency=currency, models=models, default=default)


def _model_names(node: Node, where: str, of: str = "prices") -> dict[str, _Field]:
    """A mapping keyed by model names: any non-empty string of at most 256 characters (model names
    carry '/' and ':'), each once."""
    if not isinstance(node, MappingNode):
        raise _Invalid(node, f"{where} must be a mapping of model names to {of}, got {_kind(node)}")
    fields: dict[str, _Field] = {}
    for key_node, value_node in node.value:
        name = _key_text(key_node, where, names=False)
        if not name.strip() or len(name) > 256:
            raise _Invalid(key_node, f"invalid model name in {where}: must be 1 to 256 characters")
        if name in fields:
            first = _line(fields[name].key)
            raise _Invalid(key_node, f"duplicate model '{name}' in {where} (first at line {first})")
        fields[name] = _Field(key_node, value_node)
    return fields


def _model_prices(node: Node, where: str, pool_names: tuple[str, ...]) -> ModelPrices:
    m = _map_node(node, where, _MODEL_PRICE_KEYS)
    for kind in ("input", "output"):
        m.require(kind)
    rates = _rates(m)
    overrides: dict[str, RateOverride] = {}
    pools_node = m.get("pools")
    if pools_node is not None:
        pm = _map_node(pools_node, m.sub("pools"), None)
        for pool, f in pm.fields.items():
            if pool not in pool_names:
                raise _Invalid(f.key, f"unknown pool '{pool}' in {pm.where} (pools: {', '.join(pool_names)})")
            om = _map_node(f.value, f"{pm.where}.{pool}", RATE_KINDS)
            if not om.fields:
                raise _Invalid(f.value, f"{om.where} must override at least one of: {', '.join(RATE_KINDS)}")
            overrides[pool] = _rates(om)
    return ModelPrices(rates=rates, pools=overrides)


def _rates(m: _Map) -> RateOverride:
    values = {kind: _rate(node, m.sub(kind)) for kind in RATE_KINDS if (node := m.get(kind)) is not None}
    return RateOverride(**values)


def _rate(node: Node, where: str) -> Decimal:
    """A non-negative decimal from the YAML text itself (0.15 stays exactly 0.15: never a float)."""
    expected = f"{where} must be a non-negative number (price per million tokens)"
    if not isinstance(node, ScalarNode) or node.tag not in (_TAG_INT, "tag:yaml.org,2002:float", _TAG_STR):
        raise _Invalid(node, f"{expected}, got {_kind(node)}")
    text = str(node.value).strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise _Invalid(node, f"{expected}, got '{text}'") from None
    if not value.is_finite() or value < 0:
        raise _Invalid(node, f"{expected}, got '{text}'")
    return value


# -- identity ---------------------------------------------------------------------------


def _identity(node: Node | None, source: str) -> Identity:
    """`identity.jwt`: issuers whose tokens Envoy verifies (extproc.envoy.config renders jwt_authn
    from them) and how their claims map onto tenants, projects and teams."""
    if node is None:
        return Identity()
    m = _map_node(node, "identity", _IDENTITY_KEYS)
    jwt_node = m.get("jwt")
    if jwt_node is None:
        return Identity()
    if not isinstance(jwt_node, SequenceNode) or not jwt_node.value:
        raise _Invalid(jwt_node, f"identity.jwt must be a non-empty list of providers, got {_kind(jwt_node)}")
    providers: list[JwtProvider] = []
    names: dict[str, int] = {}
    issuers: dict[str, int] = {}
    for index, item in enumerate(jwt_node.value):
        pm = _map_node(item, f"identity.jwt[{index}]", _JWT_KEYS)
        name_node = pm.require("name")
        name = _name(name_node, pm.sub("name"))
        if name in names:
            raise _Invalid(name_node, f"duplicate JWT provider name '{name}' (first at line {names[name]})")
        names[name] = _line(name_node)
        issuer_node = pm.require("issuer")
        issuer = _string(issuer_node, pm.sub("issuer"))
        if issuer in issuers:
            raise _Invalid(issuer_node, f"duplicate JWT issuer '{issuer}' (first at line {issuers[issuer]})")
        issuers[issuer] = _line(issuer_node)
        default_node = pm.get("default_project")
        default_project = _name(default_node, pm.sub("default_project")) if default_node is not None else None
        project_claim = _claim(pm, "project_claim")
        if project_claim is None and default_project is None:
            raise _Invalid(item, f"JWT provider '{name}': give project_claim, default_project, or both")
        providers.append(JwtProvider(
            name=name,
            issuer=issuer,
            jwks=_jwks(pm.require("jwks"), pm.sub("jwks"), source),
            tenant_claim=_claim(pm, "tenant_claim", required=True) or "",
            audiences=_audiences(pm),
            project_claim=project_claim,
            default_project=default_project,
            team_claim=_claim(pm, "team_claim"),
            subjects=_subjects(pm),
        ))
    return Identity(jwt=tuple(providers))


def _claim(m: _Map, key: str, *, required: bool = False) -> str | None:
    node = m.require(key) if required else m.get(key)
    if node is None:
        return None
    text = _string(node, m.sub(key))
    if not _CLAIM.fullmatch(text):
        raise _Invalid(node, f"{m.sub(key)}: '{text[:64]}' is not a claim name (letters, digits, _ . : / -)")
    return text


def _audiences(m: _Map) -> tuple[str, ...]:
    node = m.get("audiences")
    if node is None:
        return ()
    if not isinstance(node, SequenceNode) or not node.value:
        raise _Invalid(node, f"{m.sub('audiences')} must be a non-empty list of strings, got {_kind(node)}")
    return tuple(_string(item, m.sub("audiences")) for item in node.value)


def _subjects(m: _Map) -> dict[str, Limits]:
    node = m.get("subjects")
    if node is None:
        return {}
    where = m.sub("subjects")
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, f"{where} must be a list of {{sub: ..., limits: ...}}, got {_kind(node)}")
    out: dict[str, Limits] = {}
    lines: dict[str, int] = {}
    for index, item in enumerate(node.value):
        sm = _map_node(item, f"{where}[{index}]", _SUBJECT_KEYS)
        sub_node = sm.require("sub")
        sub = _string(sub_node, sm.sub("sub"))
        if sub in lines:
            raise _Invalid(sub_node, f"duplicate subject '{sub[:64]}' in {where} (first at line {lines[sub]})")
        lines[sub] = _line(sub_node)
        out[sub] = _limits(sm.get("limits"), sm.sub("limits"))
    return out


def _jwks(node: Node, where: str, source: str) -> str:
    """The JWKS JSON: inline (text starting with '{'), or a file path relative to the policy file."""
    text = _string(node, where).strip()
    if not text.startswith("{"):
        path = Path(text) if Path(text).is_absolute() else Path(source).parent / text
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise _Invalid(node, f"{where}: cannot read JWKS file {str(path)!r}: {why}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _Invalid(node, f"{where} is not valid JSON: {exc}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
        raise _Invalid(node, f"{where} must be a JWKS: {{\"keys\": [{{\"kty\": ...}}, ...]}}")
    if any(k.get(private) is not None for k in keys for private in ("d", "p", "q")):
        raise _Invalid(node, f"{where} holds a private key: give only the public keys")
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)
