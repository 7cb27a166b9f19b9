"""The `limits` format: shorthand and `rules:` as LimitRules, per-model rules, concurrency, alert
thresholds, percents of the parent's rule (team caps), tenant calendars; every error at its line."""

from __future__ import annotations

import pytest

from extproc.limiter.types import Measure
from extproc.policy import Action, Limits, Period, PolicyError, hash_key, parse_policy
from extproc.policy.model import LimitRule, Policy

MARK = "#<"  # marks the line an error must name

HEAD = f"""\
version: "r1"
models: [small, large, "org/huge:v2"]
aliases: {{fast: small}}
pools:
  - name: only
keys:
  - id: web
    sha256: "{hash_key("rules-web")}"
    tenant: acme
    project: chat
"""


def _policy(tenants: str) -> Policy:
    return parse_policy(HEAD + "tenants:\n" + tenants, "p.yaml")


def _error(tenants: str) -> PolicyError:
    text = HEAD + "tenants:\n" + tenants
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    error = info.value
    marked = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(marked) == 1, "a case marks exactly one line"
    assert error.line == marked[0], str(error)
    assert str(error) == f"p.yaml:{error.line}: {error.reason}"
    return error


def _tenant_limits(block: str, **extra: str) -> str:
    """Tenant acme with `block` (indented under limits:) and project chat."""
    lines = "".join(f"    {k}: {v}\n" for k, v in extra.items())
    return f"  acme:\n{lines}    limits:\n{block}    projects:\n      chat: {{}}\n"


def _rules(limits: Limits) -> list[tuple[object, ...]]:
    return [(r.measure, r.limit, r.window_s, r.period, r.models, r.action, r.alert_at) for r in limits.rules]


# -- what the rules mean ----------------------------------------------------------------


def test_the_shorthand_keys_are_rules() -> None:
    limits = _policy(_tenant_limits(
        "      tokens_per_minute: 100\n"
        "      requests_per_minute: 10\n"
        "      requests_per_hour: 300\n"
        "      quota_tokens: 5000\n"
        "      quota_requests: 50\n"
        "      quota_period: week\n"
        "      concurrent_requests: 3\n"
        "      action: alert\n"
        "      alert_at: [80, 100]\n"
    )).tenants["acme"].limits
    assert limits == Limits.of(
        tokens_per_minute=100, requests_per_minute=10, requests_per_hour=300, quota_tokens=5000, quota_requests=50,
        quota_period=Period.WEEK, concurrent_requests=3, action=Action.ALERT, alert_at=(80, 100),
    )
    assert _rules(limits)[-1] == (Measure.CONCURRENT, 3, None, None, None, Action.ALERT, ())


def test_rules_name_a_measure_a_window_or_period_models_an_action_and_thresholds() -> None:
    limits = _policy(_tenant_limits(
        "      action: block\n"
        "      alert_at: [90]\n"
        "      rules:\n"
        "        - tokens: 1_000\n"
        "          window: 30s\n"
        "        - input_tokens: 2000\n"
        "          window: 5m\n"
        "          models: [large, fast]\n"
        "        - output_tokens: 3000\n"
        "          window: 90\n"
        "          action: throttle\n"
        "        - requests: 40\n"
        "          window: 1d\n"
        "        - tokens: 50000\n"
        "          period: month\n"
        "        - requests: 60\n"
        "          period: day\n"
        "          alert_at: [50, 75]\n"
        "        - concurrent: 4\n"
        "          models: [org/huge:v2]\n"
    )).tenants["acme"].limits
    large_and_small = frozenset({"large", "small"})  # the alias names its model
    assert limits.action is Action.BLOCK
    assert _rules(limits) == [
        (Measure.TOKENS, 1000, 30.0, None, None, Action.BLOCK, ()),
        (Measure.INPUT_TOKENS, 2000, 300.0, None, large_and_small, Action.BLOCK, ()),
        (Measure.OUTPUT_TOKENS, 3000, 90.0, None, None, Action.THROTTLE, ()),
        (Measure.REQUESTS, 40, 86400.0, None, None, Action.BLOCK, ()),
        (Measure.TOKENS, 50000, None, Period.MONTH, None, Action.BLOCK, (90,)),  # the block's thresholds
        (Measure.REQUESTS, 60, None, Period.DAY, None, Action.BLOCK, (50, 75)),  # its own
        (Measure.CONCURRENT, 4, None, None, frozenset({"org/huge:v2"}), Action.BLOCK, ()),
    ]


