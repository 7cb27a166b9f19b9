"""What a request cost: its tokens by kind times the catalog's rates, in exact decimals.

The kinds are disjoint, so nothing is charged twice (extproc.metering.usage.Usage counts cache
reads and cache writes inside the prompt, and reasoning inside the completion):

    input        = prompt_tokens - cached_tokens - cache_write_tokens   at the input rate
    cached_input = cached_tokens                                        at the cached_input rate
    cache_write  = cache_write_tokens                                   at the cache_write rate
    output       = completion_tokens - reasoning_tokens                 at the output rate
    reasoning    = reasoning_tokens                                     at the reasoning rate

(A part a server reports larger than its whole is clamped to the whole: the kinds always add up to
prompt + completion.) Rates are per million tokens. A cost is computed in integers (the rates
scaled by their decimal places: `Rates.units`), so it is exact and cheap on the settlement path; sums
of costs (reports, exports) are `Decimal` under `MONEY`, a context that raises rather than rounds
(`Inexact`), so an export's total equals the ledger's to the last digit. On a record a cost is a
string ("0.000412", fixed-point, no exponent, no trailing zeros: `money_str`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, localcontext
from typing import TYPE_CHECKING

from extproc.billing.catalog import PriceCatalog, Rates

if TYPE_CHECKING:
    from extproc.policy.model import Policy
    from extproc.records.record import UsageRecord

__all__ = [
    "MONEY",
    "TokenKinds",
    "cost_of",
    "money_str",
    "parse_money",
    "price",
    "price_warnings",
    "record_cost",
    "token_kinds",
    "total_money",
]

# Exact decimal arithmetic: 60 significant digits, and an error rather than a rounding.
MONEY = Context(prec=60, traps=[Inexact, InvalidOperation, Overflow])
_MILLION_DIGITS = 6  # rates are per million tokens


@dataclass(frozen=True, slots=True)
class TokenKinds:
    """A record's tokens as the disjoint kinds that are priced."""

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.cache_write + self.output + self.reasoning

    def __add__(self, other: TokenKinds) -> TokenKinds:
        return TokenKinds(
            self.input + other.input, self.cached_input + other.cached_input,
            self.cache_write + other.cache_write, self.output + other.output, self.reasoning + other.reasoning,
        )


def token_kinds(rec: UsageRecord) -> TokenKinds:
    prompt, completion = max(0, rec.prompt_tokens), max(0, rec.completion_tokens)
    cached = min(max(0, rec.cached_tokens), prompt)
    cache_write = min(max(0, rec.cache_write_tokens), prompt - cached)
    reasoning = min(max(0, rec.reasoning_tokens), completion)
    return TokenKinds(prompt - cached - cache_write, cached, cache_write, completion - reasoning, reasoning)


def _cost_units(kinds: TokenKinds, rates: Rates) -> int:
    """The cost in units of 10^-(rates.scale + 6): integer arithmetic, exact."""
    a, b, c, d, e = rates.units
    return (a * kinds.input + b * kinds.cached_input + c * kinds.cache_write + d * kinds.output
            + e * kinds.reasoning)


def cost_of(kinds: TokenKinds, rates: Rates) -> Decimal:
    """The exact cost of `kinds` at `rates` (per million tokens)."""
    return Decimal(f"{_cost_units(kinds, rates)}E-{rates.scale + _MILLION_DIGITS}")  # exact: no context


def _fixed(units: int, places: int) -> str:
    """units x 10^-places, fixed-point without trailing zeros."""
    sign, digits = ("-", str(-units)) if units < 0 else ("", str(units))
    if places <= 0:
        return sign + digits + "0" * -places if units else "0"
    digits = digits.rjust(places + 1, "0")
    whole, fraction = digits[:-places], digits[-places:].rstrip("0")
    text = f"{whole}.{fraction}" if fraction else whole
    return "0" if text == "0" else sign + text


def money_str(value: Decimal) -> str:
    """Fixed-point, no exponent, no trailing zeros: "0.000412", "12", "0"."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite amount: {value}")
    units = int("".join(map(str, digits)) or "0")
    return _fixed(-units if sign else units, -exponent)


def parse_money(text: str) -> Decimal:
    """A cost string of a record; ValueError unless a finite, non-negative decimal."""
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError):
        raise ValueError(f"not a decimal number: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative finite number: {text!r}")
    return value


def record_cost(rec: UsageRecord) -> Decimal | None:
    """The record's cost as a Decimal; None when it has none."""
    return parse_money(rec.cost) if rec.cost is not None else None


def total_money(values: Iterable[Decimal]) -> Decimal:
    """The exact sum (raises decimal.Inexact rather than round)."""
    with localcontext(MONEY):
        return sum(values, Decimal(0))


def price(rec: UsageRecord, catalog: PriceCatalog | None) -> None:
    """Fill the record's `cost`, `currency`, `price_version` and `price_missing` from `catalog`
    (the live policy's `prices`); call it when the record is written, after its tokens are set.

    Without a catalog nothing is set (cost stays None). The model priced is the served one
    (`response_model`) when the catalog lists it, else the requested one (`model`), else the
    catalog's `default`, on the record's pool. A record without tokens costs "0" whatever its model;
    one with tokens that nothing prices gets cost None and `price_missing`."""
    if catalog is None:
        return
    rec.currency, rec.price_version = catalog.currency, catalog.version
    kinds = token_kinds(rec)
    rates = catalog.rates_for((rec.response_model, rec.model), rec.pool)
    if rates is None:
        rec.cost, rec.price_missing = ("0", False) if kinds.total == 0 else (None, True)
        return
    rec.cost, rec.price_missing = _fixed(_cost_units(kinds, rates), rates.scale + _MILLION_DIGITS), False


def price_warnings(policy: Policy) -> list[str]:
    """What `tokenmeter policy check` warns about prices: no catalog, or models the policy serves
    (its `models`) that nothing prices (their records would get no cost)."""
    catalog = policy.prices
    if catalog is None:
        return ["no prices section: usage records will carry no cost"]
    return [
        f"model '{model}' has no price in prices.models and there is no prices.default: "
        "its records will get no cost (price_missing)"
        for model in sorted(policy.models)
        if not catalog.priced(model)
    ]
