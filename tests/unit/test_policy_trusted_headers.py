"""The loader's `identity.trusted_headers`: what it reads, and every refusal at its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.policy import Limits, PolicyError, parse_policy
from extproc.policy.model import TrustedHeaders
from tests.unit.policy_files import trusted_headers_section

E2E_POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
MARK = "#<"

SECTION = trusted_headers_section("authz.internal:9000", """\
      - sub: alice
        limits: {requests_per_minute: 7}
      - sub: bob
        limits:
          rules:
            - {output_tokens: 5000, window: 1h}
""")


def _policy(section: str = SECTION) -> str:
    return E2E_POLICY.read_text() + section


def test_trusted_headers_are_read() -> None:
    trusted = parse_policy(_policy(), "p.yaml").identity.trusted_headers
    assert trusted is not None
    assert (trusted.name, trusted.authorizer) == ("corp-sso", "authz.internal:9000")
    assert trusted.headers == ("x-auth-tenant", "x-auth-project", "x-auth-team", "x-auth-user")
    assert trusted.default_project == "chat"
    assert trusted.subjects["alice"] == Limits.of(requests_per_minute=7)
    [rule] = trusted.subjects["bob"].rules
    assert (rule.limit, rule.window_s) == (5000, 3600.0)


def test_only_the_tenant_header_and_one_project_source_are_needed() -> None:
    text = _policy(
        "identity:\n  trusted_headers:\n    name: gw\n    authorizer: \"10.0.0.9:80\"\n"
        "    tenant_header: x-org\n    default_project: chat\n"
    )
    trusted = parse_policy(text, "p.yaml").identity.trusted_headers
    assert trusted == TrustedHeaders(name="gw", authorizer="10.0.0.9:80", tenant_header="x-org", default_project="chat")
    assert parse_policy(text, "p.yaml").identity.jwt == ()


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        pytest.param("tenant_header: x-auth-tenant", "tenant_header: X-Auth-Tenant  #<",
                     "identity.trusted_headers.tenant_header: 'X-Auth-Tenant' is not a lowercase header name",
                     id="uppercase"),
        pytest.param("tenant_header: x-auth-tenant", "tenant_header: 'x auth'  #<", "is not a lowercase header name",
                     id="space"),
        pytest.param("tenant_header: x-auth-tenant", "tenant_header: authorization  #<", "'authorization' is reserved",
                     id="authorization"),
        pytest.param("team_header: x-auth-team", "team_header: x-api-key  #<", "'x-api-key' is reserved", id="api-key"),
        pytest.param("team_header: x-auth-team", "team_header: host  #<", "'host' is reserved", id="host"),
        pytest.param("team_header: x-auth-team", "team_header: content-length  #<", "is reserved", id="length"),
        pytest.param("team_header: x-auth-team", "team_header: content-type  #<", "is reserved", id="type"),
        pytest.param("team_header: x-auth-team", "team_header: transfer-encoding  #<", "is reserved", id="te"),
        pytest.param("subject_header: x-auth-user", "subject_header: x-tokenmeter-user  #<", "is reserved",
                     id="ours"),
        pytest.param("subject_header: x-auth-user", "subject_header: x-envoy-user  #<", "is reserved", id="envoy"),
        pytest.param("subject_header: x-auth-user", "subject_header: ':path'  #<", "not a lowercase header name",
                     id="pseudo"),
        pytest.param("subject_header: x-auth-user", "subject_header: x-auth-tenant  #<",
                     "identity.trusted_headers: subject_header 'x-auth-tenant' is also the tenant_header",
                     id="same-header"),
        pytest.param("    project_header: x-auth-project\n    default_project: chat\n", "",
                     "trusted headers 'corp-sso': give project_header, default_project, or both", id="no-project"),
        pytest.param("    tenant_header: x-auth-tenant\n", "", "missing required key 'tenant_header' in "
                     "identity.trusted_headers", id="no-tenant-header"),
        pytest.param('authorizer: "authz.internal:9000"', "authorizer: authz  #<",
                     "identity.trusted_headers.authorizer: 'authz' is not host:port", id="authorizer"),
        pytest.param('authorizer: "authz.internal:9000"', 'authorizer: "authz:70000"  #<', "is not host:port",
                     id="port"),
        pytest.param("name: corp-sso", "name: corp sso  #<", "invalid name 'corp sso'", id="name"),
        pytest.param("default_project: chat", "default_project: [chat]  #<",
                     "identity.trusted_headers.default_project must be a string, got a list", id="project-list"),
        pytest.param("      - sub: bob\n", "      - sub: alice  #<\n",
                     "duplicate subject 'alice' in identity.trusted_headers.subjects (first at line", id="dup-sub"),
        pytest.param("{requests_per_minute: 7}", "{requests_per_minute: 7, rules: [{requests: '9%', window: 1m}]}  #<",
                     "a percent is allowed only on a project", id="percent"),
        pytest.param("    team_header: x-auth-team\n", "    team_header: x-auth-team\n    role_header: x-role  #<\n",
                     "unknown key 'role_header' in identity.trusted_headers (allowed: name, authorizer, "
                     "tenant_header, project_header, default_project, team_header, subject_header, subjects)",
                     id="unknown-key"),
    ],
)
def test_bad_trusted_headers_are_refused_at_their_line(old: str, new: str, reason: str) -> None:
    assert SECTION.count(old) == 1, old
    text = _policy(SECTION.replace(old, new))
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    error = info.value
    assert reason in error.reason, error.reason
    marked = [n for n, line in enumerate(text.splitlines(), 1) if MARK in line]
    expected = marked[0] if marked else next(
        n for n, line in enumerate(text.splitlines(), 1) if line.strip() == "name: corp-sso")
    assert error.line == expected, str(error)


def test_trusted_headers_must_be_one_mapping() -> None:
    text = _policy("identity:\n  trusted_headers: [corp-sso]\n")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.reason == "identity.trusted_headers must be a mapping, got a list"
    assert info.value.line == len(text.splitlines())
