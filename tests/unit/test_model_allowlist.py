"""Model aliases and per-key model allow-lists: the loader (with file:line errors), canonical names,
and the processor's 403 model_not_allowed and the alias rewritten in the forwarded body."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from extproc.policy import PolicyError, hash_key, parse_policy
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink
from tests.unit.test_native_admission_and_settlement import CHAT, RecordingLimiter, body_only

E2E_POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
MARK = "#<"

HEAD = """\
version: "m-1"
models: ["llama-test", "claude-test"]
aliases: {gpt-test: llama-test, "org/llama:latest": llama-test}
pools:
  - name: only
tenants:
  acme:
    projects:
      chat: {}
keys:
  - id: k
    sha256: "DIGEST"
    tenant: acme
    project: chat
""".replace("DIGEST", hash_key("raw-k"))


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value


def _marked_line(text: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if MARK in line)


# -- the loader ---------------------------------------------------------------------------


def test_aliases_and_a_key_allow_list_are_read_and_resolved() -> None:
    policy = parse_policy(HEAD + "    models: [gpt-test, claude-test]\n", "p.yaml")
    assert dict(policy.aliases) == {"gpt-test": "llama-test", "org/llama:latest": "llama-test"}
    key = policy.key_for_hash(hash_key("raw-k"))
    assert key is not None and key.models == frozenset({"llama-test", "claude-test"})  # canonical names


def test_canonical_model_is_the_alias_target_or_the_name_itself() -> None:
    policy = parse_policy(HEAD, "p.yaml")
    assert policy.canonical_model("gpt-test") == "llama-test"
    assert policy.canonical_model("org/llama:latest") == "llama-test"
    assert policy.canonical_model("llama-test") == "llama-test"
    assert policy.canonical_model("unknown") == "unknown"


def test_without_aliases_or_allow_list_nothing_changes() -> None:
    policy = parse_policy(E2E_POLICY.read_text(), "p.yaml")
    assert dict(policy.aliases) == {} and policy.canonical_model("gpt-test") == "gpt-test"
    assert all(key.models is None for key in policy.keys_by_sha256.values())


def test_without_models_aliases_and_allow_lists_name_any_model() -> None:
    text = HEAD.replace('models: ["llama-test", "claude-test"]\n', "") + "    models: [gpt-test, other]\n"
    policy = parse_policy(text, "p.yaml")
    key = policy.key_for_hash(hash_key("raw-k"))
    assert key is not None and key.models == frozenset({"llama-test", "other"})


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        pytest.param("aliases: {gpt-test: llama-test, ", "aliases: {gpt-test: mistral,  #<\n  ",
                     "alias 'gpt-test' names 'mistral', which is not listed under models", id="unknown-target"),
        pytest.param("aliases: {gpt-test: llama-test, ", "aliases: {claude-test: llama-test,  #<\n  ",
                     "alias 'claude-test' is a model listed under models", id="alias-is-a-model"),
        pytest.param("aliases: {gpt-test: llama-test, ", "aliases: {gpt-test: [llama-test],  #<\n  ",
                     "aliases.gpt-test must be a string", id="target-not-a-string"),
        pytest.param("aliases: {gpt-test: llama-test, ", "aliases: {gpt-test: llama-test, gpt-test: x,  #<\n  ",
                     "duplicate model 'gpt-test' in aliases", id="duplicate-alias"),
        pytest.param('aliases: {gpt-test: llama-test, "org/llama:latest": llama-test}', "aliases: [gpt-test]  #<",
                     "aliases must be a mapping of model names to models", id="not-a-mapping"),
        pytest.param("    project: chat\n", "    project: chat\n    models: [llama-test, mistral]  #<\n",
                     "key 'k': model 'mistral' in keys[0].models is not listed under models", id="unlisted"),
        pytest.param("    project: chat\n", "    project: chat\n    models: []  #<\n",
                     "key 'k': keys[0].models must be a non-empty list of model names", id="empty"),
        pytest.param("    project: chat\n", "    project: chat\n    models: llama-test  #<\n",
                     "key 'k': keys[0].models must be a non-empty list", id="not-a-list"),
        pytest.param("    project: chat\n",
                     "    project: chat\n    models:\n      - llama-test\n      - llama-test  #<\n",
                     "key 'k': duplicate model 'llama-test' in keys[0].models (first at line 16)", id="duplicate"),
    ],
)
def test_invalid_aliases_and_allow_lists_name_their_line(old: str, new: str, reason: str) -> None:
    assert HEAD.count(old) == 1, old
    text = HEAD.replace(old, new)
    error = _error(text)
    assert error.line == _marked_line(text), str(error)
    assert reason in error.reason, str(error)
    assert str(error).startswith(f"p.yaml:{error.line}: ")


def test_an_alias_of_an_alias_is_refused_without_models() -> None:
    text = HEAD.replace('models: ["llama-test", "claude-test"]\n', "").replace(
        'aliases: {gpt-test: llama-test, "org/llama:latest": llama-test}',
        'aliases:\n  a: b\n  c: a  #<')
    error = _error(text)
    assert error.line == _marked_line(text) and "which is itself an alias" in error.reason


# -- the processor ------------------------------------------------------------------------

RESTRICTED = f"""\
  - id: e2e-models
    sha256: "{hash_key("e2e-models-key")}"
    tenant: acme
    project: chat
    models: [llama-test]
