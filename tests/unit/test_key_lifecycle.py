"""Key lifecycle: disabled keys, not-before and expiry, rotation with a grace period (an injected
clock, no sleeps); the loader's errors for them; `keys new` adding a key to a policy file."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from extproc.policy import PolicyError, PolicyStore, hash_key, load_policy, parse_policy
from extproc.policy.keygen import KeygenError, add_key, append_key_entry
from extproc.policy.model import ApiKey
from extproc.service.access_log import settle_entry
from extproc.service.identity import KeyProblem, KeyRefusal, identify
from extproc.service.metadata import NAMESPACE
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink
from tests.unit.test_native_admission_and_settlement import CHAT, RecordingLimiter, access_log_entry, body_only

E2E_POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
TOKENMETER = str(Path(sys.executable).parent / "tokenmeter")


def _t(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


JAN = _t("2026-01-01T00:00:00Z")
FEB = _t("2026-02-01T00:00:00Z")
MAR = _t("2026-03-01T00:00:00Z")

HEAD = """\
version: "lc-1"
pools:
  - name: only
tenants:
  acme:
    projects:
      chat: {}
keys:
"""


def _key(key_id: str, raw: str, extra: str = "") -> str:
    return f'  - id: {key_id}\n    sha256: "{hash_key(raw)}"\n    tenant: acme\n    project: chat\n{extra}'


def _policy(*entries: str) -> str:
    return HEAD + "".join(entries)


def _who(raw: str) -> dict[str, str]:
    return {"authorization": f"Bearer {raw}"}


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value


def _line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


# -- identify, with an injected clock -----------------------------------------------------


def test_a_key_is_valid_from_not_before_until_just_before_expires() -> None:
    policy = parse_policy(_policy(_key("k", "raw-k", '    not_before: 2026-01-01T00:00:00Z\n'
                                                     '    expires: "2026-02-01T00:00:00+00:00"\n')), "p.yaml")
    key = policy.key_for_hash(hash_key("raw-k"))
    assert key is not None and (key.not_before, key.expires) == (JAN, FEB)
    early = identify(_who("raw-k"), policy, now=JAN - 0.001)
    assert isinstance(early, KeyRefusal) and early.problem is KeyProblem.NOT_YET_VALID
    assert early.code == "key_not_yet_valid"
    assert "not valid before 2026-01-01T00:00:00Z" in early.message
    assert identify(_who("raw-k"), policy, now=JAN) is key
    assert identify(_who("raw-k"), policy, now=FEB - 0.001) is key
    late = identify(_who("raw-k"), policy, now=FEB)
    assert isinstance(late, KeyRefusal) and late.problem is KeyProblem.EXPIRED and late.code == "key_expired"
    assert late.message == "API key 'k' expired at 2026-02-01T00:00:00Z."


def test_offsets_are_honoured() -> None:
    policy = parse_policy(_policy(_key("k", "raw-k", '    expires: "2026-02-01T02:00:00+02:00"\n')), "p.yaml")
    assert isinstance(identify(_who("raw-k"), policy, now=FEB), KeyRefusal)
    assert isinstance(identify(_who("raw-k"), policy, now=FEB - 1), ApiKey)


def test_a_disabled_key_is_refused_whatever_the_time_with_its_reason() -> None:
    policy = parse_policy(_policy(
        _key("paused", "raw-off", '    disabled: true\n    reason: "leaked in a public repository"\n'),
        _key("bare", "raw-bare", "    disabled: true\n"),
        _key("live", "raw-on", "    disabled: false\n"),
    ), "p.yaml")
    for now in (0.0, JAN, 4e9):
        off = identify(_who("raw-off"), policy, now=now)
        assert isinstance(off, KeyRefusal) and off.problem is KeyProblem.DISABLED and off.code == "key_disabled"
        assert off.message == "API key 'paused' is disabled: leaked in a public repository"
        assert isinstance(identify(_who("raw-on"), policy, now=now), ApiKey)
    bare = identify(_who("raw-bare"), policy, now=JAN)
    assert isinstance(bare, KeyRefusal) and bare.message == "API key 'bare' is disabled."


def test_a_rotated_key_accepts_old_and_new_digests_during_the_grace_period_only() -> None:
    rotated = (
        "    previous:\n"
        f'      - sha256: "{hash_key("raw-old")}"\n'
        "        valid_until: 2026-02-01T00:00:00Z\n"
    )
    policy = parse_policy(_policy(_key("rot", "raw-new", rotated)), "p.yaml")
    assert len(policy.keys_by_sha256) == 1  # one key, two digests
    new, old = identify(_who("raw-new"), policy, now=JAN), identify(_who("raw-old"), policy, now=JAN)
    assert isinstance(new, ApiKey) and new is old and new.key_id == "rot"
    after = identify(_who("raw-old"), policy, now=FEB)
    assert isinstance(after, KeyRefusal) and after.problem is KeyProblem.EXPIRED and after.key is new
    assert "was rotated" in after.message and "2026-02-01T00:00:00Z" in after.message
    assert identify(_who("raw-new"), policy, now=MAR) is new
    assert policy.key_for_hash(hash_key("raw-old")) is new


def test_a_grace_period_never_outlives_the_key_nor_starts_before_it() -> None:
    rotated = (
        "    not_before: 2026-01-01T00:00:00Z\n"
        "    expires: 2026-02-01T00:00:00Z\n"
        f'    previous: [{{sha256: "{hash_key("raw-old")}", valid_until: 2026-03-01T00:00:00Z}}]\n'
    )
    policy = parse_policy(_policy(_key("rot", "raw-new", rotated)), "p.yaml")
    assert isinstance(identify(_who("raw-old"), policy, now=JAN - 1), KeyRefusal)
    assert isinstance(identify(_who("raw-old"), policy, now=JAN), ApiKey)
    expired = identify(_who("raw-old"), policy, now=FEB)
    assert isinstance(expired, KeyRefusal) and expired.message == "API key 'rot' expired at 2026-02-01T00:00:00Z."


def test_unknown_and_missing_keys_are_not_refusals_but_none() -> None:
    policy = parse_policy(_policy(_key("k", "raw-k", "    disabled: true\n")), "p.yaml")
    assert identify(_who("raw-other"), policy, now=JAN) is None
    assert identify({}, policy, now=JAN) is None


def test_refusal_messages_name_the_key_id_never_the_key_or_its_digest() -> None:
    rotated = f'    previous: [{{sha256: "{hash_key("raw-old")}", valid_until: 2026-02-01T00:00:00Z}}]\n'
    policy = parse_policy(_policy(
        _key("a", "raw-a", "    disabled: true\n"),
        _key("b", "raw-b", "    expires: 2026-01-01T00:00:00Z\n"),
        _key("c", "raw-c", "    not_before: 2026-03-01T00:00:00Z\n"),
        _key("d", "raw-d", rotated),
    ), "p.yaml")
    for raw in ("raw-a", "raw-b", "raw-c", "raw-old"):
        refusal = identify(_who(raw), policy, now=FEB)
        assert isinstance(refusal, KeyRefusal), raw
        assert raw not in refusal.message and hash_key(raw) not in refusal.message
        assert f"'{refusal.key.key_id}'" in refusal.message


def test_without_a_clock_identify_uses_the_time_now() -> None:
    policy = parse_policy(_policy(_key("old", "raw-old", "    expires: 2001-01-01T00:00:00Z\n")), "p.yaml")
    assert isinstance(identify(_who("raw-old"), policy), KeyRefusal)


# -- the processor: 403 with the reason code ----------------------------------------------


async def test_the_processor_refuses_a_known_but_invalid_key_with_403_and_attributes_it() -> None:
    text = E2E_POLICY.read_text().replace(
        "    limits: {tokens_per_minute: 1000000, requests_per_minute: 100000}\n",
        "    limits: {tokens_per_minute: 1000000, requests_per_minute: 100000}\n"
        "    disabled: true\n    reason: offboarded\n",
        1,
    )
    limiter, sink = RecordingLimiter(), ListSink()
    ctx = Context(FixedPolicy(parse_policy(text, "p.yaml")), limiter, sink)
    resp = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert resp.immediate_response.status.code == 403
    body = yaml.safe_load(resp.immediate_response.body)
    assert body["error"]["code"] == "key_disabled"
    assert body["error"]["message"] == "API key 'e2e-basic' is disabled: offboarded"
    assert limiter.reserved == []
    [rec] = sink.records
    assert (rec.decision, rec.status, rec.tenant, rec.key_id) == ("refused", 403, "acme", "e2e-basic")
    assert resp.dynamic_metadata.fields[NAMESPACE].struct_value["key_id"] == "e2e-basic"
    assert not settle_entry(ctx, access_log_entry(resp, status=403))  # a refusal settles nothing
    assert limiter.settled == [] and len(sink.records) == 1


async def test_the_processor_refuses_an_expired_key_and_admits_a_valid_one() -> None:
    text = E2E_POLICY.read_text().replace(
        "    limits: {tokens_per_minute: 1000, requests_per_minute: 1000}\n",
        "    limits: {tokens_per_minute: 1000, requests_per_minute: 1000}\n    expires: 2001-01-01T00:00:00Z\n",
        1,
    )
    ctx = Context(FixedPolicy(parse_policy(text, "p.yaml")), RecordingLimiter(), ListSink())
    expired = await StreamProcessor(ctx).handle(body_only(CHAT, key="e2e-tight-key"))
    assert expired.immediate_response.status.code == 403
    assert yaml.safe_load(expired.immediate_response.body)["error"]["code"] == "key_expired"
    ok = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert not ok.HasField("immediate_response")


# -- the loader ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "marker", "reason"),
    [
        pytest.param("    expires: tomorrow  #<\n", "#<",
                     "key 'k': keys[0].expires must be an ISO-8601 timestamp with a UTC offset", id="not-a-time"),
        pytest.param("    expires: 2026-02-01  #<\n", "#<", "has no offset", id="date-only"),
        pytest.param('    not_before: "2026-02-01T00:00:00"  #<\n', "#<", "has no offset", id="naive"),
        pytest.param("    expires: 1767225600  #<\n", "#<", "got an integer", id="epoch-number"),
        pytest.param("    expires: [2026]  #<\n", "#<", "got a list", id="list"),
        pytest.param("    not_before: 2026-02-01T00:00:00Z\n    expires: 2026-01-01T00:00:00Z  #<\n", "#<",
                     "key 'k': expires must be later than not_before", id="backwards"),
        pytest.param("    disabled: yes please  #<\n", "#<", "keys[0].disabled must be true or false", id="disabled"),
        pytest.param("    reason: why  #<\n", "#<", "reason is only for a disabled key", id="reason-alone"),
        pytest.param(f"    disabled: true\n    reason: {'x' * 201}  #<\n", "#<", "at most 200 characters",
                     id="reason-long"),
        pytest.param('    disabled: true\n    reason: "a\\nb"  #<\n', "#<", "one printable line", id="reason-lines"),
        pytest.param("    previous: []  #<\n", "#<", "keys[0].previous must be a non-empty list", id="prev-empty"),
        pytest.param(f'    previous:\n      - sha256: "{hash_key("o")}"  #<\n', "#<",
                     "missing required key 'valid_until' in keys[0].previous[0]", id="prev-no-until"),
        pytest.param("    previous:\n      - valid_until: 2026-01-01T00:00:00Z  #<\n", "#<",
                     "missing required key 'sha256'", id="prev-no-sha"),
        pytest.param(f'    previous:\n      - sha256: "{hash_key("o")}"\n        valid_until: soon  #<\n', "#<",
                     "keys[0].previous[0].valid_until must be an ISO-8601 timestamp", id="prev-bad-until"),
        pytest.param(f'    previous:\n      - {{sha256: "{hash_key("o")}", valid_until: 2026-01-01T00:00:00Z, x: 1}}'
                     "  #<\n", "#<", "unknown key 'x' in keys[0].previous[0]", id="prev-unknown"),
        pytest.param(f'    previous:\n      - {{sha256: "{hash_key("raw-k")}", valid_until: 2026-01-01T00:00:00Z}}'
                     "  #<\n", "#<", "key 'k': duplicate previous sha256, already used by this key at line 10",
                     id="prev-is-current"),
    ],
)
def test_bad_lifecycle_fields_name_file_line_and_reason(extra: str, marker: str, reason: str) -> None:
    text = _policy(_key("k", "raw-k", extra))
    error = _error(text)
    assert error.file == "p.yaml"
    assert error.line == _line_of(text, marker), str(error)
    assert reason in error.reason, error.reason
    assert hash_key("raw-k") not in str(error) and hash_key("o") not in str(error)


def test_a_previous_digest_of_one_key_cannot_be_the_digest_of_another() -> None:
    rotated = f'    previous: [{{sha256: "{hash_key("raw-a")}", valid_until: 2026-01-01T00:00:00Z}}]\n'
    text = _policy(_key("a", "raw-a"), _key("b", "raw-b", rotated))
    error = _error(text)
    assert error.line == _line_of(text, "previous:")
    assert error.reason == "key 'b': duplicate previous sha256, already used by key 'a' at line 10"
    text = _policy(_key("b", "raw-b", rotated), _key("a", "raw-a"))
    error = _error(text)
    assert error.line == _line_of(text, "- id: a") + 1 and "duplicate sha256" in error.reason
    assert "key 'a': duplicate sha256, already used by key 'b'" in error.reason


def test_the_unknown_key_error_lists_the_lifecycle_fields() -> None:
    error = _error(_policy(_key("k", "raw-k", "    expiry: 2026-01-01T00:00:00Z\n")))
    for name in ("disabled", "reason", "not_before", "expires", "previous"):
        assert name in error.reason


# -- hot reload ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    mtime = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(mtime, mtime))


def test_disabling_rotating_and_re_enabling_take_effect_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, _policy(_key("k", "raw-k")))
    store = PolicyStore(path)
    assert isinstance(identify(_who("raw-k"), store.current, now=JAN), ApiKey)

    _write(path, _policy(_key("k", "raw-k", "    disabled: true\n    reason: paused\n")))
    assert store.reload_now() is True
    refused = identify(_who("raw-k"), store.current, now=JAN)
    assert isinstance(refused, KeyRefusal) and refused.code == "key_disabled"

    rotated = f'    previous: [{{sha256: "{hash_key("raw-k")}", valid_until: 2026-02-01T00:00:00Z}}]\n'
    _write(path, _policy(_key("k", "raw-k2", rotated)))
    assert store.reload_now() is True
    assert isinstance(identify(_who("raw-k"), store.current, now=JAN), ApiKey)
    assert isinstance(identify(_who("raw-k2"), store.current, now=JAN), ApiKey)
    assert isinstance(identify(_who("raw-k"), store.current, now=FEB), KeyRefusal)

    _write(path, _policy(_key("k", "raw-k2", "    expires: soon\n")))  # a bad edit keeps the last good one
    assert store.reload_now() is False
    assert store.last_error is not None and store.last_error.line == _line_of(store.path.read_text(), "expires")
    assert isinstance(identify(_who("raw-k"), store.current, now=JAN), ApiKey)


# -- keys new -------------------------------------------------------------------------------

FIELDS = [("id", "n"), ("sha256", hash_key("x")), ("tenant", "acme"), ("project", "chat")]


@pytest.mark.parametrize(
    "keys",
    [
        "keys: []  # none yet\n",
        "keys: [  ]\n",
        f'keys: [{{id: a, sha256: "{hash_key("a")}", tenant: acme, project: chat}}]\n',
        f'keys: [{{id: a, sha256: "{hash_key("a")}", tenant: acme, project: chat}}, ]\n',
        f'keys: [\n  {{id: a, sha256: "{hash_key("a")}", tenant: acme, project: chat}},  # a\n]\n',
        f'keys:\n- id: a\n  sha256: "{hash_key("a")}"\n  tenant: acme\n  project: chat  # a\n\n  # the end\n',
        f'keys:\n    -   id: a\n        sha256: "{hash_key("a")}"\n        tenant: acme\n        project: chat\n',
        f'keys:\n  - id: a\n    sha256: "{hash_key("a")}"\n    tenant: acme\n    project: chat\n'
        "    limits:\n      tokens_per_minute: 5\n# comment\n",
        f'keys:\n  - id: a\n    sha256: "{hash_key("a")}"\n    tenant: acme\n    project: chat',
    ],
)
def test_an_entry_is_appended_in_the_lists_own_style_keeping_everything_else(keys: str) -> None:
    text = HEAD.replace("keys:\n", keys) + ("# after the keys\n" if keys.endswith("\n") else "")
    out = append_key_entry(text, FIELDS)
    policy = parse_policy(out, "p.yaml")
    assert policy.key_for_hash(hash_key("x")) is not None
    assert [k.key_id for k in policy.keys_by_sha256.values()][-1] == "n"
    assert out.startswith(HEAD.replace("keys:\n", "keys:"))
    if keys.endswith("\n"):
        assert out.endswith("\n# after the keys\n")  # the last line stays last
    for line in text.splitlines():  # comments kept
        if "#" in line:
            assert line[line.index("#"):] in out
    lines = text.splitlines()
    if not keys.startswith("keys: ["):  # a block list: the old lines are all there, in order
        kept = iter(out.splitlines())
        assert all(line in kept for line in lines)


def test_a_key_ending_with_an_alias_is_left_to_the_operator() -> None:
    text = HEAD.replace("keys:\n", "") + "std: &std {tokens_per_minute: 5}\n" + "keys:\n"
    text = text + _key("a", "raw-a", "    limits: *std\n")
    with pytest.raises(KeygenError, match="alias"):
        append_key_entry(text, FIELDS)


def test_add_key_writes_atomically_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(_key("a", "raw-a")))
    path.chmod(0o640)
    new = add_key(path, tenant="acme", project="chat", key_id="b", expires="2030-01-01T00:00:00Z", raw="tm-fixed")
    assert (new.raw, new.key_id, new.sha256) == ("tm-fixed", "b", hash_key("tm-fixed"))
    key = load_policy(path).key_for_hash(hash_key("tm-fixed"))
    assert key is not None and key.expires == _t("2030-01-01T00:00:00Z")
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.yaml"]  # no temporary file left
    with pytest.raises(KeygenError, match="a key with id 'b' already exists"):
        add_key(path, tenant="acme", project="chat", key_id="b")


def test_add_key_through_a_symlink_replaces_the_target(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text(_policy(_key("a", "raw-a")))
    link = tmp_path / "policy.yaml"
    link.symlink_to(real)
    add_key(link, tenant="acme", project="chat", raw="tm-x")
    assert link.is_symlink() and load_policy(real).key_for_hash(hash_key("tm-x")) is not None


def test_add_key_refuses_a_policy_that_does_not_load_now(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    text = _policy(_key("a", "raw-a", "    expires: never\n"))
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        add_key(path, tenant="acme", project="chat")
    assert info.value.line == _line_of(text, "expires")
    assert path.read_text() == text


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMETER, *args], capture_output=True, text=True, timeout=60)


def test_keys_new_prints_the_key_once_and_appends_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    original = E2E_POLICY.read_text()
    path.write_text(original)
    result = _run("keys", "new", "--policy", str(path), "--tenant", "acme", "--project", "chat", "--team", "web",
                  "--expires", "2030-01-01T00:00:00Z")
    assert result.returncode == 0, result.stderr
    raw = result.stdout.strip()
    assert result.stdout == raw + "\n" and raw.startswith("tm-") and len(raw) >= 40  # only the key
    assert raw not in result.stderr
    text = path.read_text()
    assert text.startswith(original)  # comments and formatting kept: the entry is appended
    assert raw not in text and hash_key(raw) in text
    key = load_policy(path).key_for_hash(hash_key(raw))
    assert key is not None and (key.tenant, key.project, key.team) == ("acme", "chat", "web")
    assert key.key_id.startswith("acme-chat-web-") and key.key_id in result.stderr
    assert key.expires == _t("2030-01-01T00:00:00Z")
    again = _run("keys", "new", "--policy", str(path), "--tenant", "globex", "--project", "search", "--id", "mine")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() != raw
    assert load_policy(path).key_for_hash(hash_key(again.stdout.strip())) is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "nope", "--project", "chat"], "unknown tenant 'nope' (tenants: acme, globex)"),
        (["--tenant", "acme", "--project", "nope"], "tenant 'acme' has no project 'nope' (projects: chat)"),
        (["--tenant", "acme", "--project", "chat", "--team", "nope"], "project 'acme.chat' has no team 'nope'"),
        (["--tenant", "acme", "--project", "chat", "--id", "e2e-basic"], "a key with id 'e2e-basic' already exists"),
        (["--tenant", "acme", "--project", "chat", "--id", "bad id"], "invalid name 'bad id'"),
        (["--tenant", "acme", "--project", "chat", "--expires", "2030-01-01"], "--expires must be an ISO-8601"),
    ],
)
def test_keys_new_refuses_and_leaves_the_file_untouched(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(E2E_POLICY.read_text())
    before = path.stat().st_mtime_ns
    result = _run("keys", "new", "--policy", str(path), *args)
    assert result.returncode == 2
    assert result.stdout == ""  # no key shown for a key that was not added
    assert message in result.stderr, result.stderr
    assert path.read_text() == E2E_POLICY.read_text() and path.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.yaml"]


def test_keys_new_names_file_and_line_when_the_result_would_not_load(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(E2E_POLICY.read_text())
    result = _run("keys", "new", "--policy", str(path), "--tenant", "acme", "--project", "chat", "--id", "bad id")
    assert result.returncode == 2
    lines = len(E2E_POLICY.read_text().splitlines())
    assert f"{path}:{lines + 1}: invalid name 'bad id'" in result.stderr, result.stderr


def test_generated_keys_are_distinct_and_strong() -> None:
    from extproc.policy.keys import generate_key

    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100 and all(k.startswith("tm-") and len(k) == 46 for k in keys)


def test_time_helpers_agree_with_utc() -> None:
    assert datetime.fromtimestamp(JAN, UTC).isoformat() == "2026-01-01T00:00:00+00:00"
