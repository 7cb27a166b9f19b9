"""The price catalog: prices per model and pool, per million tokens of each kind, in one currency.

Written in the policy's `prices` section (extproc.policy.loader validates it):

    prices:
      version: "2026-11"          # named on every record it prices (price_version)
      currency: USD               # ISO 4217
      models:
        llama-3.1-8b: {input: 0.15, output: 0.60}
        claude-sonnet:
          input: 3.00
          cached_input: 0.30      # default: input
          cache_write: 3.75       # default: input
          output: 15.00
          reasoning: 15.00        # default: output
          pools:
            cheap: {input: 1.00, output: 5.00}   # overrides on that pool
      default: {input: 0.50, output: 1.50}        # any model not listed (optional)

Every rate is a non-negative decimal number of `currency` per million tokens, kept as a Decimal
from the YAML text (never through a float). `input` and `output` are required for each model (and
for `default`); `cached_input` and `cache_write` default to the input rate and `reasoning` to the
output rate. A pool override replaces the rates it names; a derived rate it does not name keeps the
model's own explicit value, else follows the effective input (or output) rate.

This module is a leaf (no imports from the rest of the project): the policy model holds a catalog.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

__all__ = ["RATE_KINDS", "ModelPrices", "PriceCatalog", "RateOverride", "Rates"]

# The kinds of tokens a catalog prices, in the order records and exports list them.
RATE_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")


@dataclass(frozen=True, slots=True)
class Rates:
    """The effective rates of one model on one pool, per million tokens: every kind resolved.

    `scale` and `units`: the five rates as integers of 10^-scale (scale: the most decimal places of
    any of them), so that a cost is integer arithmetic, exact and fast (extproc.billing.cost)."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    scale: int = field(init=False, repr=False, compare=False)
    units: tuple[int, int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = (self.input, self.cached_input, self.cache_write, self.output, self.reasoning)
        scale = max(max(0, -_exponent(r)) for r in rates)
        a, b, c, d, e = (_as_units(r, scale) for r in rates)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "units", (a, b, c, d, e))


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int), "rates are finite"
    return exponent


def _as_units(value: Decimal, scale: int) -> int:
    """`value` * 10^scale as an int, exactly (scale is at least its decimal places)."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    shift = exponent + scale
    assert shift >= 0
    n = int("".join(map(str, digits)) or "0") * int(10**shift)
    return -n if sign else n


@dataclass(frozen=True, slots=True)
class RateOverride:
    """Rates as written (a model entry, or a pool's overrides): None where not given."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    output: Decimal | None = None
    reasoning: Decimal | None = None

    def over(self, base: RateOverride) -> RateOverride:
        """These rates where given, else `base`'s."""
        return RateOverride(
            input=self.input if self.input is not None else base.input,
            cached_input=self.cached_input if self.cached_input is not None else base.cached_input,
            cache_write=self.cache_write if self.cache_write is not None else base.cache_write,
            output=self.output if self.output is not None else base.output,
            reasoning=self.reasoning if self.reasoning is not None else base.reasoning,
        )

    def resolve(self) -> Rates | None:
        """The effective rates (defaults applied); None without input or output."""
        if self.input is None or self.output is None:
            return None
        return Rates(
            input=self.input,
            cached_input=self.cached_input if self.cached_input is not None else self.input,
            cache_write=self.cache_write if self.cache_write is not None else self.input,
            output=self.output,
            reasoning=self.reasoning if self.reasoning is not None else self.output,
        )


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """One model's rates (input and output always given) and its per-pool overrides."""

    rates: RateOverride
    pools: Mapping[str, RateOverride] = field(default_factory=dict)

    def on(self, pool: str | None) -> Rates:
        override = self.pools.get(pool) if pool is not None else None
        rates = (override.over(self.rates) if override is not None else self.rates).resolve()
        assert rates is not None  # the loader requires input and output on every model
        return rates


@dataclass(frozen=True, slots=True)
class PriceCatalog:
    version: str
    currency: str
    models: Mapping[str, ModelPrices] = field(default_factory=dict)
    default: ModelPrices | None = None
    # (listed model or None for the default, pool) -> rates: resolved once per catalog
    _resolved: dict[tuple[str | None, str | None], Rates | None] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def rates_for(self, models: tuple[str | None, ...], pool: str | None) -> Rates | None:
        """The rates of the first of `models` the catalog lists (the served model before the
        requested one), else the default's; on `pool`. None when nothing prices them."""
        listed = next((m for m in models if m is not None and m in self.models), None)
        key = (listed, pool)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        entry = self.models[listed] if listed is not None else self.default
        rates = entry.on(pool) if entry is not None else None
        if len(self._resolved) < 10_000:  # pools are few, listed models too: bounded anyway
            self._resolved[key] = rates
        return rates

    def priced(self, model: str) -> bool:
        """Whether records of `model` get a cost (listed, or a default)."""
        return model in self.models or self.default is not None
