"""JWT identity: the `identity.jwt` section (loader errors with file:line), the claims of a token
Envoy verified mapped onto tenants, a token never taken for a key (and a key never for a token),
and the generated Envoy configuration (jwt_authn only where the policy names issuers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from extproc.envoy.config import render, render_istio
from extproc.policy import PolicyError, load_policy, parse_policy
from extproc.policy.model import ApiKey, Limits
from extproc.service.identity import (
    JWT_NAMESPACE,
    ClaimRefusal,
    identify,
    identify_jwt,
    jwt_key_id,
    verified_claims,
)
from extproc.service.metadata import NAMESPACE
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink
from tests.unit.test_native_admission_and_settlement import CHAT, RecordingLimiter, body_only

E2E_POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
JWKS = json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "kid": "k1", "n": "sXch", "e": "AQAB"}]})
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def _identity(extra: str = "", jwks: str | None = None) -> str:
    return (
        "identity:\n"
        "  jwt:\n"
        "    - name: corp\n"
        '      issuer: "https://idp.example"\n'
        '      audiences: ["tokenmeter"]\n'
        f"      jwks: '{jwks if jwks is not None else JWKS}'\n"
        "      tenant_claim: org\n"
        "      project_claim: proj\n"
        "      team_claim: team\n"
        "      subjects:\n"
        "        - {sub: alice, limits: {requests_per_minute: 7}}\n"
        f"{extra}"
    )


def _policy(extra: str = "") -> str:
    return E2E_POLICY.read_text() + _identity(extra)


def _claims(**values: Any) -> Struct:
    out = Struct()
    out.update(values)
    return out


def _error(text: str, source: str = "p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    return info.value


def _line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


# -- the loader ----------------------------------------------------------------------------


def test_the_identity_section_is_read() -> None:
    policy = parse_policy(_policy(), "p.yaml")
    [corp] = policy.identity.jwt
    assert (corp.name, corp.issuer, corp.audiences) == ("corp", "https://idp.example", ("tokenmeter",))
    assert (corp.tenant_claim, corp.project_claim, corp.team_claim) == ("org", "proj", "team")
    assert corp.subjects == {"alice": Limits.of(requests_per_minute=7)}
    assert json.loads(corp.jwks)["keys"][0]["kid"] == "k1"
    assert not parse_policy(E2E_POLICY.read_text(), "p.yaml").identity.jwt


def test_jwks_may_be_a_file_beside_the_policy(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text(JWKS)
    path = tmp_path / "policy.yaml"
    path.write_text(E2E_POLICY.read_text() + _identity(jwks="keys.json"))
    assert json.loads(load_policy(path).identity.jwt[0].jwks)["keys"][0]["n"] == "sXch"
    path.write_text(E2E_POLICY.read_text() + _identity(jwks="missing.json"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert "cannot read JWKS file" in info.value.reason and info.value.line is not None


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        pytest.param("tenant_claim: org", "tenant_claimm: org", "unknown key 'tenant_claimm'", id="unknown-key"),
        pytest.param("tenant_claim: org", "issuer2: x", "unknown key 'issuer2'", id="unknown-key-2"),
        pytest.param("      tenant_claim: org\n", "", "missing required key 'tenant_claim'", id="no-tenant-claim"),
        pytest.param("project_claim: proj", "project_claim: 'a b'", "is not a claim name", id="bad-claim"),
        pytest.param("      project_claim: proj\n", "", "give project_claim, default_project, or both",
                     id="no-project"),
        pytest.param(JWKS, "{not json", "jwks is not valid JSON", id="bad-json"),
        pytest.param(JWKS, '{"keys": []}', "must be a JWKS", id="no-keys"),
        pytest.param('"e": "AQAB"', '"e": "AQAB", "d": "secret"', "holds a private key", id="private-key"),
        pytest.param("{sub: alice, limits: {requests_per_minute: 7}}",
                     "{sub: alice}\n        - {sub: alice}", "duplicate subject 'alice'", id="dup-subject"),
        pytest.param("requests_per_minute: 7", "requests_per_minute: 0", "must be a positive integer",
                     id="bad-limit"),
    ],
)
def test_a_bad_identity_section_is_refused_with_its_line(old: str, new: str, reason: str) -> None:
    text = _policy()
    assert old in text
    bad = text.replace(old, new, 1)
    err = _error(bad)
    assert reason in err.reason, err
    assert err.line is not None and err.line > _line_of(bad, "identity:")
    assert str(err).startswith(f"p.yaml:{err.line}: ")


def test_a_duplicate_provider_name_or_issuer_names_the_first_line() -> None:
    second = _identity().split("  jwt:\n", 1)[1]
    text = _policy() + second
    err = _error(text)
    assert "duplicate JWT provider name 'corp' (first at line" in err.reason
    err = _error(_policy() + second.replace("name: corp", "name: other"))
    assert "duplicate JWT issuer 'https://idp.example'" in err.reason


def test_jwt_must_be_a_non_empty_list() -> None:
    assert "identity.jwt must be a non-empty list" in _error(E2E_POLICY.read_text() + "identity:\n  jwt: []\n").reason


# -- claims onto the hierarchy -----------------------------------------------------------


def test_claims_name_the_tenant_project_and_team_and_the_key_id_names_the_subject() -> None:
    policy = parse_policy(_policy(), "p.yaml")
    [corp] = policy.identity.jwt
    who = identify_jwt(corp, _claims(sub="bob", org="acme", proj="chat", team="web"), policy)
    assert not isinstance(who, ClaimRefusal)
    assert (who.tenant, who.project, who.team, who.key_id, who.limits) == ("acme", "chat", "web", "jwt:corp:bob",
                                                                          Limits())
    alice = identify_jwt(corp, _claims(sub="alice", org="globex", proj="search"), policy)
    assert not isinstance(alice, ClaimRefusal)
    assert (alice.tenant, alice.team, alice.limits) == ("globex", None, Limits.of(requests_per_minute=7))


@pytest.mark.parametrize(
    ("claims", "code", "words"),
    [
        ({"sub": "x", "proj": "chat"}, "missing_claim", "no 'org' claim"),
        ({"sub": "x", "org": "initech", "proj": "chat"}, "unknown_tenant", "'org' claim names no tenant"),
        ({"sub": "x", "org": ["acme"], "proj": "chat"}, "missing_claim", "no 'org' claim"),
        ({"sub": "x", "org": "acme"}, "missing_claim", "no 'proj' claim"),
        ({"sub": "x", "org": "acme", "proj": "search"}, "unknown_project", "no project of tenant 'acme'"),
        ({"sub": "x", "org": "acme", "proj": "chat", "team": "ops"}, "unknown_team", "no team"),
    ],
)
def test_claims_naming_nothing_of_the_policy_are_refused(claims: dict[str, Any], code: str, words: str) -> None:
    policy = parse_policy(_policy(), "p.yaml")
    who = identify_jwt(policy.identity.jwt[0], _claims(**claims), policy)
    assert isinstance(who, ClaimRefusal) and who.code == code and words in who.message, who
    assert who.key_id == "jwt:corp:x"


def test_a_default_project_serves_tokens_without_a_project_claim() -> None:
    text = _policy().replace("      project_claim: proj\n", "      default_project: chat\n")
    policy = parse_policy(text, "p.yaml")
    who = identify_jwt(policy.identity.jwt[0], _claims(sub="x", org="acme"), policy)
    assert not isinstance(who, ClaimRefusal) and who.project == "chat"


def test_key_ids_are_bounded_and_printable_and_never_shared() -> None:
    assert jwt_key_id("corp", "alice") == "jwt:corp:alice"
    long_a, long_b = jwt_key_id("corp", "a" * 300), jwt_key_id("corp", "a" * 299 + "b")
    assert len(long_a) == len(long_b) == 128 and long_a != long_b
    odd = jwt_key_id("corp", "al ice\n")
    assert odd.isprintable() and " " not in odd and len(odd) <= 128 and odd != jwt_key_id("corp", "al?ice?")


def test_verified_claims_come_from_the_jwt_authn_namespace_under_the_provider_name() -> None:
    policy = parse_policy(_policy(), "p.yaml")
    md = pb.ProcessingRequest().metadata_context.filter_metadata
    assert verified_claims(md, policy) is None
    md[JWT_NAMESPACE].update({"someone_else": {"sub": "x"}})
    assert verified_claims(md, policy) is None
    md[JWT_NAMESPACE].update({"corp": {"sub": "x", "org": "acme"}})
    found = verified_claims(md, policy)
    assert found is not None and found[0].name == "corp" and found[1]["org"] == "acme"


# -- a token is not a key, a key is not a token -----------------------------------------------


def test_a_bearer_jwt_is_never_looked_up_as_a_key_where_the_policy_has_issuers() -> None:
    with_jwt = parse_policy(_policy(), "p.yaml")
    assert identify({"authorization": f"Bearer {JWT}"}, with_jwt) is None
    assert identify({"x-api-key": JWT}, with_jwt) is None
    key = identify({"authorization": "Bearer e2e-basic-key"}, with_jwt)
    assert isinstance(key, ApiKey) and key.key_id == "e2e-basic"


def _verified(req: pb.ProcessingRequest, **claims: Any) -> pb.ProcessingRequest:
    req.metadata_context.filter_metadata[JWT_NAMESPACE].update({"corp": claims})
    return req


async def test_the_processor_attributes_a_verified_token_and_prefers_it_over_a_key() -> None:
    limiter, sink = RecordingLimiter(), ListSink()
    ctx = Context(FixedPolicy(parse_policy(_policy(), "p.yaml")), limiter, sink)
    # the API key still in the request (x-api-key) does not decide: Envoy verified the token
    req = _verified(body_only(CHAT, header="x-api-key"), sub="alice", org="acme", proj="chat", team="web")
    resp = await StreamProcessor(ctx).handle(req)
    assert not resp.HasField("immediate_response"), resp
    md = resp.dynamic_metadata.fields[NAMESPACE].struct_value
    assert (md["tenant"], md["project"], md["team"], md["key_id"]) == ("acme", "chat", "web", "jwt:corp:alice")
    [reservation] = limiter.reserved
    assert reservation.tenant == "acme"
    assert [s.scope for s in reservation.scopes] == ["key:jwt:corp:alice"]
    # the same subject, another tenant in its next token: not a cached scope path of the key id
    await StreamProcessor(ctx).handle(_verified(body_only(CHAT, key=None), sub="alice", org="globex", proj="search"))
    assert limiter.reserved[-1].tenant == "globex"


async def test_the_processor_refuses_a_token_for_an_unknown_tenant_with_403() -> None:
    limiter, sink = RecordingLimiter(), ListSink()
    ctx = Context(FixedPolicy(parse_policy(_policy(), "p.yaml")), limiter, sink)
    resp = await StreamProcessor(ctx).handle(_verified(body_only(CHAT, key=None), sub="bob", org="initech",
                                                       proj="chat"))
    assert resp.immediate_response.status.code == 403
    error = yaml.safe_load(resp.immediate_response.body)["error"]
    assert error["code"] == "unknown_tenant" and "'org'" in error["message"]
    assert limiter.reserved == []
    [rec] = sink.records
    assert (rec.decision, rec.status, rec.key_id, rec.tenant) == ("refused", 403, "jwt:corp:bob", None)


async def test_without_issuers_the_jwt_metadata_is_not_read() -> None:
    ctx = Context(FixedPolicy(load_policy(E2E_POLICY)), RecordingLimiter(), ListSink())
    req = _verified(body_only(CHAT, key=None), sub="bob", org="acme", proj="chat")
    resp = await StreamProcessor(ctx).handle(req)
    assert resp.immediate_response.status.code == 401


async def test_an_unverified_bearer_jwt_is_401_not_a_key() -> None:
    ctx = Context(FixedPolicy(parse_policy(_policy(), "p.yaml")), RecordingLimiter(), ListSink())
    resp = await StreamProcessor(ctx).handle(body_only(CHAT, key=JWT))
    assert resp.immediate_response.status.code == 401


# -- the generated Envoy configuration -----------------------------------------------------


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def test_a_policy_without_issuers_renders_no_jwt_authn() -> None:
    config = render(load_policy(E2E_POLICY))
    text = json.dumps(config)
    assert "jwt_authn" not in text and "invalid_token" not in text


def test_issuers_add_jwt_authn_before_admission_and_forward_its_metadata() -> None:
    policy = parse_policy(_policy(), "p.yaml")
    config = render(policy)
    names = [f["name"] for f in _filters(config)]
    assert names.index("envoy.filters.http.jwt_authn") == names.index("envoy.filters.http.ext_proc") - 1
    jwt = next(f for f in _filters(config) if f["name"] == "envoy.filters.http.jwt_authn")["typed_config"]
    corp = jwt["providers"]["corp"]
    assert (corp["issuer"], corp["audiences"], corp["payload_in_metadata"], corp["forward"]) == (
        "https://idp.example", ["tokenmeter"], "corp", False)
    assert json.loads(corp["local_jwks"]["inline_string"]) == json.loads(JWKS)
    [rule] = jwt["rules"]
    assert rule["requires"] == {"provider_name": "corp"}
    assert rule["match"]["headers"][0]["name"] == "authorization"  # only a bearer JWT is checked
    admission = next(f for f in _filters(config) if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    assert admission["metadata_options"]["forwarding_namespaces"] == {"untyped": [JWT_NAMESPACE]}
    istio = render_istio(policy)
    inserted = [p["patch"]["value"]["name"] for p in istio[0]["spec"]["configPatches"]
                if p["applyTo"] == "HTTP_FILTER"]
    assert "envoy.filters.http.jwt_authn" in inserted
