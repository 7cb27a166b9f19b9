"""Key lifecycle through a real Envoy: disabled, expired, not-yet-valid and rotated keys; a key made
with `tokenmeter keys new` works once the processor has reloaded the policy file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy import hash_key
from tests.e2e.client import chat, wait_for, wait_record

E2E_POLICY = Path(__file__).parent / "policy.yaml"
TOKENMETER = str(Path(sys.executable).parent / "tokenmeter")

DISABLED, EXPIRED, EARLY = "e2e-disabled-key", "e2e-expired-key", "e2e-early-key"
ROTATED_NEW, ROTATED_OLD, ROTATED_OLDER = "e2e-rotated-new-key", "e2e-rotated-old-key", "e2e-rotated-older-key"


def _entry(key_id: str, raw: str, extra: str) -> str:
    return f'  - id: {key_id}\n    sha256: "{hash_key(raw)}"\n    tenant: globex\n    project: search\n{extra}'


LIFECYCLE = "".join([
    _entry("e2e-disabled", DISABLED, '    disabled: true\n    reason: "suspended by billing"\n'),
    _entry("e2e-expired", EXPIRED, "    expires: 2001-01-01T00:00:00Z\n"),
    _entry("e2e-early", EARLY, '    not_before: "2999-01-01T00:00:00+00:00"\n'),
    _entry("e2e-rotated", ROTATED_NEW,
           "    previous:\n"
           f'      - sha256: "{hash_key(ROTATED_OLD)}"\n'
           "        valid_until: 2999-01-01T00:00:00Z\n"
           f'      - {{sha256: "{hash_key(ROTATED_OLDER)}", valid_until: 2001-01-01T00:00:00Z}}\n'),
])


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = tmp_path_factory.mktemp("keys")
    policy = run / "policy.yaml"
    policy.write_text(E2E_POLICY.read_text() + LIFECYCLE)
    with Stack(StackOptions(policy=policy, run_dir=run / "run")) as s:
        yield s


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (DISABLED, "key_disabled", "API key 'e2e-disabled' is disabled: suspended by billing"),
        (EXPIRED, "key_expired", "API key 'e2e-expired' expired at 2001-01-01T00:00:00Z."),
        (EARLY, "key_not_yet_valid", "API key 'e2e-early' is not valid before 2999-01-01T00:00:00Z."),
        (ROTATED_OLDER, "key_expired", "API key 'e2e-rotated' was rotated"),
    ],
)
def test_a_known_key_out_of_its_lifecycle_gets_403_with_the_reason(
    keyed: Stack, raw: str, code: str, message: str
) -> None:
    reply = chat(keyed.base_url, raw)
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(message)
    assert raw.encode() not in reply.body and hash_key(raw).encode() not in reply.body
    rec = wait_record(keyed.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["decision"], rec["status"], rec["tenant"], rec["completion_tokens"]) == ("refused", 403, "globex", 0)


def test_old_and_new_keys_of_a_rotation_both_work_within_the_grace_period(keyed: Stack) -> None:
    for raw in (ROTATED_NEW, ROTATED_OLD):
        reply = chat(keyed.base_url, raw, max_tokens=5)
        assert reply.status == 200, reply.body
        rec = wait_record(keyed.usage_log, reply.headers["x-tokenmeter-request-id"])
        assert rec["key_id"] == "e2e-rotated" and rec["completion_tokens"] == 5


def test_an_unknown_key_is_still_401(keyed: Stack) -> None:
    reply = chat(keyed.base_url, "e2e-nobody-key")
    assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_a_key_from_keys_new_is_admitted_after_the_reload_and_a_disabled_one_refused(keyed: Stack) -> None:
    policy = keyed.opts.policy
    made = subprocess.run(
        [TOKENMETER, "keys", "new", "--policy", str(policy), "--tenant", "acme", "--project", "chat",
         "--team", "web", "--id", "e2e-made"],
        capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    raw = made.stdout.strip()
    reply = wait_for(lambda: (r := chat(keyed.base_url, raw, max_tokens=3)).status == 200 and r, timeout=15)
    assert reply, "the new key was not admitted after the policy reload"
    rec = wait_record(keyed.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert (rec["key_id"], rec["tenant"], rec["team"]) == ("e2e-made", "acme", "web")

    text = policy.read_text()
    assert "  - id: e2e-made\n" in text
    policy.write_text(text.replace("  - id: e2e-made\n", "  - id: e2e-made\n    disabled: true\n"))
    refused = wait_for(lambda: (r := chat(keyed.base_url, raw)).status == 403 and r, timeout=15)
    assert refused and refused.json()["error"]["code"] == "key_disabled"
