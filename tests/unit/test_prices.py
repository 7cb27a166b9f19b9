"""The price catalog (the policy's `prices`) and what a record costs under it."""

from __future__ import annotations

import subprocess
import sys
from decimal import Context, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.apis.anthropic_messages import anthropic_counts, anthropic_usage
from extproc.billing import (
    ModelPrices,
    PriceCatalog,
    RateOverride,
    Rates,
    TokenKinds,
    cost_of,
    money_str,
    price,
    price_warnings,
    token_kinds,
)
from extproc.metering.usage import Usage
from extproc.policy import Policy, PolicyError, hash_key, load_policy, parse_policy
from extproc.records.record import UsageRecord
from extproc.settlement.outcome import Decision

ROOT = Path(__file__).resolve().parents[2]
MARK = "#<"

BASE = f"""\
version: "t1"
models: ["small", "big", "org/model:v2"]
pools:
  - name: fast
    tokens_per_minute: 100
  - name: slow
tenants:
  acme:
    projects:
      chat: {{}}
keys:
  - id: web
    sha256: "{hash_key("web-raw")}"
    tenant: acme
    project: chat
"""

PRICES = """\
prices:
  version: "2026-11"
  currency: USD
  models:
    small: {input: 0.15, cached_input: 0.075, output: 0.60}
    big:
      input: 3
      cached_input: 0.30
      cache_write: 3.75
      output: 15.00
      reasoning: "20.5"
      pools:
        slow: {input: 1.5, output: 7}
    org/model:v2: {input: 1, output: 2}
  default: {input: 0.5, output: 1.5}
"""


def _policy(prices: str = PRICES) -> Policy:
    return parse_policy(BASE + prices, "p.yaml")


def _error(prices: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(BASE + prices, "p.yaml")
    return info.value


def _marked(prices: str) -> int:
    text = BASE + prices
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) == 1
    return lines[0]


# -- the catalog --------------------------------------------------------------------------


def test_prices_are_read_as_exact_decimals_with_their_defaults() -> None:
    catalog = _policy().prices
    assert catalog is not None
    assert (catalog.version, catalog.currency) == ("2026-11", "USD")
    small = catalog.rates_for(("small",), None)
    # cache_write defaults to input, reasoning to output; nothing went through a float
    assert small == Rates(Decimal("0.15"), Decimal("0.075"), Decimal("0.15"), Decimal("0.60"), Decimal("0.60"))
    big = catalog.rates_for(("big",), "fast")
    assert big == Rates(Decimal(3), Decimal("0.30"), Decimal("3.75"), Decimal("15.00"), Decimal("20.5"))
    # a pool override replaces what it names; the rest is the model's
    assert catalog.rates_for(("big",), "slow") == Rates(
        Decimal("1.5"), Decimal("0.30"), Decimal("3.75"), Decimal(7), Decimal("20.5"))
    assert catalog.rates_for(("org/model:v2",), None) is not None  # model names may carry / and :
    assert catalog.rates_for(("unknown",), None) == Rates(
        Decimal("0.5"), Decimal("0.5"), Decimal("0.5"), Decimal("1.5"), Decimal("1.5"))


def test_a_pool_override_moves_the_derived_rates_with_it() -> None:
    catalog = _policy(PRICES.replace("    small: {input: 0.15, cached_input: 0.075, output: 0.60}",
                                     "    small: {input: 1, output: 2, pools: {fast: {input: 4}}}")).prices
    assert catalog is not None
    assert catalog.rates_for(("small",), "fast") == Rates(Decimal(4), Decimal(4), Decimal(4), Decimal(2), Decimal(2))


def test_no_prices_section_means_no_catalog() -> None:
    assert parse_policy(BASE, "p.yaml").prices is None


def test_the_example_policies_carry_prices() -> None:
    for path in (ROOT / "policies" / "example.yaml", ROOT / "tests" / "e2e" / "policy.yaml"):
        policy = load_policy(path)
        assert policy.prices is not None
        assert price_warnings(policy) == [], path  # every model it serves has a price


