"""Prices and cost: the versioned price catalog (catalog.py, the policy's `prices` section) and the
cost of a usage record under it (cost.py).

Settlement prices each record as it writes it:

    from extproc.billing import price
    price(rec, policy.prices)        # fills rec.cost, rec.currency, rec.price_version, rec.price_missing
"""

from extproc.billing.catalog import RATE_KINDS, ModelPrices, PriceCatalog, RateOverride, Rates
from extproc.billing.cost import (
    MONEY,
    TokenKinds,
    cost_of,
    money_str,
    parse_money,
    price,
    price_warnings,
    record_cost,
    token_kinds,
    total_money,
)

__all__ = [
    "MONEY",
    "RATE_KINDS",
    "ModelPrices",
    "PriceCatalog",
    "RateOverride",
    "Rates",
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
