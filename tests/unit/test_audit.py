"""The audit log: the hash chain and its verifier, the policy change summary, the non-blocking writer."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.audit import (
    GENESIS,
    AuditLog,
    AuditLogError,
    BreakerState,
    EnforcementKind,
    breaker,
    enforcement,
    policy_changes,
    policy_loaded,
    policy_rejected,
    verify,
)
from extproc.audit.chain import encode_fields, encode_line
from extproc.audit.events import MAX_STRING
from extproc.policy import Policy, PolicyError, PolicyStore, hash_key, parse_policy
from tests.unit.policy_files import small_policy, write_edit

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"


# -- helpers ----------------------------------------------------------------------------------


def _write_log(path: Path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append_now("test", i=i, note=f"event {i}")
    log.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _event(line: bytes) -> dict[str, Any]:
    event = orjson.loads(line)
    assert isinstance(event, dict)
    return event


def _rehash(line: bytes) -> bytes:
    """`line` with its own hash recomputed (what a tamperer who knows the format does)."""
    body = line.rstrip(b"\n")
    cut = body.rindex(b',"hash":"')
    unhashed = body[:cut] + b"}"
    return unhashed[:-1] + b',"hash":"' + hashlib.sha256(unhashed).hexdigest().encode() + b'"}\n'


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 6)
    return path


# -- the line format --------------------------------------------------------------------------


def test_a_written_log_verifies_and_reports_its_head(log_path: Path) -> None:
    result = verify(log_path)
    events = [_event(line) for line in _lines(log_path)]
    assert result.ok and result.reason is None and result.first_broken_line is None
    assert result.lines == 6
    assert result.head_hash == events[-1]["hash"]
    assert [e["seq"] for e in events] == list(range(6))
    assert events[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(events))
    assert all(e["time"].endswith("Z") and e["type"] == "test" for e in events)


def test_each_hash_is_the_sha256_of_the_line_without_its_hash_member(log_path: Path) -> None:
    for line in _lines(log_path):
        body = line.rstrip(b"\n")
        assert body.endswith(b'"}') and list(_event(body))[-2:] == ["prev", "hash"]
        cut = body.rindex(b',"hash":"')
        assert hashlib.sha256(body[:cut] + b"}").hexdigest() == _event(body)["hash"]


def test_encode_line_is_pure_and_keeps_the_field_order() -> None:
    fields = encode_fields({"b": 1, "a": "x"})
    line, digest = encode_line(3, "2026-01-01T00:00:00.000000Z", "t", fields, GENESIS)
    assert encode_line(3, "2026-01-01T00:00:00.000000Z", "t", fields, GENESIS) == (line, digest)
    assert list(_event(line)) == ["seq", "time", "type", "b", "a", "prev", "hash"]
    bare, _ = encode_line(0, "2026-01-01T00:00:00.000000Z", "t", encode_fields({}), GENESIS)
    assert list(_event(bare)) == ["seq", "time", "type", "prev", "hash"]


def test_reserved_or_unencodable_fields_are_refused_at_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="seq"):
        log.append("x", seq=3)
    with pytest.raises(ValueError, match="hash"):
        log.append("x", hash="0" * 64)
    with pytest.raises(TypeError):
        log.append("x", thing=object())
    with pytest.raises(ValueError, match="type"):
        log.append("")


def test_an_empty_log_verifies_with_the_genesis_head(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    result = verify(path)
    assert result.ok and result.lines == 0 and result.head_hash == GENESIS


def test_a_missing_log_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "absent.jsonl")


# -- tampering --------------------------------------------------------------------------------


def test_an_edited_field_is_named_at_its_own_line(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2] = lines[2].replace(b'"note":"event 2"', b'"note":"event X"')
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok
    assert result.first_broken_line == 3
    assert result.reason is not None and "edited" in result.reason
    assert result.lines == 2  # the two lines before it still verify


def test_an_edited_last_line_is_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[-1] = lines[-1].replace(b'"i":5', b'"i":6')
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 6


def test_an_edited_line_with_a_recomputed_hash_breaks_the_next_link(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2] = _rehash(lines[2].replace(b'"note":"event 2"', b'"note":"event X"'))
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 4
    assert result.reason is not None and "prev does not match" in result.reason


def test_an_inserted_copy_of_a_line_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(3, lines[1])
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 4
    assert result.reason is not None and "inserted" in result.reason


def test_an_inserted_line_consistent_with_the_lines_before_it_breaks_the_one_after(log_path: Path) -> None:
    lines = _lines(log_path)
    before = _event(lines[2])
    forged, _ = encode_line(3, before["time"], "test", encode_fields({"i": 99}), before["hash"])
    lines.insert(3, forged + b"\n")
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 5
    assert result.reason is not None and "seq is 3, expected 4" in result.reason


def test_an_inserted_empty_line_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(2, b"\n")
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 3
    assert result.reason is not None and "empty line" in result.reason


def test_a_deleted_middle_line_is_named_at_the_line_after_it(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[3]
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 4
    assert result.reason == "seq is 4, expected 3: 1 line deleted before this one"


def test_a_deleted_first_line_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    _put(log_path, lines[1:])
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 1
    assert result.reason is not None and "seq is 1, expected 0" in result.reason


def test_two_swapped_lines_are_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    _put(log_path, lines)
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 3


def test_a_truncated_last_line_is_named(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[: len(data) - 20])
    result = verify(log_path)
    assert not result.ok and result.first_broken_line == 6
    assert result.reason is not None and "incomplete last line" in result.reason
    assert result.lines == 5


def test_deleted_last_lines_need_an_anchor(log_path: Path) -> None:
    """What the file alone cannot show: lines cut from its end leave a valid, shorter chain."""
    anchor = verify(log_path).head_hash
    assert verify(log_path, anchor=anchor).ok
    lines = _lines(log_path)
    _put(log_path, lines[:-1])
    shorter = verify(log_path)
    assert shorter.ok and shorter.lines == 5
    anchored = verify(log_path, anchor=anchor)
    assert not anchored.ok and anchored.first_broken_line == 6
    assert anchored.reason is not None and "anchor" in anchored.reason and "deleted from its end" in anchored.reason


def test_an_anchor_taken_earlier_still_holds_after_more_events(log_path: Path) -> None:
    anchor = verify(log_path).head_hash
    log = AuditLog(log_path)
    log.append_now("later")
    log.close()
    assert verify(log_path, anchor=anchor).ok
    assert not verify(log_path, anchor="f" * 64).ok


# -- restarts ---------------------------------------------------------------------------------


def test_a_second_writer_continues_the_chain_after_a_restart(log_path: Path) -> None:
    head = verify(log_path).head_hash
    log = AuditLog(log_path)
    log.open()
    assert log.head == (6, head)
    log.append_now("after_restart", n=1)
    log.append_now("after_restart", n=2)
    log.close()
    result = verify(log_path)
    assert result.ok and result.lines == 8
    events = [_event(line) for line in _lines(log_path)]
    assert events[6]["prev"] == head and events[6]["seq"] == 6


def test_a_torn_last_line_is_recorded_and_replaced_not_chained_over(log_path: Path) -> None:
    data = log_path.read_bytes()
    torn = data[data.rindex(b"\n", 0, len(data) - 1) + 1 : len(data) - 30]
    log_path.write_bytes(data[: len(data) - 30])
    assert not verify(log_path).ok
    log = AuditLog(log_path)
    log.append_now("after_crash")
    log.close()
    result = verify(log_path)
    assert result.ok, result
    events = [_event(line) for line in _lines(log_path)]
    assert [e["type"] for e in events[-2:]] == ["torn_line_discarded", "after_crash"]
    record = events[-2]
    assert record["seq"] == 5 and record["after_seq"] == 4
    assert record["bytes"] == len(torn)
    assert record["sha256"] == hashlib.sha256(torn).hexdigest()
    assert record["text"] == torn.decode()


def test_a_torn_only_line_in_a_new_log_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"seq":0,"ti')
    log = AuditLog(path)
    log.append_now("x")
    log.close()
    assert verify(path).ok
    first = _event(_lines(path)[0])
    assert first["type"] == "torn_line_discarded" and first["after_seq"] is None and first["text"] == '{"seq":0,"ti'


def test_a_log_ending_in_foreign_text_is_not_continued(log_path: Path) -> None:
    with log_path.open("ab") as f:
        f.write(b"hello\n")
    with pytest.raises(AuditLogError, match="not an audit record"):
        AuditLog(log_path).open()


def test_one_writer_per_file(log_path: Path) -> None:
    first = AuditLog(log_path)
    first.open()
    try:
        with pytest.raises(AuditLogError, match="another audit writer"):
            AuditLog(log_path).open()
    finally:
        first.close()
    second = AuditLog(log_path)
    second.open()
    second.close()


# -- events -----------------------------------------------------------------------------------


def _edited_example() -> tuple[Policy, Policy, str]:
    text = EXAMPLE.read_text()
    old = parse_policy(text, str(EXAMPLE))
    new_key = hash_key("a-new-raw-key")
    rotated = hash_key("acme-batch-rotated")
    edited = (
        text.replace('version: "2026-11-27.1"', 'version: "2026-11-28.1"')
        .replace("mode: enforce", "mode: shadow")
        .replace("limits: {tokens_per_minute: 200000, requests_per_minute: 1200}",
                 "limits: {tokens_per_minute: 250000, requests_per_minute: 1200, action: block}")
        .replace("    tokens_per_minute: 3000\n", "    tokens_per_minute: 4000\n")
        .replace("6f34b1eb8f37cf6e33fbb0a2226dc943ba8673d121072f1728d370712d374bfe", rotated)
        .replace("          support: {}\n", "          support: {}\n          research: {}\n")
        .replace('models: ["llama-3.1-8b", "llama-3.1-70b", "claude-sonnet"]',
                 'models: ["llama-3.1-70b", "claude-sonnet", "gpt-x"]')
    )
    cut = edited.index("  - id: globex-search")
    edited = edited[:cut] + f"""  - id: acme-research
    sha256: "{new_key}"
    tenant: acme
    project: chatbot
    team: research
    limits: {{tokens_per_minute: 1000}}
