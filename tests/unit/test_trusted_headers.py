"""Identity from trusted headers (`identity.trusted_headers`): the headers an authenticator Envoy
consults (ext_authz) sets, mapped onto the hierarchy; the processor taking them over a key only when
their tenant header is there; and the generated Envoy configuration (the client's copies stripped,
ext_authz before admission, the headers carried to the processor)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.envoy.config import AUTHORIZER_CLUSTER, render, render_istio
from extproc.limiter.types import Decision, Measure, Reservation
from extproc.policy import load_policy
from extproc.policy.model import Identity, JwtProvider, LimitRule, Limits, Policy, TrustedHeaders
from extproc.service.identity import ClaimRefusal, asserted_by, identify_trusted, trusted_key_id
from extproc.service.metadata import ATTRIBUTE_HEADERS, NAMESPACE, attribute_header, header_attribute
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink

E2E_POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
ATTRS = "envoy.filters.http.ext_proc"
ALICE_LIMITS = Limits(rules=(LimitRule(Measure.TOKENS, 1000, window_s=60.0),))
SSO = TrustedHeaders(
    name="corp-sso",
    authorizer="127.0.0.1:9000",
    tenant_header="x-auth-tenant",
    project_header="x-auth-project",
    default_project="chat",
    team_header="x-auth-team",
    subject_header="x-auth-user",
    subjects={"alice": ALICE_LIMITS},
)
JWKS = json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "kid": "k1", "n": "sXch", "e": "AQAB"}]})
CORP_JWT = JwtProvider(name="corp", issuer="https://idp.example", jwks=JWKS, tenant_claim="org",
                       default_project="chat")


def _policy(trusted: TrustedHeaders | None = SSO, jwt: tuple[JwtProvider, ...] = ()) -> Policy:
    return dataclasses.replace(load_policy(E2E_POLICY), identity=Identity(jwt=jwt, trusted_headers=trusted))


def _asserted(**values: str) -> dict[str, str]:
    return {f"x-auth-{k}": v for k, v in values.items()}


# -- headers onto the hierarchy ------------------------------------------------------------


def test_the_headers_name_tenant_project_team_and_the_subject_names_the_principal() -> None:
    policy = _policy()
    who = identify_trusted(_asserted(tenant="acme", project="chat", team="web", user="bob"), SSO, policy)
    assert not isinstance(who, ClaimRefusal)
    assert (who.tenant, who.project, who.team, who.key_id, who.limits) == (
        "acme", "chat", "web", "hdr:corp-sso:bob", Limits())
    alice = identify_trusted(_asserted(tenant="globex", project="search", user="alice"), SSO, policy)
    assert not isinstance(alice, ClaimRefusal)
    assert (alice.tenant, alice.project, alice.team, alice.limits) == ("globex", "search", None, ALICE_LIMITS)


def test_without_a_project_header_the_default_project_serves_and_without_a_subject_the_tenant_does() -> None:
    who = identify_trusted(_asserted(tenant="acme"), SSO, _policy())
    assert not isinstance(who, ClaimRefusal)
    assert (who.project, who.key_id, who.limits) == ("chat", "hdr:corp-sso:acme", Limits())
    # a subject named like a tenant gets its limits only when the subject header names it
    only_tenant = dataclasses.replace(SSO, subject_header=None, subjects={"acme": ALICE_LIMITS})
    tenant_principal = identify_trusted(_asserted(tenant="acme", user="acme"), only_tenant, _policy(only_tenant))
    assert not isinstance(tenant_principal, ClaimRefusal) and tenant_principal.limits == Limits()


@pytest.mark.parametrize(
    ("headers", "code", "words"),
    [
        ({"tenant": ""}, "missing_header", "'x-auth-tenant' header names no tenant"),
        ({"tenant": "initech"}, "unknown_tenant", "'x-auth-tenant' header names no tenant of this gateway"),
        ({"tenant": "globex"}, "unknown_project", "'corp-sso' default_project names no project of tenant 'globex'"),
        ({"tenant": "acme", "project": "search"}, "unknown_project", "'x-auth-project' header names no project"),
        ({"tenant": "acme", "project": "chat", "team": "ops"}, "unknown_team", "names no team of project 'acme.chat'"),
        ({"tenant": "acme", "user": "u" * 1025}, "invalid_header", "'x-auth-user' header is longer than 1024"),
        ({"tenant": "acme" + "x" * 2000}, "invalid_header", "'x-auth-tenant' header is longer than 1024"),
    ],
)
def test_headers_naming_nothing_of_the_policy_are_refused(headers: dict[str, str], code: str, words: str) -> None:
    who = identify_trusted(_asserted(**headers), SSO, _policy())
    assert isinstance(who, ClaimRefusal) and who.code == code and words in who.message, who
    assert who.key_id.startswith("hdr:corp-sso:") and len(who.key_id) <= 128
    assert len(who.message) < 300  # a long value is never echoed whole


def test_without_a_default_project_a_missing_project_header_is_refused() -> None:
    strict = dataclasses.replace(SSO, default_project=None)
    who = identify_trusted(_asserted(tenant="acme"), strict, _policy(strict))
    assert isinstance(who, ClaimRefusal) and who.code == "missing_header" and "'x-auth-project'" in who.message


def test_key_ids_are_bounded_printable_and_never_shared() -> None:
    assert trusted_key_id("corp-sso", "alice") == "hdr:corp-sso:alice"
    long_a, long_b = trusted_key_id("corp-sso", "a" * 300), trusted_key_id("corp-sso", "a" * 299 + "b")
    assert len(long_a) == len(long_b) == 128 and long_a != long_b
    odd = trusted_key_id("corp-sso", "al ice\t")
    assert odd.isprintable() and " " not in odd and odd != trusted_key_id("corp-sso", "al?ice?")


def test_only_the_tenant_header_makes_the_headers_the_identity() -> None:
    policy = _policy()
    assert asserted_by(_asserted(tenant="acme"), policy) is SSO
    assert asserted_by(_asserted(project="chat", user="alice"), policy) is None
    assert asserted_by(_asserted(tenant="acme"), _policy(trusted=None)) is None


def test_a_header_attribute_stands_for_its_header() -> None:
    assert header_attribute("x-auth-tenant") == "request.headers['x-auth-tenant']"
    assert attribute_header(header_attribute("x-auth-tenant")) == "x-auth-tenant"
    assert all(attribute_header(a) == h for a, h in ATTRIBUTE_HEADERS.items())
    assert attribute_header("request.headers['']") is None and attribute_header("source.address") is None
    assert attribute_header(header_attribute("x-odd'name")) == "x-odd'name"  # ' is a header character


# -- the processor --------------------------------------------------------------------------


class _Limiter:
    """Admits everything, keeping what it was asked."""

    def __init__(self) -> None:
        self.reserved: list[Reservation] = []

    async def reserve(self, r: Reservation) -> Decision:
        self.reserved.append(r)
        return Decision(allowed=True, pool="h100")

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


CHAT = {"model": "llama-test", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def _body(key: str | None = None, **asserted: str) -> pb.ProcessingRequest:
    """What the generated configuration sends: the body, headers (trusted ones too) as attributes."""
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=orjson.dumps(CHAT), end_of_stream=True))
    attrs: dict[str, Any] = {"request.path": "/v1/chat/completions", "request.method": "POST", "request.id": "e-1"}
    if key is not None:
        attrs["request.headers['authorization']"] = f"Bearer {key}"
    attrs.update({header_attribute(h): v for h, v in _asserted(**asserted).items()})
    req.attributes[ATTRS].update(attrs)
    return req


async def _handle(policy: Policy, req: pb.ProcessingRequest) -> tuple[pb.ProcessingResponse, _Limiter, ListSink]:
    limiter, sink = _Limiter(), ListSink()
    resp = await StreamProcessor(Context(FixedPolicy(policy), limiter, sink)).handle(req)
    return resp, limiter, sink


async def test_the_processor_attributes_the_asserted_headers_over_the_key_still_in_the_request() -> None:
    resp, limiter, _ = await _handle(_policy(), _body("e2e-basic-key", tenant="globex", project="search",
                                                      user="alice"))
    assert not resp.HasField("immediate_response"), resp
    md = resp.dynamic_metadata.fields[NAMESPACE].struct_value
    assert (md["tenant"], md["project"], md["team"], md["key_id"]) == ("globex", "search", "", "hdr:corp-sso:alice")
    [reservation] = limiter.reserved
    assert reservation.tenant == "globex"
    assert "key:hdr:corp-sso:alice" in [s.scope for s in reservation.scopes]


async def test_without_the_tenant_header_the_key_identifies_the_caller() -> None:
    resp, _, _ = await _handle(_policy(), _body("e2e-basic-key", project="search", user="alice"))
    md = resp.dynamic_metadata.fields[NAMESPACE].struct_value
    assert (md["tenant"], md["key_id"]) == ("acme", "e2e-basic")
    resp, _, _ = await _handle(_policy(), _body(None))
    assert resp.immediate_response.status.code == 401


async def test_without_trusted_headers_in_the_policy_the_headers_are_ignored() -> None:
    resp, _, _ = await _handle(_policy(trusted=None), _body(None, tenant="acme"))
    assert resp.immediate_response.status.code == 401


async def test_asserted_headers_take_precedence_over_a_verified_token() -> None:
    req = _body(None, tenant="acme", user="carol")
    req.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update({"corp": {"sub": "x", "org": "globex"}})
    resp, _, _ = await _handle(_policy(jwt=(CORP_JWT,)), req)
    md = resp.dynamic_metadata.fields[NAMESPACE].struct_value
    assert (md["tenant"], md["key_id"]) == ("acme", "hdr:corp-sso:carol")


async def test_the_same_subject_in_another_tenant_is_not_a_cached_scope_path() -> None:
    policy = _policy()
    limiter, sink = _Limiter(), ListSink()
    ctx = Context(FixedPolicy(policy), limiter, sink)
    await StreamProcessor(ctx).handle(_body(None, tenant="acme", user="dave"))
    await StreamProcessor(ctx).handle(_body(None, tenant="globex", project="search", user="dave"))
    assert [r.tenant for r in limiter.reserved] == ["acme", "globex"]


async def test_an_unknown_tenant_is_403_naming_the_header_and_recorded() -> None:
    resp, limiter, sink = await _handle(_policy(), _body(None, tenant="initech", user="mallory"))
    assert resp.immediate_response.status.code == 403
    error = orjson.loads(resp.immediate_response.body)["error"]
    assert error["code"] == "unknown_tenant" and "'x-auth-tenant'" in error["message"] and "initech" in error["message"]
    assert limiter.reserved == []
    [rec] = sink.records
    assert (rec.decision, rec.status, rec.key_id, rec.tenant) == ("refused", 403, "hdr:corp-sso:mallory", None)


# -- the generated Envoy configuration -----------------------------------------------------


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in _hcm(config)["http_filters"] if f["name"] == name)["typed_config"]
    return found


def test_a_policy_without_trusted_headers_renders_no_ext_authz() -> None:
    text = json.dumps(render(_policy(trusted=None)))
    assert "ext_authz" not in text and AUTHORIZER_CLUSTER not in text and "x-auth-" not in text


def test_the_clients_copies_are_stripped_first_and_ext_authz_runs_after_jwt_before_admission() -> None:
    config = render(_policy(jwt=(CORP_JWT,)))
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    mutation = names.index("envoy.filters.http.header_mutation")
    assert mutation < names.index("envoy.filters.http.jwt_authn") < names.index("envoy.filters.http.ext_authz")
    assert names.index("envoy.filters.http.ext_authz") == names.index("envoy.filters.http.ext_proc") - 1
    removed = _filter(config, "envoy.filters.http.header_mutation")["mutations"]["request_mutations"]
    assert {m["remove"] for m in removed if "remove" in m} == set(SSO.headers)


def test_ext_authz_asks_the_authorizer_with_the_credentials_and_takes_only_the_trusted_headers() -> None:
    config = render(_policy())
    authz = _filter(config, "envoy.filters.http.ext_authz")
    service = authz["http_service"]
    assert service["server_uri"]["cluster"] == AUTHORIZER_CLUSTER
    assert float(service["server_uri"]["timeout"].rstrip("s")) <= 1
    allowed = [p["exact"] for p in service["authorization_response"]["allowed_upstream_headers"]["patterns"]]
    assert sorted(allowed) == sorted(["x-auth-tenant", "x-auth-project", "x-auth-team", "x-auth-user"])
    assert [p["exact"] for p in authz["allowed_headers"]["patterns"]] == ["authorization", "x-api-key"]
    assert authz["failure_mode_allow"] is False
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == AUTHORIZER_CLUSTER)
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("127.0.0.1", 9000)


def test_the_processor_is_sent_the_trusted_headers_and_the_model_server_is_not() -> None:
    config = render(_policy())
    admission = _filter(config, "envoy.filters.http.ext_proc")
    carried = {attribute_header(a) for a in admission["request_attributes"]}
    assert set(SSO.headers) <= carried
    forwarded = {p["exact"] for p in admission["forward_rules"]["allowed_headers"]["patterns"]}
    assert set(SSO.headers) <= forwarded  # a request without a body: its headers
    removed = _hcm(config)["route_config"]["virtual_hosts"][0]["request_headers_to_remove"]
    assert set(SSO.headers) <= set(removed)


def test_a_refusal_of_the_authorizer_keeps_its_status_with_a_json_body() -> None:
    mappers = _hcm(render(_policy()))["local_reply_config"]["mappers"]
    [denied] = [m for m in mappers if "ext_authz_denied" in json.dumps(m["filter"])]
    assert "status_code" not in denied  # the authorizer's status goes to the client
    body = denied["body_format_override"]
    assert body["content_type"] == "application/json" and body["json_format"]["error"]["code"] == "invalid_credentials"
    assert mappers.index(denied) < len(mappers) - 1  # before the catch-all gateway_error


def test_istio_points_ext_authz_at_the_authorizers_service() -> None:
    policy = _policy(dataclasses.replace(SSO, authorizer="sso.auth.svc.cluster.local:8080"))
    patches = render_istio(policy)[0]["spec"]["configPatches"]
    inserted = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    authz = next(f for f in inserted if f["name"] == "envoy.filters.http.ext_authz")["typed_config"]
    assert authz["http_service"]["server_uri"]["cluster"] == "outbound|8080||sso.auth.svc.cluster.local"
    mutation = next(f for f in inserted if f["name"] == "envoy.filters.http.header_mutation")["typed_config"]
    assert {m.get("remove") for m in mutation["mutations"]["request_mutations"]} >= set(SSO.headers)
