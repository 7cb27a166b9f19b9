"""Identity from trusted headers through a real Envoy: the generated configuration's ext_authz filter
asks a fake authenticator (extproc.fakes.authz) about each request's credentials, and sets the
identity headers it answers with; the processor attributes them. A client's own copy of those
headers is stripped before the authenticator runs, and API keys keep working in the same stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack import commands
from extproc.devstack.ports import free_port, wait_for_port
from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import chat, request, wait_record
from tests.unit.policy_files import trusted_headers_section

E2E_POLICY = Path(__file__).parent / "policy.yaml"

SUBJECTS = "      - {sub: limited-user, limits: {requests_per_minute: 1}}\n"

TABLE = {"tokens": {
    "tok-alice": {"x-auth-tenant": "acme", "x-auth-project": "chat", "x-auth-team": "web", "x-auth-user": "alice"},
    "tok-bob": {"x-auth-tenant": "acme", "x-auth-user": "bob"},  # no project: the default one
    "tok-limited": {"x-auth-tenant": "globex", "x-auth-project": "search", "x-auth-user": "limited-user"},
    "tok-initech": {"x-auth-tenant": "initech", "x-auth-user": "carol"},
}}


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """The fake authenticator, and the policy naming it (the e2e policy + `identity.trusted_headers`)."""
    run = tmp_path_factory.mktemp("trusted")
    port = free_port()
    policy = run / "policy.yaml"
    policy.write_text(E2E_POLICY.read_text() + trusted_headers_section(f"127.0.0.1:{port}", SUBJECTS))
    table = run / "table.yaml"
    table.write_text(json.dumps(TABLE))
    argv = commands.fake_authz_argv(table=str(table), host="127.0.0.1", port=port, policy=str(policy))
    with open(run / "authz.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv[1:]], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield policy, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sso_stack(authz: tuple[Path, subprocess.Popen[bytes]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policy, _ = authz
    with Stack(StackOptions(policy=policy, run_dir=tmp_path_factory.mktemp("trusted-run"))) as s:
        yield s


def test_a_token_the_authenticator_knows_is_attributed_to_the_identity_it_asserts(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, "tok-alice", max_tokens=5)
    assert reply.status == 200, reply.body
    assert reply.headers["x-fake-seen-tenant"] == "acme"  # the route's attribution, upstream
    rec = wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["project"], rec["team"], rec["key_id"]) == ("acme", "chat", "web", "hdr:corp-sso:alice")
    assert rec["completion_tokens"] == 5


def test_without_a_project_header_the_default_project_serves(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, "tok-bob", max_tokens=5)
    assert reply.status == 200, reply.body
    rec = wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["project"], rec["team"], rec["key_id"]) == ("acme", "chat", None, "hdr:corp-sso:bob")


def test_a_request_without_a_body_is_attributed_too(sso_stack: Stack) -> None:
    reply = request(sso_stack.base_url, "GET", "/v1/models", headers={"authorization": "Bearer tok-alice"})
    assert reply.status == 404, reply.body  # admitted: the fake model server has no /v1/models
    rec = wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["key_id"]) == ("acme", "hdr:corp-sso:alice")
    anonymous = request(sso_stack.base_url, "GET", "/v1/models", headers={"x-auth-tenant": "acme"})
    assert anonymous.status == 401, anonymous.body


def test_a_client_cannot_assert_its_own_tenant_next_to_an_api_key(sso_stack: Stack) -> None:
    forged = {"x-auth-tenant": "globex", "x-auth-project": "search", "x-auth-user": "mallory"}
    reply = chat(sso_stack.base_url, "e2e-basic-key", max_tokens=5, extra_headers=forged)
    assert reply.status == 200, reply.body
    rec = wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["tenant"], rec["project"], rec["key_id"]) == ("acme", "chat", "e2e-basic")


def test_a_client_asserting_a_tenant_without_credentials_is_refused(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, None, extra_headers={"x-auth-tenant": "acme", "x-auth-user": "alice"})
    assert reply.status == 401, reply.body
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_an_unknown_token_is_refused_by_the_authenticator_with_json(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, "tok-stolen", extra_headers={"x-auth-tenant": "acme"})
    assert reply.status == 401, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == "invalid_credentials" and "401" in error["message"], error
    assert "x-tokenmeter-request-id" not in reply.headers  # never reached the processor


def test_an_asserted_tenant_the_policy_does_not_know_is_403_naming_the_header(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, "tok-initech")
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["code"] == "unknown_tenant" and "'x-auth-tenant'" in error["message"] and "initech" in error["message"]
    rec = wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["decision"], rec["status"], rec["key_id"]) == ("refused", 403, "hdr:corp-sso:carol")


def test_a_subject_with_its_own_limits_is_held_to_them(sso_stack: Stack) -> None:
    first = chat(sso_stack.base_url, "tok-limited", max_tokens=5)
    assert first.status == 200, first.body
    second = chat(sso_stack.base_url, "tok-limited", max_tokens=5)
    assert second.status == 429, second.body
    assert "key:hdr:corp-sso:limited-user" in second.json()["error"]["message"]


def test_an_api_key_still_works_and_an_unknown_one_is_refused(sso_stack: Stack) -> None:
    reply = chat(sso_stack.base_url, "e2e-basic-key", max_tokens=5)
    assert reply.status == 200, reply.body
    assert wait_record(sso_stack.usage_log, reply.headers["x-tokenmeter-request-id"])["key_id"] == "e2e-basic"
    assert chat(sso_stack.base_url, "e2e-nobody-key").status == 401


def test_without_the_authenticator_nothing_is_let_through(
        sso_stack: Stack, authz: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """Fail closed (last in this module: it stops the authenticator)."""
    _, proc = authz
    proc.terminate()
    proc.wait(timeout=10)
    reply = chat(sso_stack.base_url, "tok-alice")
    assert reply.status == 503, reply.body
    assert reply.json()["error"]["code"] == "gateway_error"
