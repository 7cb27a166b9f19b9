"""A `limits` block as rules: the shorthand keys and `rules:` as `LimitRule`s, model names resolved,
percents of the parent's like rule resolved to numbers, ambiguous rules refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from extproc.limiter.types import Measure
from extproc.policy.errors import PolicyError
from extproc.policy.fields import percent_of
from extproc.policy.lines import Lines, Path, where
from extproc.policy.model import SHORTHAND, LimitRule, Limits, Period, shorthand_rule
from extproc.policy.schema import LimitsDoc, RuleDoc

# rule identity within a block: two rules alike in all of these are ambiguous
RuleKey = tuple[Measure, float | None, Period | None, frozenset[str] | None]


def rule_key(rule: LimitRule) -> RuleKey:
    return (rule.measure, rule.window_s, rule.period, rule.models)


@dataclass(frozen=True)
class Parent:
    """What a percent on this block is a share of: the parent scope's resolved limits."""

    limits: Limits
    name: str  # "tenant 'acme'", "project 'acme.chat'"


@dataclass(frozen=True)
class _Written:
    rule: LimitRule
    percent: int | None
    path: Path  # of the value (its line names the rule)


class LimitsBuilder:
    """Builds the `Limits` of every block of one policy, with `file:line: reason` errors."""

    def __init__(
        self, source: str, lines: Lines, resolve_models: Callable[[list[str], Path], frozenset[str]]
    ) -> None:
        self.source = source
        self.lines = lines
        self.resolve_models = resolve_models

    def fail(self, path: Path, reason: str) -> PolicyError:
        return PolicyError(self.source, self.lines.of(path), reason)

    def build(self, doc: LimitsDoc | None, path: Path, parent: Parent | None = None, *, shares: bool = False) -> Limits:
        """The block at `path`. `shares`: a percent is allowed here (a project or a team), of `parent`."""
        if doc is None:
            return Limits()
        written = [*self._shorthand(doc, path), *self._rules(doc, path)]
        resolved: list[LimitRule] = []
        seen: dict[RuleKey, Path] = {}
        for item in written:
            rule = item.rule
            if item.percent is not None:
                rule = self._share(item, parent if shares else None)
            key = rule_key(rule)
            if key in seen:
                raise self.fail(
                    item.path,
                    f"{where(item.path)}: a second rule for {rule.describe} in {where(path)} (the first is at line "
                    f"{self.lines.of(seen[key])}): give each measure, window or period, and models one limit",
                )
            seen[key] = item.path
            resolved.append(rule)
        return Limits(rules=tuple(resolved), action=doc.action)

    def _shorthand(self, doc: LimitsDoc, path: Path) -> list[_Written]:
        alerts = doc.alert_at or ()
        return [
            _Written(shorthand_rule(measure, value, window, doc.quota_period if calendar else None, doc.action,
                                    alerts), None, (*path, key))
            for key, measure, window, calendar in SHORTHAND
            if (value := getattr(doc, key)) is not None
        ]

    def _rules(self, doc: LimitsDoc, path: Path) -> list[_Written]:
        out: list[_Written] = []
        for index, rule_doc in enumerate(doc.rules or ()):
            here = (*path, "rules", index)
            out.append(self._rule(rule_doc, here, doc))
        return out

    def _rule(self, rule_doc: RuleDoc, path: Path, block: LimitsDoc) -> _Written:
        measure = rule_doc.measure
        value = rule_doc.value
        percent = percent_of(value)
        models = None
        if rule_doc.models is not None:
            models = self.resolve_models(rule_doc.models, (*path, "models"))
        period = rule_doc.period
        alert_at: tuple[int, ...] = ()
        if period is not None:
            alert_at = rule_doc.alert_at if rule_doc.alert_at is not None else (block.alert_at or ())
        rule = LimitRule(
            measure,
            value if isinstance(value, int) else 0,  # a percent: resolved against the parent
            window_s=float(rule_doc.window) if rule_doc.window is not None else None,
            period=period,
            models=models,
            action=rule_doc.action if rule_doc.action is not None else block.action,
            alert_at=alert_at,
        )
        return _Written(rule, percent, (*path, measure.value))

    def _share(self, item: _Written, parent: Parent | None) -> LimitRule:
        rule, percent = item.rule, item.percent
        assert percent is not None
        if parent is None:
            raise self.fail(
                item.path,
                f"{where(item.path)}: a percent is allowed only on a project (a share of its tenant's like rule) "
                "or a team (a share of its project's); give a number here",
            )
        key = rule_key(rule)
        match = next((r for r in parent.limits.rules if rule_key(r) == key), None)
        if match is None:
            raise self.fail(
                item.path,
                f"{where(item.path)}: {percent}% of what? {parent.name} has no rule for {rule.describe} "
                "(give it one with the same measure, window or period, and models; or give a number here)",
            )
        return replace(rule, limit=-(-percent * match.limit // 100))
