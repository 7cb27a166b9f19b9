"""JWT identity through a real Envoy: the generated configuration's jwt_authn filter verifies tokens
signed with a key pair made here (its public half is the policy's JWKS), and the processor attributes
the verified claims; API keys keep working in the same stack."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import chat, request, wait_record

E2E_POLICY = Path(__file__).parent / "policy.yaml"
ISSUER = "https://idp.e2e.test"
AUDIENCE = "tokenmeter-e2e"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PUB = KEY.public_key().public_numbers()
JWKS = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "e2e", "n": _int(_PUB.n), "e": _int(_PUB.e)}]}


def token(claims: dict[str, Any], *, key: rsa.RSAPrivateKey = KEY, lifetime: int = 600) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + lifetime, **claims}
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "e2e"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


IDENTITY = """
identity:
  jwt:
    - name: e2e_idp
      issuer: "https://idp.e2e.test"
      audiences: ["tokenmeter-e2e"]
      jwks: jwks.json
      tenant_claim: org
      project_claim: project
      team_claim: team
      subjects:
        - sub: limited-user
          limits: {requests_per_minute: 1}
"""


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("jwt")
    (run / "jwks.json").write_text(json.dumps(JWKS))
    policy = run / "policy.yaml"
    policy.write_text(E2E_POLICY.read_text() + IDENTITY)
    with Stack(StackOptions(policy=policy, run_dir=run / "run")) as s:
        yield s


def test_a_valid_token_is_attributed_to_its_tenant_project_and_team(jwt_stack: Stack) -> None:
    reply = chat(jwt_stack.base_url, token({"sub": "alice", "org": "acme", "project": "chat", "team": "web"}),
                 max_tokens=5)
    assert reply.status == 200, reply.body
    rec = wait_record(jwt_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["project"], rec["team"], rec["key_id"]) == ("acme", "chat", "web", "jwt:e2e_idp:alice")
    assert rec["completion_tokens"] == 5


def test_a_subject_with_its_own_limits_is_held_to_them(jwt_stack: Stack) -> None:
    jwt = token({"sub": "limited-user", "org": "globex", "project": "search"})
    first = chat(jwt_stack.base_url, jwt, max_tokens=5)
    assert first.status == 200, first.body
    second = chat(jwt_stack.base_url, jwt, max_tokens=5)
    assert second.status == 429, second.body
    assert "key:jwt:e2e_idp:limited-user" in second.json()["error"]["message"]


@pytest.mark.parametrize(("case", "status"),
                         [("bad_signature", 401), ("expired", 401), ("wrong_audience", 403), ("unknown_issuer", 401)])
def test_an_invalid_token_is_refused_by_envoy_with_json(jwt_stack: Stack, case: str, status: int) -> None:
    claims: dict[str, Any] = {"sub": "mallory", "org": "acme", "project": "chat"}
    if case == "bad_signature":
        jwt = token(claims, key=OTHER_KEY)
    elif case == "expired":
        jwt = token(claims, lifetime=-3600)
    elif case == "wrong_audience":
        jwt = token({**claims, "aud": "someone-else"})
    else:
        jwt = token({**claims, "iss": "https://evil.test"})
    reply = chat(jwt_stack.base_url, jwt)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == "invalid_token" and "jwt_authn_access_denied" in error["message"], error
    assert "x-tokenmeter-request-id" not in reply.headers  # never reached the processor


def test_an_expired_or_forged_token_is_401(jwt_stack: Stack) -> None:
    for jwt in (token({"sub": "a", "org": "acme", "project": "chat"}, lifetime=-3600),
                token({"sub": "a", "org": "acme", "project": "chat"}, key=OTHER_KEY)):
        assert chat(jwt_stack.base_url, jwt).status == 401


def test_a_valid_token_for_an_unknown_tenant_is_403_naming_the_claim(jwt_stack: Stack) -> None:
    reply = chat(jwt_stack.base_url, token({"sub": "bob", "org": "initech", "project": "chat"}))
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["code"] == "unknown_tenant" and "'org'" in error["message"] and "initech" in error["message"]
    rec = wait_record(jwt_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["decision"], rec["status"], rec["key_id"]) == ("refused", 403, "jwt:e2e_idp:bob")


def test_a_valid_token_for_an_unknown_project_is_403(jwt_stack: Stack) -> None:
    reply = chat(jwt_stack.base_url, token({"sub": "bob", "org": "acme", "project": "search"}))
    assert reply.status == 403, reply.body
    assert reply.json()["error"]["code"] == "unknown_project"


def test_an_api_key_still_works_in_the_same_stack(jwt_stack: Stack) -> None:
    reply = chat(jwt_stack.base_url, "e2e-basic-key", max_tokens=5)
    assert reply.status == 200, reply.body
    rec = wait_record(jwt_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec["key_id"] == "e2e-basic"
    assert chat(jwt_stack.base_url, "e2e-nobody-key").status == 401


def test_a_token_is_never_a_key_and_a_key_header_cannot_carry_one(jwt_stack: Stack) -> None:
    jwt = token({"sub": "alice", "org": "acme", "project": "chat"})
    # In x-api-key Envoy does not verify it: the processor must not take it for a key either.
    reply = request(jwt_stack.base_url, "POST", "/v1/chat/completions",
                    json.dumps({"model": "llama-test", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                    {"content-type": "application/json", "x-api-key": jwt})
    assert reply.status == 401, reply.body
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_client_attribution_headers_cannot_override_the_tokens_claims(jwt_stack: Stack) -> None:
    jwt = token({"sub": "alice", "org": "acme", "project": "chat", "team": "web"})
    reply = chat(jwt_stack.base_url, jwt, max_tokens=5,
                 extra_headers={"x-tokenmeter-tenant": "globex", "x-tokenmeter-key-id": "forged"})
    assert reply.status == 200, reply.body
    assert reply.headers["x-fake-seen-tenant"] == "acme"  # the route's attribution, not the client's
    rec = wait_record(jwt_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["key_id"]) == ("acme", "jwt:e2e_idp:alice")
