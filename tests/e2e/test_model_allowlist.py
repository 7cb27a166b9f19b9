"""A key restricted to a list of models, and an operator's model alias, through real Envoy: another
model is refused with 403 model_not_allowed; an alias is served (and recorded) as the model it names."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy.keys import hash_key
from tests.e2e.client import Reply, request, wait_record
from tests.e2e.conftest import E2E_POLICY

RESTRICTED = "e2e-models-key"


@pytest.fixture(scope="module")
def models_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("models")
    policy = run / "policy.yaml"
    text = E2E_POLICY.read_text()
    served = 'models: ["llama-test", "claude-test"]\n'
    assert text.count(served) == 1
    text = text.replace(served, served + "aliases: {gpt-test: llama-test}\n")
    text += (
        "  - id: e2e-models\n"
        f'    sha256: "{hash_key(RESTRICTED)}"\n'
        "    tenant: acme\n"
        "    project: chat\n"
        "    models: [llama-test]\n"
    )
    policy.write_text(text)
    with Stack(StackOptions(policy=policy, run_dir=run / "run")) as s:
        yield s


def _chat(stack: Stack, model: str) -> Reply:
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hello there"}]}
    headers = {"content-type": "application/json", "authorization": f"Bearer {RESTRICTED}"}
    return request(stack.base_url, "POST", "/v1/chat/completions", json.dumps(body).encode(), headers)


def test_a_model_outside_the_keys_list_is_refused_with_403(models_stack: Stack) -> None:
    reply = _chat(models_stack, "claude-test")
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_allowed")
    assert "claude-test" in error["message"] and "e2e-models" in error["message"]
    assert RESTRICTED not in error["message"]
    rec = wait_record(models_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["decision"], rec["model"], rec["key_id"]) == ("refused", "claude-test", "e2e-models")


def test_an_alias_is_served_and_recorded_as_the_model_it_names(models_stack: Stack) -> None:
    reply = _chat(models_stack, "gpt-test")
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "llama-test"  # the fake server echoes the model it was sent
    rec = wait_record(models_stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec["model"] == "llama-test" and rec["decision"] == "admitted", rec
    assert rec["completion_tokens"] <= 16


def test_the_listed_model_is_served(models_stack: Stack) -> None:
    reply = _chat(models_stack, "llama-test")
    assert reply.status == 200 and reply.json()["model"] == "llama-test"
