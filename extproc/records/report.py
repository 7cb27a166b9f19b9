"""Summaries of usage records: `tokenmeter usage report` (and the demo's older per-key table,
`summarize`/`format_table`, which `tokenmeter report` prints).

`usage_report` groups the ledger's records (extproc.records.ledger) by any of the dimensions
tenant, project, team, key, model and pool. Grouping by project also groups by tenant (project
names are per tenant), by team also by tenant and project. The model is the one that answered
(`response_model`), else the one asked for. Tokens are the disjoint priced kinds
(extproc.billing.token_kinds); cost is summed exactly per currency; `unpriced` counts requests
that used tokens but carry no cost.

Shadow mode: a request admitted only because the policy is in shadow mode (decision `shadow`)
would have been refused or alerted under enforce. Which one is the record's `decided_by.action`;
for records without it, the strictest action among its `alerts` scopes in the policy given
(`actions_of(policy)`), else it stays unclassified. `shadow_by_tenant` lists, per tenant, the
shadow requests and how many would have been throttled or blocked.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from extproc.billing import TokenKinds, money_str, record_cost, token_kinds, total_money
from extproc.records.record import Limit, UsageRecord
from extproc.settlement.outcome import Decision

__all__ = [
    "DIMENSIONS",
    "Row",
    "ShadowRow",
    "UsageReport",
    "UsageRow",
    "actions_of",
    "format_report",
    "format_table",
    "parse_dimensions",
    "shadow_action",
    "summarize",
    "text_table",
    "usage_report",
]

DIMENSIONS = ("tenant", "project", "team", "key", "model", "pool")
_PARENTS = {"project": ("tenant",), "team": ("tenant", "project")}
NONE = "(none)"


# -- the demo's per-key summary (`tokenmeter report`) -------------------------------------


@dataclass
class Row:
    tenant: str
    key_id: str
    admitted: int = 0
    throttled: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0
    pools: Counter[str] = field(default_factory=Counter)


def summarize(records: Iterable[UsageRecord]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = defaultdict(lambda: Row("", ""))
    for r in records:
        k = (r.tenant or "(unknown)", r.key_id or "(unknown key)")
        row = rows[k]
        row.tenant, row.key_id = k
        if r.decision.admitted:
            row.admitted += 1
            row.prompt_tokens += r.prompt_tokens
            row.completion_tokens += r.completion_tokens
            row.estimated += r.usage_source == "estimated"
            if r.pool:
                row.pools[r.pool] += 1
        elif r.decision in (Decision.THROTTLED, Decision.BLOCKED):
            row.throttled += 1
        else:
            row.refused += 1
    return sorted(rows.values(), key=lambda x: (x.tenant, x.key_id))


def format_table(rows: list[Row]) -> str:
    header = ("tenant", "key", "admitted", "throttled", "refused", "prompt tok", "completion tok", "pools")
    body = [
        (
            r.tenant,
            r.key_id,
            str(r.admitted),
            str(r.throttled),
            str(r.refused),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            " ".join(f"{p}={n}" for p, n in sorted(r.pools.items())) or "-",
        )
        for r in rows
    ]
    return text_table(header, body)


def text_table(header: Sequence[str], body: Sequence[Sequence[str]], *, right: Sequence[bool] = ()) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    flags = list(right) + [False] * (len(header) - len(right))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            (c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(cells, widths, flags, strict=True)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


# -- tokenmeter usage report -------------------------------------------------------------


def parse_dimensions(text: str) -> tuple[str, ...]:
    """"tenant,model" -> the dimensions to group by, parents added, in DIMENSIONS order; ValueError
    naming an unknown one."""
    wanted = {d.strip() for d in text.split(",") if d.strip()}
    if not wanted:
        raise ValueError(f"name at least one dimension ({', '.join(DIMENSIONS)})")
    unknown = sorted(wanted - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown dimension {', '.join(unknown)} (choose from: {', '.join(DIMENSIONS)})")
    for d in list(wanted):
        wanted.update(_PARENTS.get(d, ()))
    return tuple(d for d in DIMENSIONS if d in wanted)


def _value(rec: UsageRecord, dim: str) -> str:
    value = {
        "tenant": rec.tenant,
        "project": rec.project,
        "team": rec.team,
        "key": rec.key_id,
        "model": rec.response_model or rec.model,
        "pool": rec.pool,
    }[dim]
    return value or NONE


def actions_of(policy: Any) -> dict[str, str]:
    """Scope name -> action ("throttle", "block", "alert") of every scope of `policy`
    (extproc.policy.Policy), named as the limiter names them (extproc.service.admission)."""
    actions: dict[str, str] = {}
    for tenant in policy.tenants.values():
        actions[f"tenant:{tenant.name}"] = str(tenant.limits.action)
        for project in tenant.projects.values():
            actions[f"project:{tenant.name}/{project.name}"] = str(project.limits.action)
            for team in project.teams.values():
                actions[f"team:{tenant.name}/{project.name}/{team.name}"] = str(team.limits.action)
    for key in policy.keys_by_sha256.values():
        actions[f"key:{key.key_id}"] = str(key.limits.action)
    return actions


def shadow_action(rec: UsageRecord, actions: Mapping[str, str] | None = None) -> str | None:
    """What enforce mode would have done with a shadow-admitted request: "throttle", "block" or
    "alert"; None when not a shadow record, or when it cannot be told (no `decided_by` and no
    policy)."""
    if rec.decision is not Decision.SHADOW:
        return None
    if rec.decided_by is not None and rec.decided_by.action:
        return rec.decided_by.action
    if actions is None:
        return None
    strictest = Limit.strictest(rec.alerts, actions)
    return strictest.action if strictest is not None else "alert"


@dataclass
class UsageRow:
    keys: tuple[str, ...]
    requests: int = 0
    admitted: int = 0
    throttled: int = 0
    blocked: int = 0
    refused: int = 0  # every other refusal (auth, bad request, too large, backend, Envoy, ...)
    shadow: int = 0
    would_throttle: int = 0
    would_block: int = 0
    tokens: TokenKinds = field(default_factory=TokenKinds)
    estimated: int = 0  # requests whose tokens were estimated
    unpriced: int = 0  # requests that used tokens but carry no cost
    costs: dict[str, list[Decimal]] = field(default_factory=dict)  # currency -> costs

    def add(self, rec: UsageRecord, actions: Mapping[str, str] | None) -> None:
        self.requests += 1
        decision = rec.decision
        if decision.admitted:
            self.admitted += 1
        elif decision is Decision.THROTTLED:
            self.throttled += 1
        elif decision is Decision.BLOCKED:
            self.blocked += 1
        else:
            self.refused += 1
        if decision is Decision.SHADOW:
            self.shadow += 1
            action = shadow_action(rec, actions)
            self.would_throttle += action == "throttle"
            self.would_block += action == "block"
        kinds = token_kinds(rec)
        self.tokens += kinds
        self.estimated += rec.usage_source == "estimated"
        cost = record_cost(rec)
        if cost is None:
            self.unpriced += kinds.total > 0
        else:
            self.costs.setdefault(rec.currency or "", []).append(cost)

    def cost(self) -> dict[str, Decimal]:
        return {currency: total_money(values) for currency, values in sorted(self.costs.items())}


@dataclass
class ShadowRow:
    tenant: str
    shadow: int = 0
    would_throttle: int = 0
    would_block: int = 0
    would_alert: int = 0
    unclassified: int = 0  # no decided_by, and no policy to tell


@dataclass
class UsageReport:
    by: tuple[str, ...]
    rows: list[UsageRow]
    total: UsageRow
    shadow: list[ShadowRow]
    currencies: tuple[str, ...]


def usage_report(
    records: Iterable[UsageRecord], by: Sequence[str] = ("tenant",), *, actions: Mapping[str, str] | None = None
) -> UsageReport:
    """Group `records` by the dimensions `by` (at least one; see parse_dimensions); `actions`
    (actions_of(policy)) classifies shadow records that carry no decided_by."""
    if not by:
        raise ValueError("group by at least one dimension")
    rows: dict[tuple[str, ...], UsageRow] = {}
    total = UsageRow(keys=())
    shadow: dict[str, ShadowRow] = {}
    for rec in records:
        keys = tuple(_value(rec, d) for d in by)
        row = rows.get(keys)
        if row is None:
            row = rows[keys] = UsageRow(keys=keys)
        row.add(rec, actions)
        total.add(rec, actions)
        if rec.decision is Decision.SHADOW:
            tenant = rec.tenant or NONE
            s = shadow.get(tenant)
            if s is None:
                s = shadow[tenant] = ShadowRow(tenant)
            s.shadow += 1
            action = shadow_action(rec, actions)
            if action == "throttle":
                s.would_throttle += 1
            elif action == "block":
                s.would_block += 1
            elif action == "alert":
                s.would_alert += 1
            else:
                s.unclassified += 1
    currencies = tuple(sorted(total.costs))
    return UsageReport(tuple(by), [rows[k] for k in sorted(rows)], total,
                       [shadow[t] for t in sorted(shadow)], currencies)


_COUNTS = ("requests", "admitted", "throttled", "blocked", "refused", "shadow", "would_throttle", "would_block")
_TOKENS = ("input", "cached_input", "cache_write", "output", "reasoning")


def _cost_column(currency: str) -> str:
    return f"cost_{currency}" if currency else "cost"


def _fields(row: UsageRow, currencies: Sequence[str]) -> dict[str, Any]:
    """A row as plain values: counts and tokens as ints, costs as exact decimal strings."""
    out: dict[str, Any] = {name: getattr(row, name) for name in _COUNTS}
    for kind in _TOKENS:
        out[f"{kind}_tokens"] = getattr(row.tokens, kind)
    out["total_tokens"] = row.tokens.total
    out["estimated"] = row.estimated
    out["unpriced"] = row.unpriced
    cost = row.cost()
    for currency in currencies:
        out[_cost_column(currency)] = money_str(cost.get(currency, Decimal(0)))
    return out


def format_report(report: UsageReport, fmt: str) -> str:
    """The report as "table" (for a terminal), "csv" or "json"."""
    if fmt == "csv":
        return _report_csv(report)
    if fmt == "json":
        return _report_json(report)
    return _report_table(report)


def _report_csv(report: UsageReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    sample = _fields(report.total, report.currencies)
    writer.writerow([*report.by, *sample])
    for row in report.rows:
        writer.writerow([*row.keys, *_fields(row, report.currencies).values()])
    return buf.getvalue().rstrip("\n")


def _report_json(report: UsageReport) -> str:
    doc = {
        "by": list(report.by),
        "currencies": list(report.currencies),
        "rows": [{**dict(zip(report.by, row.keys, strict=True)), **_fields(row, report.currencies)}
                 for row in report.rows],
        "total": _fields(report.total, report.currencies),
        "shadow": [vars(s) for s in report.shadow],
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


def _report_table(report: UsageReport) -> str:
    cost_columns = [f"cost {c}".rstrip() for c in report.currencies]
    header = [*report.by, "requests", "admitted", "throttled", "blocked", "refused", "input", "cached",
              "cache write", "output", "reasoning", "total tok", "estimated", *cost_columns, "unpriced"]

    def cells(row: UsageRow, keys: Sequence[str]) -> list[str]:
        t = row.tokens
        cost = row.cost()
        return [*keys, *(str(v) for v in (row.requests, row.admitted, row.throttled, row.blocked, row.refused,
                                            t.input, t.cached_input, t.cache_write, t.output, t.reasoning,
                                            t.total, row.estimated)),
                *(money_str(cost.get(c, Decimal(0))) for c in report.currencies), str(row.unpriced)]

    body = [cells(row, row.keys) for row in report.rows]
    body.append(cells(report.total, ["total", *([""] * (len(report.by) - 1))]))
    right = [False] * len(report.by) + [True] * (len(header) - len(report.by))
    text = text_table(header, body, right=right)
    if report.shadow:
        shadow_header = ["tenant", "shadow", "would throttle", "would block", "would alert", "unclassified"]
        shadow_body = [[s.tenant, str(s.shadow), str(s.would_throttle), str(s.would_block), str(s.would_alert),
                        str(s.unclassified)] for s in report.shadow]
        text += "\n\nshadow mode: admitted, but enforce would have refused or alerted (per tenant)\n"
        text += text_table(shadow_header, shadow_body, right=[False, True, True, True, True, True])
        if any(s.unclassified for s in report.shadow):
            text += "\n(unclassified: records without decided_by; pass --policy FILE to classify them by its actions)"
    return text
