from __future__ import annotations

from extproc.limiter.types import Decision, WindowStatus
from extproc.policy.keys import hash_key
from extproc.policy.model import (
    Action,
    ApiKey,
    Limits,
    Mode,
    Policy,
    Pool,
    Project,
    RequestRules,
    Team,
    Tenant,
)
from extproc.service.admission import reservation_tokens, scope_path
from extproc.service.identity import identify, presented_key
from extproc.service.ratelimit_headers import go_duration, ratelimit_headers, retry_after


def _policy(mode: Mode = Mode.ENFORCE) -> Policy:
    key = ApiKey(
        key_id="web",
        sha256=hash_key("secret-1"),
        tenant="acme",
        project="chat",
        team="support",
        limits=Limits.of(tokens_per_minute=100),
    )
    tenant = Tenant(
        "acme",
        Limits.of(tokens_per_minute=1000, action=Action.ALERT),
        {"chat": Project("chat", Limits(), {"support": Team("support", Limits.of(requests_per_minute=5))})},
    )
    return Policy(
        version="t1",
        mode=mode,
        request=RequestRules(max_body_bytes=1000, default_max_tokens=50, max_tokens_cap=200),
        pools=(Pool("h100", 10), Pool("cheap")),
        tenants={"acme": tenant},
        keys_by_sha256={key.sha256: key},
    )


def test_bearer_and_x_api_key_are_both_accepted() -> None:
    assert presented_key({"authorization": "Bearer  abc "}) == "abc"
    assert presented_key({"authorization": "bearer abc"}) == "abc"
    assert presented_key({"x-api-key": "k"}) == "k"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_keys_are_identified_by_hash_only() -> None:
    policy = _policy()
    assert identify({"authorization": "Bearer secret-1"}, policy) is not None
    assert identify({"authorization": "Bearer secret-2"}, policy) is None
    assert identify({"authorization": f"Bearer {hash_key('secret-1')}"}, policy) is None


def test_scope_path_charges_every_level_with_limits_and_skips_empty_ones() -> None:
    path = scope_path(next(iter(_policy().keys_by_sha256.values())), _policy())
    scopes = path.for_model("")
    names = [s.scope for s in scopes]
    assert names == ["tenant:acme", "team:acme/chat/support", "key:web"]
    tenant = scopes[0]
    assert not any(rule.enforce for rule in tenant.rules)  # action alert: over it is let through
    assert all(s.enforce and all(rule.enforce for rule in s.rules) for s in scopes[1:])


def test_shadow_mode_enforces_nothing() -> None:
    policy = _policy(Mode.SHADOW)
    path = scope_path(next(iter(policy.keys_by_sha256.values())), policy)
    assert not any(s.enforce for s in path.for_model(""))


def test_reservation_is_prompt_plus_bounded_output() -> None:
    policy = _policy()
    assert reservation_tokens(10, None, policy) == 60  # default 50
    assert reservation_tokens(10, 20, policy) == 30
    assert reservation_tokens(10, 100_000, policy) == 210  # cap 200
    assert reservation_tokens(10, 20, policy, choices=3) == 70  # n=3 choices


def test_ratelimit_headers_follow_openai_names_and_durations() -> None:
    d = Decision(
        allowed=False,
        retry_after_seconds=1.2,
        tokens=WindowStatus(limit=100, remaining=-5, reset_seconds=90.0),
        requests=WindowStatus(limit=5, remaining=4, reset_seconds=0.25),
    )
    headers = dict(ratelimit_headers(d))
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == "1m30s"
    assert headers["x-ratelimit-reset-requests"] == "250ms"
    assert retry_after(d) == "2"
    assert go_duration(0) == "0s"


def test_a_tenant_in_shadow_mode_never_enforces_while_the_policy_does() -> None:
    from pathlib import Path

    from extproc.policy import Mode, parse_policy

    text = (Path(__file__).parents[1] / "e2e" / "policy.yaml").read_text()
    policy = parse_policy(text.replace("  globex:\n", "  globex:\n    mode: shadow\n", 1), "p.yaml")
    globex = next(k for k in policy.keys_by_sha256.values() if k.tenant == "globex")
    acme = next(k for k in policy.keys_by_sha256.values() if k.tenant == "acme")
    assert policy.mode is Mode.ENFORCE
    shadow, enforced = scope_path(globex, policy), scope_path(acme, policy)
    assert shadow.mode is Mode.SHADOW and not any(s.enforce for s in shadow.for_model(""))
    assert enforced.mode is Mode.ENFORCE and any(s.enforce for s in enforced.for_model(""))


def test_models_no_rule_or_pool_names_are_narrowed_and_routed_alike_and_cached_once() -> None:
    """A client chooses the model name: however many it sends, the caches hold the policy's names."""
    import dataclasses

    from extproc.limiter.types import Measure
    from extproc.policy.model import LimitRule
    from extproc.service.processor import Context, FixedPolicy
    from tests.unit.recorders import ListSink
    from tests.unit.test_native_admission_and_settlement import RecordingLimiter

    base = _policy()
    big_only = LimitRule(Measure.REQUESTS, 1, window_s=60.0, models=frozenset({"big"}))
    acme = base.tenants["acme"]
    tenant = dataclasses.replace(acme, limits=Limits(rules=(*acme.limits.rules, big_only)))
    policy = dataclasses.replace(base, tenants={"acme": tenant},
                                 pools=(Pool("h100", 10, models=frozenset({"big"})), Pool("cheap")))
    key = next(iter(policy.keys_by_sha256.values()))
    path = scope_path(key, policy)
    ctx = Context(FixedPolicy(policy), RecordingLimiter(), ListSink())
    other = (path.for_model("x" * 10_000), ctx.pools(policy, "x" * 10_000, key))
    for n in range(2000):
        assert (path.for_model(f"m{n}" * 100), ctx.pools(policy, f"m{n}" * 100, key)) == other
    assert [p.name for p in other[1]] == ["cheap"]
    assert len(path.for_model("big")[0].rules) == 2 and len(other[0][0].rules) == 1
    assert len(path._by_model) == 2 and len(ctx._pools_by_model) == 1  # ("big" and) any other name