def test_shorthand_and_rules_mix_and_rules_alike_but_for_models_are_distinct() -> None:
    limits = _policy(_tenant_limits(
        "      tokens_per_minute: 100\n"
        "      rules:\n"
        "        - {tokens: 10, window: 1m, models: [large]}\n"
        "        - {tokens: 20, window: 1m, models: [small]}\n"
        "        - {tokens: 30, window: 2m}\n"
    )).tenants["acme"].limits
    assert [r.limit for r in limits.rules] == [100, 10, 20, 30]


def test_a_rule_applies_to_its_models_only() -> None:
    rule = LimitRule(Measure.TOKENS, 1, window_s=60.0, models=frozenset({"large"}))
    assert rule.applies_to("large") and not rule.applies_to("small")
    assert LimitRule(Measure.TOKENS, 1, window_s=60.0).applies_to("anything")


def test_a_tenant_has_a_time_zone_and_a_billing_anchor_day() -> None:
    policy = _policy(_tenant_limits("      quota_tokens: 10\n", time_zone="Asia/Kolkata", billing_anchor_day="31"))
    acme = policy.tenants["acme"]
    assert (acme.time_zone, acme.billing_anchor_day) == ("Asia/Kolkata", 31)
    plain = _policy("  acme:\n    projects:\n      chat: {}\n").tenants["acme"]
    assert (plain.time_zone, plain.billing_anchor_day) == ("UTC", 1)


# -- percents: team caps ----------------------------------------------------------------

SHARED = """\
  acme:
    limits:
      tokens_per_minute: 1000
      rules:
        - {tokens: 1_000_000, period: month}
        - {requests: 99, window: 1h, models: [large]}
        - {concurrent: 10}
    projects:
      chat:
        limits:
          rules:
            - {tokens: "40%", period: month}
            - {requests: "50%", window: 1h, models: [large]}
            - {concurrent: "25%"}
        teams:
          a:
            limits:
              rules:
                - {tokens: "50%", period: month}
                - {tokens: 77, window: 1m}
          b:
            limits:
              rules:
                - {tokens: "1%", period: month}
"""


def test_a_percent_is_a_share_of_the_parents_like_rule_rounded_up() -> None:
    chat = _policy(SHARED).tenants["acme"].projects["chat"]
    assert [r.limit for r in chat.limits.rules] == [400_000, 50, 3]  # 49.5 and 2.5 round up
    assert [r.limit for r in chat.teams["a"].limits.rules] == [200_000, 77]  # a share of chat's 400000
    assert [r.limit for r in chat.teams["b"].limits.rules] == [4000]
    assert chat.limits.rules[1].models == frozenset({"large"})


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        pytest.param(
            '            - {tokens: "40%", period: month}\n',
            '            - {tokens: "40%", period: week}  #<\n',
            "tenants.acme.projects.chat.limits.rules[0].tokens: 40% of what? tenant 'acme' has no rule for "
            "tokens per week", id="no-like-rule-period",
        ),
        pytest.param(
            '            - {requests: "50%", window: 1h, models: [large]}\n',
            '            - {requests: "50%", window: 1h}  #<\n',
            "50% of what? tenant 'acme' has no rule for requests per hour", id="no-like-rule-models",
        ),
        pytest.param(
            '                - {tokens: "50%", period: month}\n',
            '                - {tokens: "50%", window: 1m}  #<\n',
            "50% of what? project 'acme.chat' has no rule for tokens per minute", id="team-of-project",
        ),
        pytest.param(
            "        - {concurrent: 10}\n",
            '        - {concurrent: 10}\n        - {tokens: "10%", window: 2m}  #<\n',
            "a percent is allowed only on a project", id="percent-on-a-tenant",
        ),
        pytest.param(
            '            - {tokens: "40%", period: month}\n',
            '            - {tokens: "0%", period: month}  #<\n',
            'must be a positive integer or a percent from "1%" to "100%", got \'0%\'', id="zero-percent",
        ),
        pytest.param(
            '            - {tokens: "40%", period: month}\n',
            '            - {tokens: "101%", period: month}  #<\n',
            "got '101%'", id="over-100-percent",
        ),
        pytest.param(
            '            - {tokens: "40%", period: month}\n',
            '            - {tokens: "40 percent", period: month}  #<\n',
            "got '40 percent'", id="not-a-percent",
        ),
    ],
)
def test_a_percent_without_a_parent_rule_or_out_of_range_is_refused(old: str, new: str, reason: str) -> None:
    assert SHARED.count(old) == 1, old
    assert reason in _error(SHARED.replace(old, new)).reason


