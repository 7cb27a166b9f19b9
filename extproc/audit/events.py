"""The audit events: what goes on the record, built from typed values.

Record an event with ``log.record(event)`` (or ``sink.append(event.type, **event.fields)``). The fields
are exactly what these constructors put in: no raw key, no key digest, no request content. Every string
is bounded (`MAX_STRING` characters), every list of names to `MAX_ITEMS` entries (with the full count),
so a client- or file-chosen value never makes a line unbounded.

This module reads `extproc.policy.model` values by attribute only and imports it for type checking
only: `extproc.policy.watch` imports this module, and the policy package must not import itself back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from extproc.policy.loader import PolicyError
    from extproc.policy.model import LimitRule, Limits, Policy

MAX_STRING = 256
MAX_ITEMS = 200

POLICY_LOADED = "policy_loaded"
POLICY_REJECTED = "policy_rejected"
ENFORCEMENT = "enforcement"
BREAKER = "breaker"
EVENTS_DROPPED = "events_dropped"  # written by the log itself
TORN_LINE_DISCARDED = "torn_line_discarded"  # written by the log itself


class EnforcementKind(StrEnum):
    THROTTLE = "throttle"  # 429: over a limit whose action is throttle
    BLOCK = "block"  # 403: over a limit whose action is block
    ALERT = "alert"  # admitted over a limit whose action is alert (or in shadow mode)
    DEGRADED_ADMISSION = "degraded_admission"  # admitted without the shared limiter (Redis down or slow)
    REFUSED_BACKEND = "refused_backend"  # 503: the shared limiter is unavailable and the policy fails closed


class BreakerState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class AuditEvent:
    type: str
    fields: Mapping[str, Any]


def bounded(text: object, limit: int = MAX_STRING) -> str:
    """`text` as a string of at most `limit` characters (cut ones end in '…')."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _file(path: str | Path) -> str:
    return bounded(os.path.abspath(path), 1024)


def _opt(text: object | None) -> str | None:
    return None if text is None else bounded(text)


# -- policy ----------------------------------------------------------------------------------


def policy_loaded(
    policy: Policy, path: str | Path, previous: Policy | None, *, file_sha256: str | None
) -> AuditEvent:
    """A policy took effect: its version, the SHA-256 of the file's bytes, and what changed since
    `previous` (None: the first load, where everything counts as added)."""
    return AuditEvent(
        POLICY_LOADED,
        {
            "version": bounded(policy.version),
            "previous_version": None if previous is None else bounded(previous.version),
            "file": _file(path),
            "file_sha256": file_sha256,
            "mode": str(policy.mode),
            "counts": _counts(policy),
            "changes": policy_changes(previous, policy),
        },
    )


def policy_rejected(
    path: str | Path, error: PolicyError, *, kept_version: str | None = None, file_sha256: str | None = None
) -> AuditEvent:
    """An edit of the policy file was refused (`error` names file, line, reason); `kept_version` stays."""
    return AuditEvent(
        POLICY_REJECTED,
        {
            "file": _file(path),
            "line": error.line,
            "reason": bounded(error.reason),
            "kept_version": _opt(kept_version),
            "file_sha256": file_sha256,
        },
    )


def policy_changes(old: Policy | None, new: Policy) -> dict[str, Any]:
    """What changed from `old` to `new`; only the kinds of change that happened are present.

    Scopes are named as the limiter names them: tenant:T, project:T/P, team:T/P/M, key:ID. Keys are
    named by id only (never their digest). Changed values are [old, new] pairs (null: unlimited).
    """
    out: dict[str, Any] = {}
    if old is not None and old.mode != new.mode:
        out["mode"] = [str(old.mode), str(new.mode)]
    old_scopes = _scopes(old) if old is not None else {}
    new_scopes = _scopes(new)
    for kind in ("tenant", "project", "team", "key", "subject"):
        before = {name for (k, name) in old_scopes if k == kind}
        after = {name for (k, name) in new_scopes if k == kind}
        _names(out, f"{kind}s_added", after - before)
        _names(out, f"{kind}s_removed", before - after)
    limits: dict[str, Any] = {}
    for scope in sorted(old_scopes.keys() & new_scopes.keys()):
        diff = _limits_diff(old_scopes[scope], new_scopes[scope])
        if diff:
            limits[bounded(f"{scope[0]}:{scope[1]}")] = diff
    _mapping(out, "limits_changed", limits)
    if old is not None:
        _key_changes(out, old, new)
        _pool_changes(out, old, new)
        _tenant_changes(out, old, new)
        routing = _fields_diff(old.routing, new.routing)
        if routing:
            out["routing_changed"] = routing
        request = _fields_diff(old.request, new.request)
        if request:
            out["request_changed"] = request
        _names(out, "models_added", new.models - old.models)
        old_aliases, new_aliases = getattr(old, "aliases", {}), getattr(new, "aliases", {})
        if old_aliases != new_aliases:  # which client names now mean which model
            _mapping(out, "aliases_changed", {
                bounded(a): [old_aliases.get(a), new_aliases.get(a)]
                for a in sorted(set(old_aliases) | set(new_aliases)) if old_aliases.get(a) != new_aliases.get(a)})
        _names(out, "models_removed", old.models - new.models)
        # the price catalog (if the policy has one): changed -> its versions before and after
        old_prices, new_prices = getattr(old, "prices", None), getattr(new, "prices", None)
        if old_prices != new_prices:
            out["prices_changed"] = [_catalog_version(old_prices), _catalog_version(new_prices)]
    return out