@pytest.mark.parametrize(
    ("prices", "reason"),
    [
        ("prices:\n  currency: USD\n  default: {input: 1, output: 1}\n  bogus: 1 #<\n",
         "unknown key 'bogus' in prices"),
        # a mapping missing a key is named at its first line
        ("prices:\n  currency: USD #<\n  default: {input: 1, output: 1}\n", "missing required key 'version'"),
        ("prices:\n  version: v\n  currency: usd #<\n  default: {input: 1, output: 1}\n", "ISO 4217"),
        ("prices:\n  version: v\n  currency: DOLLARS #<\n  default: {input: 1, output: 1}\n", "ISO 4217"),
        ("prices:\n  version: v #<\n  currency: USD\n", "at least one model"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: -1, output: 1} #<\n",
         "prices.models.small.input must be a non-negative number"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: .nan, output: 1} #<\n",
         "non-negative number"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: cheap, output: 1} #<\n",
         "got 'cheap'"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: true, output: 1} #<\n",
         "got a boolean"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: [1], output: 1} #<\n",
         "got a list"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1} #<\n",
         "missing required key 'output' in prices.models.small"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1, output: 1, inptu: 2} #<\n",
         "unknown key 'inptu' in prices.models.small"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1, output: 1}\n"
         "    small: {input: 2, output: 2} #<\n", "duplicate model 'small' in prices.models (first at line"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small:\n      input: 1\n      output: 1\n"
         "      pools:\n        gpu: {input: 2} #<\n",
         "unknown pool 'gpu' in prices.models.small.pools (pools: fast, slow)"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small:\n      input: 1\n      output: 1\n"
         "      pools:\n        fast: {} #<\n", "must override at least one of"),
        ("prices:\n  version: v\n  currency: USD\n  models:\n    small:\n      input: 1\n      output: 1\n"
         "      pools:\n        fast: {input: 1, pools: {}} #<\n",
         "unknown key 'pools' in prices.models.small.pools.fast"),
        ("prices:\n  version: v\n  currency: USD\n  models: [small] #<\n", "must be a mapping of model names"),
        ("prices:\n  version: v\n  currency: USD\n  default: {output: 1} #<\n",
         "missing required key 'input' in prices.default"),
    ],
)
def test_bad_prices_are_refused_with_file_and_line(prices: str, reason: str) -> None:
    err = _error(prices)
    assert reason in err.reason, err.reason
    assert (err.file, err.line) == ("p.yaml", _marked(prices)), str(err)
    assert str(err).startswith(f"p.yaml:{_marked(prices)}: ")


def test_a_bad_prices_file_on_disk_names_its_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BASE + "prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1, output: x}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}:{len(BASE.splitlines()) + 5}: prices.models.small.output")


# -- cost ----------------------------------------------------------------------------------


def _rec(**kw: object) -> UsageRecord:
    fields: dict[str, object] = {"request_id": "r", "time": 0.0, "decision": Decision.ADMITTED, "policy_version": "v"}
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def _priced(usage: Usage, model: str = "small", pool: str | None = None, **kw: object) -> UsageRecord:
    rec = _rec(model=model, pool=pool, **kw)
    rec.set_usage(usage)
    price(rec, _policy().prices)
    return rec


def test_openai_cached_tokens_are_charged_at_the_cached_rate_and_not_again_as_input() -> None:
    rec = _priced(Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=400))
    # 600 input at 0.15, 400 cached at 0.075, 200 output at 0.60 per million
    assert rec.cost == "0.00024"
    assert (rec.currency, rec.price_version, rec.price_missing) == ("USD", "2026-11", False)
    assert Decimal(rec.cost) == (600 * Decimal("0.15") + 400 * Decimal("0.075") + 200 * Decimal("0.60")) / 10**6


def test_anthropic_cache_writes_are_a_kind_of_their_own() -> None:
    usage = anthropic_usage(anthropic_counts({"input_tokens": 100, "cache_creation_input_tokens": 2000,
                                              "cache_read_input_tokens": 500, "output_tokens": 50}))
    assert usage is not None and usage.prompt_tokens == 2600  # writes and reads are inside the prompt
    rec = _priced(usage, model="big", pool="fast")
    assert (rec.cache_write_tokens, rec.cached_tokens) == (2000, 500)
    kinds = token_kinds(rec)
    assert (kinds.input, kinds.cached_input, kinds.cache_write, kinds.output) == (100, 500, 2000, 50)
    # 100 x 3 + 500 x 0.30 + 2000 x 3.75 + 50 x 15
    assert rec.cost == "0.0087"


def test_reasoning_tokens_are_charged_at_the_reasoning_rate_else_the_output_rate() -> None:
    usage = Usage(prompt_tokens=0, completion_tokens=1000, reasoning_tokens=700)
    assert _priced(usage, model="big").cost == money_str((300 * Decimal(15) + 700 * Decimal("20.5")) / 10**6)
    assert _priced(usage, model="small").cost == "0.0006"  # no reasoning rate: the output rate for all 1000