def test_a_percent_on_a_key_is_refused_at_its_line() -> None:
    share = '    limits: {rules: [{tokens: "5%", window: 1m}]}  #<\n'
    text = HEAD.replace("    project: chat\n", "    project: chat\n" + share)
    tenants = "tenants:\n  acme:\n    limits: {tokens_per_minute: 9}\n    projects: {chat: {}}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text + tenants, "p.yaml")
    assert info.value.line == next(n for n, line in enumerate(text.splitlines(), 1) if MARK in line)
    assert "keys[0].limits.rules[0].tokens: a percent is allowed only on a project" in info.value.reason


# -- errors, at their lines -------------------------------------------------------------

RULE_ERRORS = [
    pytest.param(
        "        - tokens: 10\n"
        "          requests: 5  #<\n"
        "          window: 1m\n",
        "a rule has one measure, got tokens and requests", id="two-measures",
    ),
    pytest.param("        - window: 1m  #<\n", "a rule needs one measure: tokens, input_tokens, output_tokens, "
                 "requests, concurrent", id="no-measure"),
    pytest.param("        - tokens: 10  #<\n", "the tokens rule needs a window (e.g. 1m, 1h) or a period",
                 id="unbounded"),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          period: day  #<\n",
        "give window (sliding) or period (calendar), not both", id="window-and-period",
    ),
    pytest.param(
        "        - concurrent: 10\n"
        "          window: 1m  #<\n",
        "a concurrent rule counts requests in flight: it takes no window", id="concurrent-window",
    ),
    pytest.param(
        "        - concurrent: 10\n"
        "          period: day  #<\n",
        "it takes no period", id="concurrent-period",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 8d  #<\n",
        "tenants.acme.limits.rules[0].window: a window is at most 7d (604800 seconds), got 691200 seconds",
        id="window-too-long",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 604801  #<\n",
        "a window is at most 7d", id="window-seconds-too-long",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1w  #<\n",
        "tenants.acme.limits.rules[0].window must be a length such as \"30s\", \"1m\"", id="window-unit",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 0  #<\n",
        "got 0", id="window-zero",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1.5  #<\n",
        "got a float", id="window-float",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          period: year  #<\n",
        "tenants.acme.limits.rules[0].period: unknown period 'year' (expected one of: day, week, month)",
        id="period",
    ),
    pytest.param(
        "        - tokens: 0  #<\n"
        "          window: 1m\n",
        "tenants.acme.limits.rules[0].tokens must be a positive integer or a percent", id="zero",
    ),
    pytest.param(
        "        - tokens: true  #<\n"
        "          window: 1m\n",
        "got a boolean", id="bool",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          models: [large, mystery]  #<\n",
        "tenants.acme.limits.rules[0].models: model 'mystery' is not listed under models or aliases",
        id="unknown-model",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          models:\n"
        "            - large\n"
        "            - large  #<\n",
        "duplicate model 'large' in tenants.acme.limits.rules[0].models (first at line", id="duplicate-model",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          models: []  #<\n",
        "tenants.acme.limits.rules[0].models must be a non-empty list of model names, got a list", id="no-models",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          action: deny  #<\n",
        "unknown action 'deny' (expected one of: throttle, block, alert)", id="action",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          alert_at: [80]  #<\n",
        "alert_at is for period (calendar) rules only", id="alert-on-window",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          period: day\n"
        "          alert_at: [80, 80]  #<\n",
        "in increasing order", id="alert-repeated",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          period: day\n"
        "          alert_at: [1001]  #<\n",
        "whole numbers 1 to 1000", id="alert-over-1000",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          period: day\n"
        "          alert_at: []  #<\n",
        "alert_at must be a list of percents", id="alert-empty",
    ),
    pytest.param(
        "        - tokens: 10\n"
        "          window: 1m\n"
        "          burst: 3  #<\n",
        "unknown key 'burst' in tenants.acme.limits.rules[0] (allowed: tokens, input_tokens, output_tokens, "
        "requests, concurrent, window, period, models, action, alert_at)", id="unknown-key",
    ),
    pytest.param("        - 10  #<\n", "tenants.acme.limits.rules[0] must be a mapping, got an integer",
                 id="not-a-map"),
    pytest.param(
        "        - {tokens: 10, window: 1m}\n"
        "        - {tokens: 20, window: 60}  #<\n",
        "tenants.acme.limits.rules[1].tokens: a second rule for tokens per minute in tenants.acme.limits "
        "(the first is at line", id="ambiguous",
    ),
    pytest.param(
        "        - {requests: 20, window: 1m, models: [small]}\n"
        "        - {requests: 30, window: 1m, models: [fast]}  #<\n",
        "a second rule for requests per minute of small", id="ambiguous-through-an-alias",
    ),
]