"""
    return old, parse_policy(edited, "edited.yaml"), edited


def test_the_change_summary_between_two_real_policies() -> None:
    old, new, _ = _edited_example()
    changes = policy_changes(old, new)
    assert changes == {
        "mode": ["enforce", "shadow"],
        "teams_added": ["acme/chatbot/research"],
        "keys_added": ["acme-research"],
        "keys_removed": ["globex-search"],
        "limits_changed": {"tenant:acme": {"tokens_per_minute": [200000, 250000], "action": ["throttle", "block"]}},
        "keys_rotated": ["acme-batch"],
        "pools_changed": {"h100": {"tokens_per_minute": [3000, 4000]}},
        "models_added": ["gpt-x"],
        "models_removed": ["llama-3.1-8b"],
    }


def test_policy_loaded_names_version_file_hash_and_changes_never_key_digests(tmp_path: Path) -> None:
    old, new, text = _edited_example()
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    event = policy_loaded(new, path, old, file_sha256=digest)
    assert event.type == "policy_loaded"
    assert event.fields["version"] == "2026-11-28.1"
    assert event.fields["previous_version"] == "2026-11-27.1"
    assert event.fields["file"] == str(path) and event.fields["file_sha256"] == digest
    assert event.fields["counts"] == {"tenants": 5, "projects": 7, "teams": 4, "keys": 6, "pools": 3}
    encoded = orjson.dumps(dict(event.fields)).decode()
    for policy in (old, new):
        for sha in policy.keys_by_sha256:
            assert sha not in encoded


def test_the_first_load_counts_everything_as_added() -> None:
    policy = parse_policy(EXAMPLE.read_text(), str(EXAMPLE))
    changes = policy_changes(None, policy)
    assert changes["tenants_added"] == ["acme", "globex", "hooli", "initech", "umbrella"]
    assert changes["keys_added"] == [
        "acme-batch", "acme-chatbot-web", "globex-search", "hooli-prototype", "initech-research-nlp",
        "initech-support-bot"]
    assert "limits_changed" not in changes and "mode" not in changes
    assert policy_changes(policy, policy) == {}


def test_enforcement_and_breaker_events_are_bounded_and_typed() -> None:
    long = "r" * 10_000
    event = enforcement(EnforcementKind.THROTTLE, long, "acme", "chatbot", "acme-web", "key:acme-web", "tokens", "v1")
    assert event.type == "enforcement" and event.fields["kind"] == "throttle"
    assert len(event.fields["request_id"]) == MAX_STRING and event.fields["request_id"].endswith("…")
    assert enforcement("degraded_admission", "r1", None, None, None, None, None, None).fields["kind"] == (
        "degraded_admission")
    with pytest.raises(ValueError):
        enforcement("ignore", "r1", None, None, None, None, None, None)
    event = breaker(BreakerState.OPEN, "3 consecutive failures")
    assert event.fields == {"state": "open", "reason": "3 consecutive failures", "backend": "redis"}
    with pytest.raises(ValueError):
        breaker("ajar", "?")


def test_policy_rejected_names_file_line_and_reason(tmp_path: Path) -> None:
    error = PolicyError(str(tmp_path / "p.yaml"), 13, "keys[0].limits.tokens_per_minute must be a positive integer")
    event = policy_rejected(tmp_path / "p.yaml", error, kept_version="v1")
    assert event.fields["line"] == 13 and event.fields["kept_version"] == "v1"
    assert event.fields["reason"] == "keys[0].limits.tokens_per_minute must be a positive integer"


# -- the policy store's hook ------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def append(self, event_type: str, /, **fields: Any) -> None:
        self.events.append((event_type, fields))


def _policy_text(version: str, tokens_per_minute: int = 100) -> str:
    return small_policy(version, tokens_per_minute, raw_key="audit-raw")


_edit = write_edit


def test_the_store_records_every_load_and_every_refused_edit(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _edit(path, _policy_text("v1"))
    sink = _Sink()
    store = PolicyStore(path, audit=sink)
    assert [t for t, _ in sink.events] == ["policy_loaded"]
    first = sink.events[0][1]
    assert first["version"] == "v1" and first["previous_version"] is None
    assert first["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    _edit(path, _policy_text("v2", tokens_per_minute=250))
    assert store.reload_now()
    kind, loaded = sink.events[-1]
    assert kind == "policy_loaded" and loaded["previous_version"] == "v1"
    assert loaded["changes"] == {"limits_changed": {"key:web": {"tokens_per_minute": [100, 250]}}}

    _edit(path, _policy_text("v3").replace("tokens_per_minute: 100", "tokens_per_minute: -3"))
    assert not store.reload_now()
    _edit(path, _policy_text("v3").replace("tokens_per_minute: 100", "tokens_per_minute: -3"))
    store.reload_now()  # the same bad file: reported once
    kind, rejected = sink.events[-1]
    assert kind == "policy_rejected" and len(sink.events) == 3
    assert rejected["line"] == 13 and rejected["kept_version"] == "v2"
    assert "must be a positive integer, got -3" in rejected["reason"]
    assert rejected["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    path.unlink()
    store.reload_now()
    kind, gone = sink.events[-1]
    assert kind == "policy_rejected" and gone["file_sha256"] is None and "not found" in gone["reason"]


def test_a_refused_first_load_is_recorded_before_the_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _edit(path, "version: [\n")
    sink = _Sink()
    with pytest.raises(PolicyError):
        PolicyStore(path, audit=sink)
    assert [t for t, _ in sink.events] == ["policy_rejected"]


def test_a_failing_audit_sink_never_changes_what_the_store_does(tmp_path: Path) -> None:
    class Broken:
        def append(self, event_type: str, /, **fields: Any) -> None:
            raise RuntimeError("disk on fire")

    path = tmp_path / "policy.yaml"
    _edit(path, _policy_text("v1"))
    store = PolicyStore(path, audit=Broken())
    _edit(path, _policy_text("v2"))
    assert store.reload_now() and store.current.version == "v2"


# -- the non-blocking writer ------------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not met within 5 s")


async def test_appends_under_a_running_loop_are_written_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, flush_interval=0.01)
    log.start()
    for i in range(50):
        log.append("test", i=i)
    await _until(lambda: log.written == 50)
    assert len(_lines(path)) == 50 and verify(path).ok
    await log.aclose()


async def test_append_does_no_io_and_aclose_flushes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, flush_interval=60)
    log.start()
    store = PolicyStore(EXAMPLE, audit=log)
    log.record(enforcement("block", "r1", "acme", "chatbot", "acme-batch", "key:acme-batch", "quota_tokens",
                           store.current.version))
    await asyncio.sleep(0.05)
    assert path.read_bytes() == b""  # queued, not written: the loop never waited on the disk
    await log.aclose()
    result = verify(path)
    assert result.ok and result.lines == 2
    assert [_event(line)["type"] for line in _lines(path)] == ["policy_loaded", "enforcement"]
    assert log.written == 2 and log.dropped == 0


async def test_a_full_queue_drops_counts_and_reports_when_writing_resumes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, max_queue=5, flush_interval=60)
    log.start()
    for i in range(12):
        log.append("test", i=i)
    assert log.dropped == 7
    await log.aclose()
    assert verify(path).ok
    events = [_event(line) for line in _lines(path)]
    assert [e.get("i") for e in events[:5]] == [0, 1, 2, 3, 4]
    assert events[5]["type"] == "events_dropped"
    assert events[5]["reason"] == "queue_full" and events[5]["count"] == 7
    assert events[5]["first"] <= events[5]["last"]


async def test_a_failed_write_leaves_no_torn_line_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, flush_interval=0.01)
    log.start()
    log.append("test", i=0)
    await _until(lambda: log.written == 1)
    real_fsync = os.fsync
    failures: list[int] = []

    def failing_fsync(fd: int) -> None:
        if not failures:
            failures.append(fd)
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr("extproc.audit.log.os.fsync", failing_fsync)
    log.append("test", i=1)  # written (bytes reach the file), then fsync fails: cut back
    await _until(lambda: log.dropped == 1)
    assert failures and verify(path).ok and verify(path).lines == 1
    assert log.dropped == 1
    log.append("test", i=2)
    await log.aclose()
    result = verify(path)
    assert result.ok and result.lines == 3
    events = [_event(line) for line in _lines(path)]
    assert events[1]["i"] == 2
    assert events[2]["type"] == "events_dropped" and events[2]["reason"] == "write_failed" and events[2]["count"] == 1


def test_a_key_disabled_or_given_an_expiry_is_in_the_change_summary() -> None:
    text = EXAMPLE.read_text()
    old = parse_policy(text, str(EXAMPLE))
    entry = "  - id: acme-batch\n"
    edited = text.replace(entry, entry + "    disabled: true\n    reason: unpaid invoice\n", 1)
    assert edited != text
    changes = policy_changes(old, parse_policy(edited, "edited.yaml"))
    assert changes["keys_lifecycle_changed"] == {
        "acme-batch": {"disabled": [False, True], "disabled_reason": [None, "unpaid invoice"]}}


def test_aliases_and_a_keys_model_allow_list_are_in_the_change_summary() -> None:
    text = EXAMPLE.read_text()
    old = parse_policy(text, str(EXAMPLE))
    entry = "  - id: acme-batch\n"
    edited = text.replace(entry, entry + "    models: [llama-3.1-8b]\n", 1).replace(
        "\npools:", '\naliases: {gpt-4o-mini: llama-3.1-8b}\npools:', 1)
    changes = policy_changes(old, parse_policy(edited, "edited.yaml"))
    assert changes["aliases_changed"] == {"gpt-4o-mini": [None, "llama-3.1-8b"]}
    assert changes["keys_lifecycle_changed"] == {"acme-batch": {"models": [None, ["llama-3.1-8b"]]}}
    orjson.dumps(changes)  # what the audit log writes