def test_cached_input_and_cache_writes_default_to_the_input_rate() -> None:
    catalog = _policy("prices:\n  version: v\n  currency: EUR\n  default: {input: 2, output: 4}\n").prices
    assert catalog is not None
    rates = PriceCatalog("v", "EUR", default=catalog.default)
    rec = _rec(prompt_tokens=30, cached_tokens=10, cache_write_tokens=10, completion_tokens=5, reasoning_tokens=5)
    price(rec, rates)
    assert rec.cost == money_str(Decimal(30 * 2 + 5 * 4) / 10**6)
    assert rec.currency == "EUR"


def test_the_pool_override_and_the_served_model_decide_the_price() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert _priced(usage, model="big", pool="fast").cost == "18"
    assert _priced(usage, model="big", pool="slow").cost == "8.5"
    # the served model's price when the catalog lists it, else the requested model's
    assert _priced(usage, model="small", response_model="big").cost == "18"
    assert _priced(usage, model="big", response_model="big-2026-01-01").cost == "18"
    assert _priced(usage, model="nothing-like-it").cost == "2"  # the default


def test_a_model_without_a_price_gets_no_cost_and_a_marker() -> None:
    catalog = _policy(PRICES.replace("  default: {input: 0.5, output: 1.5}\n", "")).prices
    rec = _rec(model="unknown", prompt_tokens=10, completion_tokens=1)
    price(rec, catalog)
    assert (rec.cost, rec.price_missing, rec.currency, rec.price_version) == (None, True, "USD", "2026-11")
    refused = _rec(decision=Decision.THROTTLED)  # no model, no tokens: nothing to charge
    price(refused, catalog)
    assert (refused.cost, refused.price_missing) == ("0", False)


def test_without_a_catalog_nothing_is_priced() -> None:
    rec = _rec(model="small", prompt_tokens=10)
    price(rec, None)
    assert (rec.cost, rec.currency, rec.price_version, rec.price_missing) == (None, None, None, False)


def test_parts_larger_than_their_whole_are_clamped() -> None:
    rec = _rec(prompt_tokens=10, cached_tokens=50, cache_write_tokens=5, completion_tokens=3, reasoning_tokens=9)
    kinds = token_kinds(rec)
    assert (kinds.input, kinds.cached_input, kinds.cache_write, kinds.output, kinds.reasoning) == (0, 10, 0, 0, 3)
    assert kinds.total == 13


def test_cost_is_exact_and_printed_without_exponent() -> None:
    rates = Rates(Decimal("0.0000001"), Decimal(0), Decimal(0), Decimal("123456789.123456789"), Decimal(0))
    cost = cost_of(TokenKinds(input=1, output=7), rates)
    assert money_str(cost) == "864.197523864197623"  # 7 x 123456789.123456789 / 10^6 + 10^-13
    assert money_str(cost_of(TokenKinds(input=1), rates)) == "0.0000000000001"
    assert money_str(Decimal("0E-12")) == "0"


_rates = st.decimals(min_value=0, max_value=10**4, places=8, allow_nan=False, allow_infinity=False)
_tokens = st.integers(min_value=0, max_value=10**9)


@given(st.tuples(_rates, _rates, _rates, _rates, _rates), st.tuples(_tokens, _tokens, _tokens, _tokens, _tokens))
def test_cost_equals_the_decimal_arithmetic(rates: tuple[Decimal, ...], tokens: tuple[int, ...]) -> None:
    kinds = TokenKinds(*tokens)
    with localcontext(Context(prec=100)):
        expected = sum((r * t for r, t in zip(rates, tokens, strict=True)), Decimal(0)) / 10**6
    assert cost_of(kinds, Rates(*rates)) == expected
    rec = _rec(model="any", prompt_tokens=tokens[0] + tokens[1] + tokens[2], cached_tokens=tokens[1],
               cache_write_tokens=tokens[2], completion_tokens=tokens[3] + tokens[4], reasoning_tokens=tokens[4])
    price(rec, PriceCatalog("v", "USD", default=ModelPrices(RateOverride(*rates))))
    assert rec.cost is not None and Decimal(rec.cost) == expected and rec.cost == money_str(expected)


# -- policy check ---------------------------------------------------------------------------


def test_price_warnings_name_unpriced_models() -> None:
    assert price_warnings(parse_policy(BASE, "p.yaml")) == ["no prices section: usage records will carry no cost"]
    policy = _policy("prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1, output: 1}\n")
    warnings = price_warnings(policy)
    assert len(warnings) == 2 and "'big'" in warnings[0] and "'org/model:v2'" in warnings[1]
    assert price_warnings(_policy()) == []


def test_policy_check_warns_about_unpriced_models(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "prices:\n  version: v\n  currency: USD\n  models:\n    small: {input: 1, output: 1}\n")
    result = subprocess.run([sys.executable, "-m", "extproc.cli", "policy", "check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{path}: warning: model 'big' has no price" in result.stderr