def _catalog_version(catalog: object) -> str | None:
    return None if catalog is None else bounded(getattr(catalog, "version", "?"))


def _counts(policy: Policy) -> dict[str, int]:
    projects = sum(len(t.projects) for t in policy.tenants.values())
    teams = sum(len(p.teams) for t in policy.tenants.values() for p in t.projects.values())
    return {
        "tenants": len(policy.tenants),
        "projects": projects,
        "teams": teams,
        "keys": len(policy.keys_by_sha256),
        "pools": len(policy.pools),
    }


def _scopes(policy: Policy) -> dict[tuple[str, str], Limits]:
    out: dict[tuple[str, str], Limits] = {}
    for tenant in policy.tenants.values():
        out["tenant", tenant.name] = tenant.limits
        for project in tenant.projects.values():
            out["project", f"{tenant.name}/{project.name}"] = project.limits
            for team in project.teams.values():
                out["team", f"{tenant.name}/{project.name}/{team.name}"] = team.limits
    for key in policy.keys_by_sha256.values():
        out["key", key.key_id] = key.limits
    # principals the policy gives limits of their own without a key: as their key ids read
    for provider in policy.identity.jwt:
        for sub, limits in provider.subjects.items():
            out["subject", f"jwt:{provider.name}:{sub}"] = limits
    trusted = policy.identity.trusted_headers
    if trusted is not None:
        for sub, limits in trusted.subjects.items():
            out["subject", f"hdr:{trusted.name}:{sub}"] = limits
    return out


def _tenant_changes(out: dict[str, Any], old: Policy, new: Policy) -> None:
    """A tenant's billing calendar (time zone, anchor day) and its own mode: [old, new] per tenant."""
    calendars: dict[str, Any] = {}
    modes: dict[str, Any] = {}
    for name in sorted(old.tenants.keys() & new.tenants.keys()):
        a, b = old.tenants[name], new.tenants[name]
        if (a.time_zone, a.billing_anchor_day) != (b.time_zone, b.billing_anchor_day):
            calendars[bounded(name)] = [[a.time_zone, a.billing_anchor_day], [b.time_zone, b.billing_anchor_day]]
        if a.mode != b.mode:
            modes[bounded(name)] = [_plain(a.mode), _plain(b.mode)]
    _mapping(out, "calendars_changed", calendars)
    _mapping(out, "tenant_modes_changed", modes)


def _limits_diff(old: Limits, new: Limits) -> dict[str, list[Any]]:
    """What changed in one scope's limits: its default action, and each rule's limit (null: no such
    rule), its own action and its alert thresholds. A rule is named by what it counts, over what and
    for which models, in the shorthand's words where it has one: "tokens_per_minute",
    "quota_tokens_per_month", "output_tokens_per_5m[llama-3.1-70b]", "concurrent_requests"."""
    out: dict[str, list[Any]] = {}
    if old.action != new.action:
        out["action"] = [_plain(old.action), _plain(new.action)]
    before = {_rule_name(rule): rule for rule in old.rules}
    after = {_rule_name(rule): rule for rule in new.rules}
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        if a is None or b is None or a.limit != b.limit:
            out[bounded(name)] = [None if a is None else a.limit, None if b is None else b.limit]
        if a is None or b is None:
            continue
        # an action that follows its block's is reported once, as the block's
        if a.action != b.action and (a.action, b.action) != (old.action, new.action):
            out[bounded(f"{name} action")] = [_plain(a.action), _plain(b.action)]
        if a.alert_at != b.alert_at:
            out[bounded(f"{name} alert_at")] = [_plain(a.alert_at), _plain(b.alert_at)]
    return out


def _rule_name(rule: LimitRule) -> str:
    from extproc.policy.model import window_text  # (the policy package imports this module)

    measure = str(rule.measure)
    if measure == "concurrent":
        name = "concurrent_requests"
    elif rule.period is not None:
        name = f"quota_{measure}_per_{rule.period}"
    else:
        name = f"{measure}_per_{window_text(float(rule.window_s or 0))}"
    if rule.models is not None:
        name += f"[{','.join(sorted(rule.models))}]"
    return name