@pytest.mark.parametrize(("rules", "reason"), RULE_ERRORS)
def test_a_bad_rule_is_refused_at_its_line(rules: str, reason: str) -> None:
    error = _error(_tenant_limits("      rules:\n" + rules))
    assert reason in error.reason, error.reason


BLOCK_ERRORS = [
    pytest.param(
        "      tokens_per_minute: 100\n"
        "      rules:\n"
        "        - {tokens: 5, window: 1m}  #<\n",
        "a second rule for tokens per minute", id="shorthand-and-rule",
    ),
    pytest.param(
        "      concurrent_requests: 4\n"
        "      rules: [{concurrent: 5}]  #<\n",
        "a second rule for requests in flight", id="concurrency-twice",
    ),
    pytest.param("      concurrent_requests: 0  #<\n", "tenants.acme.limits.concurrent_requests must be a positive "
                 "integer, got 0", id="concurrency-zero"),
    pytest.param("      concurrent_requests: '4'  #<\n", "must be a positive integer, got a string",
                 id="concurrency-str"),
    pytest.param("      quota_tokens: 9\n      alert_at: [50, 40]  #<\n", "40 after 50", id="alert-order"),
    pytest.param("      quota_tokens: 9\n      alert_at: [0, 40]  #<\n", "got 0", id="alert-zero"),
    pytest.param("      quota_tokens: 9\n      alert_at: ['80%']  #<\n", "got a string", id="alert-percent-sign"),
    pytest.param("      quota_tokens: 9\n      alert_at: 80  #<\n", "got an integer", id="alert-not-a-list"),
    pytest.param(
        "      tokens_per_minute: 9\n      alert_at: [80]  #<\n",
        "tenants.acme.limits: alert_at applies to period (calendar) rules, and this block has none",
        id="alert-without-period",
    ),
    pytest.param("      rules: {tokens: 5}  #<\n", "tenants.acme.limits.rules must be a list of rules, got a mapping",
                 id="rules-not-a-list"),
    pytest.param("      quota_tokens: 9\n      quota_period: hour  #<\n",
                 "unknown quota_period 'hour' (expected one of: day, week, month)", id="quota-period"),
]


@pytest.mark.parametrize(("block", "reason"), BLOCK_ERRORS)
def test_a_bad_limits_block_is_refused_at_its_line(block: str, reason: str) -> None:
    assert reason in _error(_tenant_limits(block)).reason


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"time_zone": "Mars/Olympus_Mons  #<"},
         "tenants.acme.time_zone: unknown time zone 'Mars/Olympus_Mons' (an IANA name such as"),
        ({"time_zone": "''  #<"}, "tenants.acme.time_zone must not be empty"),
        ({"time_zone": "[UTC]  #<"}, "tenants.acme.time_zone must be a string, got a list"),
        ({"billing_anchor_day": "0  #<"}, "tenants.acme.billing_anchor_day must be a day of the month, 1 to 31, got 0"),
        ({"billing_anchor_day": "32  #<"}, "1 to 31, got 32"),
        ({"billing_anchor_day": "'15'  #<"}, "1 to 31, got a string"),
        ({"billing_anchor_day": "15.0  #<"}, "1 to 31, got a float"),
    ],
)
def test_a_bad_time_zone_or_anchor_day_is_refused_at_its_line(extra: dict[str, str], reason: str) -> None:
    assert reason in _error(_tenant_limits("      quota_tokens: 10\n", **extra)).reason


def test_rules_naming_models_need_the_policy_to_list_them() -> None:
    text = HEAD.replace("models: [small, large, \"org/huge:v2\"]\naliases: {fast: small}\n", "")
    tenants = "tenants:\n  acme:\n    limits:\n      rules: [{tokens: 5, window: 1m, models: [small]}]\n" \
              "    projects: {chat: {}}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text + tenants, "p.yaml")
    assert "model 'small' is not listed (the policy lists no models: add it to models)" in info.value.reason
