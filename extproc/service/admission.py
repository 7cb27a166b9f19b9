"""From a caller and a request to a limiter reservation: the scopes on the path and the estimate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from extproc.limiter.calendar import Calendar
from extproc.limiter.types import PoolCeiling, Rule, ScopeLimit
from extproc.policy.model import Action, ApiKey, LimitRule, Limits, Mode, Period, Policy


class ScopePath:
    """The scopes a caller's requests are charged to (tenant -> project -> team -> key) and their rules.

    A rule narrowed to some models counts only requests for those: `for_model` gives the limiter's
    scopes for one canonical model name, computed once per model.
    """

    __slots__ = ("_by_model", "_named", "actions", "levels", "mode")

    def __init__(self, levels: tuple[tuple[str, tuple[LimitRule, ...], Calendars], ...], actions: dict[str, Action],
                 mode: Mode) -> None:
        self.levels = levels
        self.actions = actions  # scope name -> the action of a rule that names none
        self.mode = mode  # the key's tenant's mode, else the policy's: shadow never refuses
        self._by_model: dict[str, tuple[tuple[ScopeLimit, ...], dict[str, tuple[LimitRule, ...]]]] = {}
        # the models some rule is narrowed to: any other model (a client's choice) is narrowed alike
        self._named = frozenset(m for _, rules, _ in levels for r in rules if r.models is not None for m in r.models)

    def for_model(self, model: str) -> tuple[ScopeLimit, ...]:
        return self._narrowed(model)[0]

    def rule(self, model: str, scope: str, index: int | None) -> LimitRule | None:
        """The policy rule behind a limiter decision's (scope, rule index) for requests of `model`."""
        rules = self._narrowed(model)[1].get(scope)
        if rules is None or index is None or not 0 <= index < len(rules):
            return None
        return rules[index]

    def action(self, model: str, scope: str, index: int | None) -> Action:
        return self._action(self.rule(model, scope, index), scope)

    def _action(self, rule: LimitRule | None, scope: str) -> Action:
        """A rule's action; without one, the action of the scope's block."""
        return rule.action if rule is not None else self.actions.get(scope, Action.THROTTLE)

    def strictest(
        self, model: str, over: tuple[tuple[str, int, int], ...]
    ) -> tuple[str, LimitRule | None, Action] | None:
        """In shadow mode: of the rules over their limits (Decision.over), the one whose action is the
        strictest (block, then throttle); None when each would only have alerted."""
        best: tuple[str, LimitRule | None, Action] | None = None
        for scope, index, _ in over:
            rule = self.rule(model, scope, index)
            action = self._action(rule, scope)
            if _STRICTNESS[action] > (_STRICTNESS[best[2]] if best is not None else 0):
                best = (scope, rule, action)
        return best

    def _narrowed(self, model: str) -> tuple[tuple[ScopeLimit, ...], dict[str, tuple[LimitRule, ...]]]:
        if model not in self._named:
            model = OTHER_MODEL  # cached once, whatever the name
        out = self._by_model.get(model)
        if out is None:
            enforce = self.mode is Mode.ENFORCE
            scopes: list[ScopeLimit] = []
            behind: dict[str, tuple[LimitRule, ...]] = {}
            for name, rules, calendars in self.levels:
                mine = tuple(r for r in rules if r.applies_to(model))
                if mine:
                    scopes.append(ScopeLimit(name, tuple(_rule(r, calendars) for r in mine), enforce))
                    behind[name] = mine
            out = self._by_model[model] = (tuple(scopes), behind)
        return out


# Stands for every model no rule (or pool) names: they are all narrowed, and routed, alike. Not a
# model name a policy can list (the NUL), so a client's name is never cached as a key.
OTHER_MODEL = "\x00other"


@dataclass(frozen=True, slots=True)
class Calendars:
    """The tenant's billing calendar: its time zone and the day its months start."""

    time_zone: str = "UTC"
    anchor_day: int = 1

    def of(self, period: Period) -> Calendar:
        anchor = self.anchor_day if period is Period.MONTH else 1
        return Calendar(period.value, self.time_zone, anchor)


def rule_kind(rule: LimitRule) -> str:
    """The limiter's denied_kind for a violation of `rule` ("output_tokens", "quota_requests", ...)."""
    if rule.period is not None:
        return f"quota_{rule.measure.value}"
    return rule.measure.value


_STRICTNESS = {Action.ALERT: 0, Action.THROTTLE: 1, Action.BLOCK: 2}


def model_group(models: frozenset[str]) -> str:
    """A counter's model group: the model's name, or a short digest of several (stable across reloads)."""
    names = sorted(models)
    joined = "+".join(names)
    if len(joined) <= 64:
        return joined
    return "g" + hashlib.sha256(joined.encode()).hexdigest()[:16]


def _rule(rule: LimitRule, calendars: Calendars) -> Rule:
    return Rule(
        measure=rule.measure,
        limit=rule.limit,
        window_s=rule.window_s,
        calendar=calendars.of(rule.period) if rule.period is not None else None,
        enforce=rule.action is not Action.ALERT,
        alert_at=rule.alert_at,
        group=model_group(rule.models) if rule.models is not None else "",
    )


def scope_path(key: ApiKey, policy: Policy) -> ScopePath:
    """Tenant -> project -> team -> key: every level with limits is charged for the request.

    A team's usage counts against its project and tenant, so a project's quota is shared by its teams.
    """
    levels: list[tuple[str, Limits]] = []
    tenant = policy.tenants[key.tenant]
    mode = tenant.mode or policy.mode  # a tenant can be in shadow mode alone
    calendars = Calendars(tenant.time_zone, tenant.billing_anchor_day)
    levels.append((f"tenant:{tenant.name}", tenant.limits))
    project = tenant.projects[key.project]
    levels.append((f"project:{tenant.name}/{project.name}", project.limits))
    if key.team is not None:
        team = project.teams[key.team]
        levels.append((f"team:{tenant.name}/{project.name}/{team.name}", team.limits))
    levels.append((f"key:{key.key_id}", key.limits))
    actions = {name: limits.action for name, limits in levels}
    return ScopePath(tuple((name, limits.rules, calendars) for name, limits in levels if not limits.empty),
                     actions, mode)


def pool_ceilings(policy: Policy, model: str = "", tenant: str = "", project: str = "") -> tuple[PoolCeiling, ...]:
    """The pools a request may go to, in preference order: those serving `model` ("": every pool), each
    with the caller's fair share of it (its project's share, else its tenant's) and the others'."""
    out: list[PoolCeiling] = []
    for pool in policy.pools:
        if model and not pool.serves(model):
            continue
        owner = f"{tenant}/{project}" if f"{tenant}/{project}" in pool.shares else tenant
        share = pool.shares.get(owner)
        if share is None:
            owner = ""
        others = tuple((name, s.guaranteed) for name, s in pool.shares.items() if name != owner and s.guaranteed)
        out.append(PoolCeiling(
            pool.name, pool.tokens_per_minute, hysteresis=policy.routing.hysteresis, owner=owner,
            guaranteed=share.guaranteed if share is not None else 0,
            maximum=share.maximum if share is not None else None, others=others,
        ))
    return tuple(out)


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
