"""What the audit's `policy_loaded` event says changed in a scope's rules between two policies."""

from __future__ import annotations

from extproc.audit.events import policy_changes
from extproc.policy import Policy, hash_key, parse_policy


def _policy(tenant_limits: str, version: str = "v1") -> Policy:
    return parse_policy(f"""\
version: "{version}"
models: [small, large]
pools:
  - name: only
tenants:
  acme:
    limits:
{tenant_limits}    projects:
      chat: {{}}
keys:
  - id: web
    sha256: "{hash_key("changes-web")}"
    tenant: acme
    project: chat
""", "p.yaml")


BEFORE = """\
      tokens_per_minute: 1000
      quota_tokens: 50000
      concurrent_requests: 8
      alert_at: [80]
      rules:
        - {output_tokens: 300, window: 5m, models: [large]}
        - {requests: 10, period: day, action: block}
"""


def _changes(after: str) -> dict[str, object]:
    changes = policy_changes(_policy(BEFORE), _policy(after, "v2"))
    limits = changes.get("limits_changed", {})
    assert isinstance(limits, dict)
    found = limits.get("tenant:acme", {})
    assert isinstance(found, dict)
    return found


def test_no_change_no_entry() -> None:
    assert policy_changes(_policy(BEFORE), _policy(BEFORE, "v2")) == {}


def test_each_rule_is_named_by_what_it_counts_over_what_and_for_which_models() -> None:
    after = (BEFORE.replace("tokens_per_minute: 1000", "tokens_per_minute: 2000")
             .replace("quota_tokens: 50000", "quota_tokens: 60000")
             .replace("concurrent_requests: 8", "concurrent_requests: 9")
             .replace("output_tokens: 300", "output_tokens: 400")
             .replace("requests: 10, period: day", "requests: 11, period: day"))
    assert _changes(after) == {
        "tokens_per_minute": [1000, 2000],
        "quota_tokens_per_month": [50000, 60000],
        "concurrent_requests": [8, 9],
        "output_tokens_per_5m[large]": [300, 400],
        "quota_requests_per_day": [10, 11],
    }


def test_added_and_removed_rules_show_null_on_the_side_without_them() -> None:
    after = BEFORE.replace("      concurrent_requests: 8\n", "") + "        - {input_tokens: 70, window: 30s}\n"
    assert _changes(after) == {"concurrent_requests": [8, None], "input_tokens_per_30s": [None, 70]}
    moved = BEFORE.replace("      quota_tokens: 50000\n", "      quota_tokens: 50000\n      quota_period: week\n")
    assert _changes(moved) == {"quota_tokens_per_month": [50000, None], "quota_tokens_per_week": [None, 50000]}


def test_an_action_or_thresholds_of_a_rule_are_reported_and_a_blocks_action_once() -> None:
    block = BEFORE.replace("      alert_at: [80]\n", "      alert_at: [80]\n      action: alert\n")
    assert _changes(block) == {"action": ["throttle", "alert"]}  # not once per rule that follows it
    own = BEFORE.replace("action: block}", "action: throttle}")
    assert _changes(own) == {"quota_requests_per_day action": ["block", "throttle"]}
    alerts = BEFORE.replace("alert_at: [80]", "alert_at: [80, 100]")
    assert _changes(alerts) == {
        "quota_tokens_per_month alert_at": [[80], [80, 100]],
        "quota_requests_per_day alert_at": [[80], [80, 100]],
    }


def _whole(calendar: str = "", subjects: str = "", shares: str = "", routing: str = "") -> Policy:
    return parse_policy(f"""\
version: "v"
models: [small]
{routing}pools:
  - name: gpu
    tokens_per_minute: 1000
{shares}  - name: rest
tenants:
  acme:
{calendar}    projects:
      chat: {{}}
keys: []
identity:
  trusted_headers:
    name: sso
    authorizer: "127.0.0.1:9000"
    tenant_header: x-auth-tenant
    default_project: chat
{subjects}""", "p.yaml")


def test_a_tenant_calendar_and_mode_change_is_reported_per_tenant() -> None:
    tokyo = "    time_zone: Asia/Tokyo\n    billing_anchor_day: 15\n    mode: shadow\n"
    changes = policy_changes(_whole(), _whole(tokyo))
    assert changes["calendars_changed"] == {"acme": [["UTC", 1], ["Asia/Tokyo", 15]]}
    assert changes["tenant_modes_changed"] == {"acme": [None, "shadow"]}


def test_a_subject_without_a_key_is_added_and_its_limits_change_like_a_key() -> None:
    one = "    subjects:\n      - {sub: alice, limits: {tokens_per_minute: 100}}\n"
    two = "    subjects:\n      - {sub: alice, limits: {tokens_per_minute: 200}}\n"
    assert policy_changes(_whole(), _whole(subjects=one))["subjects_added"] == ["hdr:sso:alice"]
    changed = policy_changes(_whole(subjects=one), _whole(subjects=two))["limits_changed"]
    assert changed == {"subject:hdr:sso:alice": {"tokens_per_minute": [100, 200]}}


def test_shares_and_routing_changes_are_reported() -> None:
    shares = "    shares: {acme: {guaranteed: 400}}\n"
    changes = policy_changes(_whole(), _whole(shares=shares, routing="routing: {hysteresis_percent: 20}\n"))
    assert changes["pools_changed"]["gpu"]["shares"] == [{}, {"acme": {"guaranteed": 400, "maximum": 1000}}]
    assert changes["routing_changed"]["hysteresis"] == [0.1, 0.2]
