"""Exports of the ledger that billing systems take: `tokenmeter usage export`.

Every export reads the ledger through extproc.records.ledger (folded by request id, in a time
range), and its totals equal the ledger's: the same tokens of every kind and, per currency, the same
cost to the last digit (costs are exact decimal strings, summed as decimals: `ledger_totals`).

* ``jsonl``: the folded records themselves, one JSON object per line (a ledger without duplicates).
* ``csv``: one row per request that used tokens (or has a cost), with FinOps FOCUS columns where
  they fit (`FOCUS_COLUMNS`): ChargePeriodStart / ChargePeriodEnd (RFC 3339 UTC: admission, and
  admission plus the duration), ChargeCategory "Usage", BilledCost = EffectiveCost = the record's
  cost (empty when it has none: `x_PriceMissing`), BillingCurrency, ConsumedQuantity =
  PricingQuantity = its tokens (ConsumedUnit = PricingUnit = "Tokens"), SkuId = model@pool (the
  served model, else the requested one), SkuPriceId = price version/SkuId, SubAccountId = the
  tenant, Tags = the tenant hierarchy as a JSON object ({"tenant", "project", "team", "key"});
  then `x_` columns (FOCUS's prefix for custom ones): the request id and the tokens by kind.
* ``cloudevents``: a JSON array of CloudEvents 1.0 in structured mode
  (application/cloudevents-batch+json, what OpenMeter's POST /api/v1/events takes as is), one per
  request that used tokens: ``id`` = the request id (a re-export is idempotent: the ingester
  deduplicates on id and source), ``source`` (default "tokenmeter"), ``type`` (default
  "tokenmeter.usage"), ``subject`` = the billed entity (the tenant by default; "tenant/project",
  "tenant/project/team" or the key id with --subject), ``time`` = admission time, ``data`` = the
  model, the pool, the tenant hierarchy, the tokens by kind (integers), the cost (a decimal string)
  and its currency and price version.

Requests without tokens or cost (refusals, errors that served nothing) are rows of the jsonl export
only: they add nothing to any total.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from extproc.billing import TokenKinds, money_str, record_cost, token_kinds, total_money
from extproc.records.ledger import iso_utc
from extproc.records.record import UsageRecord

__all__ = [
    "CLOUDEVENTS_REQUIRED",
    "FOCUS_COLUMNS",
    "SUBJECTS",
    "Totals",
    "billable",
    "cloudevent",
    "export_cloudevents",
    "export_csv",
    "export_jsonl",
    "ledger_totals",
    "subject_of",
]

FOCUS_COLUMNS = (
    "ChargePeriodStart", "ChargePeriodEnd", "ChargeCategory", "ChargeDescription", "BilledCost", "EffectiveCost",
    "BillingCurrency", "ConsumedQuantity", "ConsumedUnit", "PricingQuantity", "PricingUnit", "SkuId",
    "SkuPriceId", "SubAccountId", "Tags",
)
EXTRA_COLUMNS = (
    "x_RequestId", "x_Model", "x_RequestedModel", "x_Pool", "x_Api", "x_InputTokens", "x_CachedInputTokens",
    "x_CacheWriteTokens", "x_OutputTokens", "x_ReasoningTokens", "x_UsageSource", "x_PriceVersion",
    "x_PriceMissing", "x_Decision", "x_Ending",
)
CSV_COLUMNS = FOCUS_COLUMNS + EXTRA_COLUMNS
CLOUDEVENTS_REQUIRED = ("specversion", "id", "source", "type")  # CloudEvents 1.0 required attributes
SUBJECTS = ("tenant", "project", "team", "key")


@dataclass
class Totals:
    """What an export (or the ledger) adds up to."""

    records: int = 0
    tokens: TokenKinds = field(default_factory=TokenKinds)
    costs: dict[str, list[Decimal]] = field(default_factory=dict)
    unpriced: int = 0  # records that used tokens but carry no cost

    def add(self, kinds: TokenKinds, cost: Decimal | None, currency: str | None) -> None:
        self.records += 1
        self.tokens += kinds
        if cost is None:
            self.unpriced += kinds.total > 0
        else:
            self.costs.setdefault(currency or "", []).append(cost)

    def cost(self) -> dict[str, Decimal]:
        return {currency: total_money(values) for currency, values in sorted(self.costs.items())}

    def describe(self) -> str:
        cost = ", ".join(f"{money_str(v)} {c}".rstrip() for c, v in self.cost().items()) or "no cost"
        text = f"{self.records} records, {self.tokens.total} tokens, {cost}"
        return text + (f"; {self.unpriced} with tokens but no price" if self.unpriced else "")


def ledger_totals(records: Iterable[UsageRecord]) -> Totals:
    totals = Totals()
    for rec in records:
        totals.add(token_kinds(rec), record_cost(rec), rec.currency)
    return totals


def billable(rec: UsageRecord) -> bool:
    """A record that adds to a total: it used tokens, or it has a cost other than 0."""
    if token_kinds(rec).total > 0:
        return True
    cost = record_cost(rec)
    return cost is not None and cost != 0


def _model(rec: UsageRecord) -> str:
    return rec.response_model or rec.model or ""


def _sku(rec: UsageRecord) -> str:
    model = _model(rec) or "unknown"
    return f"{model}@{rec.pool}" if rec.pool else model


def _tags(rec: UsageRecord) -> dict[str, str]:
    tags = {"tenant": rec.tenant, "project": rec.project, "team": rec.team, "key": rec.key_id}
    return {k: v for k, v in tags.items() if v}


# -- jsonl ------------------------------------------------------------------------------


def export_jsonl(records: Iterable[UsageRecord]) -> Iterator[bytes]:
    for rec in records:
        yield rec.to_json() + b"\n"


# -- csv (FOCUS) ------------------------------------------------------------------------


def _csv_row(rec: UsageRecord) -> list[str]:
    kinds = token_kinds(rec)
    cost = rec.cost if rec.cost is not None else ""
    sku = _sku(rec)
    return [
        iso_utc(rec.time),
        iso_utc(rec.time + max(0.0, rec.duration_ms) / 1000),
        "Usage",
        f"{_model(rec) or 'unknown model'} tokens" + (f" on {rec.pool}" if rec.pool else ""),
        cost,
        cost,
        rec.currency or "",
        str(kinds.total),
        "Tokens",
        str(kinds.total),
        "Tokens",
        sku,
        f"{rec.price_version}/{sku}" if rec.price_version and rec.cost is not None else "",
        rec.tenant or "",
        orjson.dumps(_tags(rec), option=orjson.OPT_SORT_KEYS).decode(),
        rec.request_id,
        _model(rec),
        rec.model or "",
        rec.pool or "",
        rec.api or "",
        str(kinds.input),
        str(kinds.cached_input),
        str(kinds.cache_write),
        str(kinds.output),
        str(kinds.reasoning),
        rec.usage_source,
        rec.price_version or "",
        "true" if rec.price_missing or (rec.cost is None and kinds.total > 0) else "false",
        str(rec.decision),
        str(rec.ending),
    ]


def export_csv(records: Iterable[UsageRecord], totals: Totals | None = None) -> Iterator[str]:
    """The CSV, a line at a time (header first); adds what it exports to `totals`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")

    def take() -> str:
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    writer.writerow(CSV_COLUMNS)
    yield take()
    for rec in records:
        if not billable(rec):
            continue
        if totals is not None:
            totals.add(token_kinds(rec), record_cost(rec), rec.currency)
        writer.writerow(_csv_row(rec))
        yield take()


