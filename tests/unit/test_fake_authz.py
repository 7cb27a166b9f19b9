"""The fake authenticator (extproc.fakes.authz): table tokens get their identity headers, API keys
and credential-less requests pass with none, anything else is a 401 with a JSON error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.fakes.authz import Table, build_app
from extproc.policy.keys import hash_key

TABLE = f"""
tokens:
  tok-alice: {{X-Auth-Tenant: acme, x-auth-project: chat, x-auth-user: alice}}
api_keys: ["{hash_key("e2e-basic-key")}"]
"""


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(Table.parse(TABLE)))) as c:
        yield c


async def test_a_table_token_is_answered_with_its_headers_whatever_the_method_and_path(
        client: TestClient[Any, Any]) -> None:
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        resp = await client.request(method, path, headers={"authorization": "Bearer tok-alice"})
        assert resp.status == 200
        assert (resp.headers["x-auth-tenant"], resp.headers["x-auth-project"], resp.headers["x-auth-user"]) == (
            "acme", "chat", "alice")


async def test_an_api_key_or_no_credential_passes_without_identity_headers(client: TestClient[Any, Any]) -> None:
    for headers in ({"authorization": "Bearer e2e-basic-key"}, {"x-api-key": "e2e-basic-key"}, {}):
        resp = await client.post("/v1/chat/completions", headers=headers)
        assert resp.status == 200, headers
        assert not [h for h in resp.headers if h.lower().startswith("x-auth-")]


async def test_an_unknown_credential_is_401_json(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/chat/completions", headers={"authorization": "Bearer stolen"})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_token"
    assert "x-auth-tenant" not in resp.headers


def test_the_policys_keys_can_be_added_and_a_bad_table_is_refused() -> None:
    table = Table.parse("tokens: {}", [hash_key("other-key")])
    assert table.answer({"x-api-key": "other-key"}) == (200, {})
    with pytest.raises(ValueError, match="must map to"):
        Table.parse("tokens: {t: [x]}")
    with pytest.raises(ValueError, match="mapping with"):
        Table.parse("token: {}")