def _fields_diff(old: Any, new: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            out[f.name] = [_plain(a), _plain(b)]
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value[:MAX_ITEMS]]
    if isinstance(value, frozenset | set):  # a key's model allow-list
        return [_plain(v) for v in sorted(value)[:MAX_ITEMS]]
    if isinstance(value, Mapping):  # a pool's shares
        return {bounded(str(k)): _plain(v) for k, v in list(value.items())[:MAX_ITEMS]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # one share
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return bounded(value)


def _key_changes(out: dict[str, Any], old: Policy, new: Policy) -> None:
    before = {k.key_id: k for k in old.keys_by_sha256.values()}
    after = {k.key_id: k for k in new.keys_by_sha256.values()}
    rotated, moved, lifecycle = [], {}, {}
    for key_id in sorted(before.keys() & after.keys()):
        a, b = before[key_id], after[key_id]
        if a.sha256 != b.sha256:
            rotated.append(key_id)  # the digest itself is never recorded
        if (a.tenant, a.project, a.team) != (b.tenant, b.project, b.team):
            moved[bounded(key_id)] = [_owner(a.tenant, a.project, a.team), _owner(b.tenant, b.project, b.team)]
        changed = {name: [_plain(getattr(a, name)), _plain(getattr(b, name))] for name in _LIFECYCLE
                   if getattr(a, name) != getattr(b, name)}
        if changed:  # disabled or enabled, its validity window moved
            lifecycle[bounded(key_id)] = changed
    _names(out, "keys_rotated", rotated)
    _mapping(out, "keys_moved", moved)
    _mapping(out, "keys_lifecycle_changed", lifecycle)


_LIFECYCLE = ("disabled", "disabled_reason", "not_before", "expires", "models")



def _owner(tenant: str, project: str, team: str | None) -> str:
    return bounded("/".join(p for p in (tenant, project, team) if p is not None))


def _pool_changes(out: dict[str, Any], old: Policy, new: Policy) -> None:
    before = {p.name: p for p in old.pools}
    after = {p.name: p for p in new.pools}
    _names(out, "pools_added", after.keys() - before.keys())
    _names(out, "pools_removed", before.keys() - after.keys())
    changed = {}
    for name in sorted(before.keys() & after.keys()):
        diff = _fields_diff(before[name], after[name])
        if diff:
            changed[bounded(name)] = diff
    _mapping(out, "pools_changed", changed)
    old_order = [p.name for p in old.pools if p.name in after]
    new_order = [p.name for p in new.pools if p.name in before]
    if old_order != new_order:
        out["pools_order"] = [_plain([p.name for p in old.pools]), _plain([p.name for p in new.pools])]


def _names(out: dict[str, Any], label: str, names: Iterable[str]) -> None:
    items = sorted(names)
    if not items:
        return
    out[label] = [bounded(n) for n in items[:MAX_ITEMS]]
    if len(items) > MAX_ITEMS:
        out[f"{label}_total"] = len(items)


def _mapping(out: dict[str, Any], label: str, values: Mapping[str, Any]) -> None:
    if not values:
        return
    names = list(values)
    out[label] = {n: values[n] for n in names[:MAX_ITEMS]}
    if len(names) > MAX_ITEMS:
        out[f"{label}_total"] = len(names)


# -- enforcement -----------------------------------------------------------------------------


def enforcement(
    kind: EnforcementKind | str,
    request_id: str,
    tenant: str | None,
    project: str | None,
    key_id: str | None,
    scope: str | None,
    limit_kind: str | None,
    policy_version: str | None,
) -> AuditEvent:
    """A request throttled, blocked, let through with an alert, admitted degraded or refused because
    the limiter is unavailable. `scope` is the limiter's scope name (e.g. "key:acme-web", "pool"),
    `limit_kind` the limiter's denied_kind ("tokens", "requests", "quota_tokens", ...)."""
    return AuditEvent(
        ENFORCEMENT,
        {
            "kind": str(EnforcementKind(kind)),
            "request_id": bounded(request_id),
            "tenant": _opt(tenant),
            "project": _opt(project),
            "key_id": _opt(key_id),
            "scope": _opt(scope),
            "limit_kind": _opt(limit_kind),
            "policy_version": _opt(policy_version),
        },
    )


def breaker(state: BreakerState | str, reason: str, *, backend: str = "redis") -> AuditEvent:
    """The limiter's circuit breaker opened (admission no longer waits on the backend) or closed."""
    return AuditEvent(BREAKER, {"state": str(BreakerState(state)), "reason": bounded(reason),
                                "backend": bounded(backend)})