# -- CloudEvents ------------------------------------------------------------------------


def subject_of(rec: UsageRecord, level: str = "tenant") -> str:
    """The billed entity at `level`: "acme", "acme/web", "acme/web/search" (a key without a team:
    its project), or the key id."""
    tenant = rec.tenant or "(none)"
    if level == "key":
        return rec.key_id or "(none)"
    if level == "tenant":
        return tenant
    path = [tenant, rec.project or "(none)"]
    if level == "team" and rec.team:
        path.append(rec.team)
    return "/".join(path)


def cloudevent(rec: UsageRecord, *, source: str = "tokenmeter", type_: str = "tokenmeter.usage",
               subject: str = "tenant") -> dict[str, Any]:
    kinds = token_kinds(rec)
    data: dict[str, Any] = {
        "model": _model(rec) or None,
        "requested_model": rec.model,
        "pool": rec.pool,
        "api": rec.api,
        "tenant": rec.tenant,
        "project": rec.project,
        "team": rec.team,
        "key_id": rec.key_id,
        "input_tokens": kinds.input,
        "cached_input_tokens": kinds.cached_input,
        "cache_write_tokens": kinds.cache_write,
        "output_tokens": kinds.output,
        "reasoning_tokens": kinds.reasoning,
        "total_tokens": kinds.total,
        "usage_source": rec.usage_source,
        "cost": rec.cost,
        "currency": rec.currency,
        "price_version": rec.price_version,
        "decision": str(rec.decision),
    }
    return {
        "specversion": "1.0",
        "id": rec.request_id,
        "source": source,
        "type": type_,
        "subject": subject_of(rec, subject),
        "time": iso_utc(rec.time),
        "datacontenttype": "application/json",
        "data": data,
    }


def export_cloudevents(records: Iterable[UsageRecord], totals: Totals | None = None, **options: str) -> Iterator[bytes]:
    """A JSON array of events (application/cloudevents-batch+json), a piece at a time; adds what it
    exports to `totals`. `options`: source, type_, subject (see cloudevent)."""
    yield b"["
    first = True
    for rec in records:
        if not billable(rec):
            continue
        if totals is not None:
            totals.add(token_kinds(rec), record_cost(rec), rec.currency)
        yield (b"\n" if first else b",\n") + orjson.dumps(cloudevent(rec, **options))
        first = False
    yield b"]\n" if first else b"\n]\n"
