"""From a caller and a request to a limiter reservation: the scopes on the path and the estimate."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.limiter.types import PoolCeiling, ScopeLimit
from extproc.policy.model import Action, ApiKey, Limits, Mode, Policy


@dataclass(frozen=True, slots=True)
class ScopePath:
    scopes: tuple[ScopeLimit, ...]
    actions: dict[str, Action]  # scope name -> the action when it is over its limit
    mode: Mode = Mode.ENFORCE  # the key's tenant's mode, else the policy's: shadow never refuses


def _scope(name: str, limits: Limits, mode: Mode) -> ScopeLimit:
    enforce = mode is Mode.ENFORCE and limits.action is not Action.ALERT
    return ScopeLimit(
        scope=name,
        tokens_per_minute=limits.tokens_per_minute,
        requests_per_minute=limits.requests_per_minute,
        requests_per_hour=limits.requests_per_hour,
        quota_tokens=limits.quota_tokens,
        quota_requests=limits.quota_requests,
        quota_period=str(limits.quota_period),
        enforce=enforce,
    )


def scope_path(key: ApiKey, policy: Policy) -> ScopePath:
    """Tenant -> project -> team -> key: every level with limits is charged for the request.

    A team's usage counts against its project and tenant, so a project's quota is shared by its teams.
    """
    levels: list[tuple[str, Limits]] = []
    tenant = policy.tenants[key.tenant]
    mode = tenant.mode or policy.mode  # a tenant can be in shadow mode alone
    levels.append((f"tenant:{tenant.name}", tenant.limits))
    project = tenant.projects[key.project]
    levels.append((f"project:{tenant.name}/{project.name}", project.limits))
    if key.team is not None:
        team = project.teams[key.team]
        levels.append((f"team:{tenant.name}/{project.name}/{team.name}", team.limits))
    levels.append((f"key:{key.key_id}", key.limits))
    scopes = tuple(_scope(name, limits, mode) for name, limits in levels if not limits.empty)
    actions = {name: limits.action for name, limits in levels}
    return ScopePath(scopes=scopes, actions=actions, mode=mode)


def pool_ceilings(policy: Policy) -> tuple[PoolCeiling, ...]:
    return tuple(PoolCeiling(p.name, p.tokens_per_minute) for p in policy.pools)


def output_limit(max_output_tokens: int | None, policy: Policy) -> int:
    """The most one choice of the response may generate: the request's own bound, else the policy
    default, never above the policy cap. The forwarded request is bounded to it (the processor
    edits the body), so what is reserved is what can be generated."""
    rules = policy.request
    output = rules.default_max_tokens if max_output_tokens is None else max_output_tokens
    return min(output, rules.max_tokens_cap)


def reservation_tokens(
    prompt_estimate: int, max_output_tokens: int | None, policy: Policy, choices: int = 1
) -> int:
    """Prompt estimate plus the most the response may add: `output_limit` for each of the `n`
    choices asked for."""
    return prompt_estimate + output_limit(max_output_tokens, policy) * max(1, choices)