"""


def _ctx(limiter: RecordingLimiter, sink: ListSink) -> Context:
    text = E2E_POLICY.read_text().replace(
        'models: ["llama-test", "claude-test"]\n',
        'models: ["llama-test", "claude-test"]\naliases: {gpt-test: llama-test}\n', 1) + RESTRICTED
    return Context(FixedPolicy(parse_policy(text, "p.yaml")), limiter, sink)


async def test_a_model_outside_the_allow_list_is_refused_with_403_before_reserving() -> None:
    limiter, sink = RecordingLimiter(), ListSink()
    resp = await StreamProcessor(_ctx(limiter, sink)).handle(
        body_only({**CHAT, "model": "claude-test"}, key="e2e-models-key"))
    assert resp.immediate_response.status.code == 403
    error = orjson.loads(resp.immediate_response.body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_allowed")
    assert "claude-test" in error["message"] and "e2e-models" in error["message"]
    assert "e2e-models-key" not in error["message"]
    assert limiter.reserved == []
    [rec] = sink.records
    assert (rec.decision, rec.status, rec.model, rec.key_id) == ("refused", 403, "claude-test", "e2e-models")


async def test_a_long_model_name_is_bounded_in_the_refusal() -> None:
    resp = await StreamProcessor(_ctx(RecordingLimiter(), ListSink())).handle(
        body_only({**CHAT, "model": "x" * 5000}, key="e2e-models-key"))
    assert resp.immediate_response.status.code == 403
    assert len(orjson.loads(resp.immediate_response.body)["error"]["message"]) < 400


async def test_an_alias_is_admitted_as_its_canonical_model_and_forwarded_so() -> None:
    limiter, sink = RecordingLimiter(), ListSink()
    ctx = _ctx(limiter, sink)
    proc = StreamProcessor(ctx)
    resp = await proc.handle(body_only({**CHAT, "model": "gpt-test", "stream": True}, key="e2e-models-key"))
    assert not resp.HasField("immediate_response")
    forwarded = orjson.loads(resp.request_body.response.body_mutation.body)
    assert forwarded["model"] == "llama-test"
    assert forwarded["stream_options"] == {"include_usage": True}  # the later edits kept the rename
    assert forwarded["max_tokens"] == 10
    assert proc.s.record is not None and proc.s.record.model == "llama-test"


async def test_an_alias_with_no_other_edit_still_forwards_the_canonical_name() -> None:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    resp = await StreamProcessor(_ctx(RecordingLimiter(), ListSink())).handle(body_only(body))
    assert orjson.loads(resp.request_body.response.body_mutation.body) == {**body, "model": "llama-test"}


async def test_a_canonical_name_is_forwarded_unchanged() -> None:
    resp = await StreamProcessor(_ctx(RecordingLimiter(), ListSink())).handle(
        body_only(CHAT, key="e2e-models-key"))
    assert not resp.HasField("immediate_response")
    assert not resp.request_body.response.HasField("body_mutation")
