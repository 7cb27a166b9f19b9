"""Hot reload: good edits take effect, bad edits keep the last good policy and say why."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from extproc.policy import Policy, PolicyError, PolicyStore, hash_key
from tests.unit.policy_files import small_policy, write_edit

KEY = hash_key("reload-raw")


def _policy_text(version: str, tokens_per_minute: int = 100) -> str:
    return small_policy(version, tokens_per_minute, raw_key="reload-raw")


_write = write_edit


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    _write(path, _policy_text("v1"))
    return path


@pytest.fixture
def store(policy_file: Path) -> PolicyStore:
    return PolicyStore(policy_file)


def _limit(policy: Policy) -> int | None:
    """The key's tokens per minute (the policy's `tokens_per_minute`)."""
    rules = policy.keys_by_sha256[KEY].limits.rules
    return next((r.limit for r in rules if r.measure == "tokens" and r.window_s == 60), None)


def test_store_loads_the_file_at_once(store: PolicyStore, policy_file: Path) -> None:
    assert store.current.version == "v1"
    assert store.current.source == str(policy_file)
    assert store.last_error is None
    assert store.reload_failures == 0


def test_first_load_failure_raises_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    _write(path, "version: [\n")
    with pytest.raises(PolicyError) as info:
        PolicyStore(path)
    assert info.value.file == str(path)


def test_missing_file_at_start_raises_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        PolicyStore(tmp_path / "absent.yaml")


def test_unchanged_file_is_not_reloaded(store: PolicyStore) -> None:
    seen: list[Policy] = []
    store.add_listener(seen.append)
    assert store.reload_now() is False
    assert seen == []


def test_reload_picks_up_a_good_edit(store: PolicyStore, policy_file: Path) -> None:
    _write(policy_file, _policy_text("v2", tokens_per_minute=250))
    assert store.reload_now() is True
    assert store.current.version == "v2"
    assert _limit(store.current) == 250
    assert store.last_error is None


def test_touching_the_file_without_changing_it_does_not_reload(store: PolicyStore, policy_file: Path) -> None:
    seen: list[Policy] = []
    store.add_listener(seen.append)
    before = store.current
    _write(policy_file, policy_file.read_text())
    assert store.reload_now() is False
    assert store.current is before
    assert seen == []


def test_bad_edit_keeps_the_last_good_policy_and_reports_file_line_reason(
    store: PolicyStore, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(policy_file, _policy_text("v2").replace("tokens_per_minute: 100", "tokens_per_minute: -3"))
    with caplog.at_level(logging.ERROR, logger="tokenmeter.policy"):
        assert store.reload_now() is False
    assert store.current.version == "v1"
    assert _limit(store.current) == 100
    error = store.last_error
    assert error is not None
    assert (error.file, error.line) == (str(policy_file), 13)
    assert "keys[0].limits.tokens_per_minute must be a positive integer, got -3" in error.reason
    assert store.reload_failures == 1
    records = [r for r in caplog.records if r.name == "tokenmeter.policy" and r.levelno == logging.ERROR]
    assert len(records) == 1
    message = records[0].getMessage()
    assert f"{policy_file}:13: keys[0].limits.tokens_per_minute" in message
    assert "keeping version v1" in message
    assert "\n" not in message


def test_the_same_bad_file_is_reported_once(store: PolicyStore, policy_file: Path) -> None:
    _write(policy_file, "version: [\n")
    store.reload_now()
    _write(policy_file, "version: [\n")  # touched again, same content
    store.reload_now()
    assert store.reload_now() is False
    assert store.reload_failures == 1


def test_each_different_bad_edit_counts_as_a_failure(store: PolicyStore, policy_file: Path) -> None:
    _write(policy_file, "version: [\n")
    store.reload_now()
    _write(policy_file, "version: {\n")
    store.reload_now()
    assert store.reload_failures == 2
    assert store.current.version == "v1"


def test_fixing_a_bad_edit_loads_it_and_clears_the_error(store: PolicyStore, policy_file: Path) -> None:
    _write(policy_file, "")
    assert store.reload_now() is False
    assert store.last_error is not None
    assert str(store.last_error) == f"{policy_file}: policy file is empty"
    _write(policy_file, _policy_text("v3"))
    assert store.reload_now() is True
    assert store.current.version == "v3"
    assert store.last_error is None
    assert store.reload_failures == 1


def test_a_deleted_file_keeps_the_last_good_policy(store: PolicyStore, policy_file: Path) -> None:
    policy_file.unlink()
    assert store.reload_now() is False
    assert store.current.version == "v1"
    assert store.last_error is not None and "not found" in store.last_error.reason
    assert store.reload_now() is False
    assert store.reload_failures == 1
    _write(policy_file, _policy_text("v2"))
    assert store.reload_now() is True
    assert store.current.version == "v2"


def test_a_file_replaced_by_rename_is_reloaded(store: PolicyStore, policy_file: Path) -> None:
    staged = policy_file.with_suffix(".tmp")
    _write(staged, _policy_text("v2"))
    staged.replace(policy_file)
    assert store.reload_now() is True
    assert store.current.version == "v2"


def test_listeners_are_called_on_good_reloads_only(store: PolicyStore, policy_file: Path) -> None:
    seen: list[str] = []
    store.add_listener(lambda policy: seen.append(policy.version))
    _write(policy_file, _policy_text("v2"))
    store.reload_now()
    _write(policy_file, "version: [\n")
    store.reload_now()
    _write(policy_file, _policy_text("v3"))
    store.reload_now()
    assert seen == ["v2", "v3"]


def test_a_failing_listener_does_not_stop_the_others(store: PolicyStore, policy_file: Path) -> None:
    def broken(policy: Policy) -> None:
        raise RuntimeError("boom")

    seen: list[str] = []
    store.add_listener(broken)
    store.add_listener(lambda policy: seen.append(policy.version))
    _write(policy_file, _policy_text("v2"))
    assert store.reload_now() is True
    assert seen == ["v2"]
    assert store.current.version == "v2"


async def _wait_for(condition: Callable[[], bool]) -> None:
    """Poll `condition` for up to 5 s (the store polls a file, so the test polls the store)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not met within 5 s")


async def test_run_polls_and_applies_edits(store: PolicyStore, policy_file: Path) -> None:
    seen: list[str] = []
    store.add_listener(lambda policy: seen.append(policy.version))
    task = asyncio.create_task(store.run(interval=0.02))
    try:
        _write(policy_file, _policy_text("v2"))
        await _wait_for(lambda: store.current.version == "v2")
        _write(policy_file, "keys: nope\n")
        await _wait_for(lambda: store.reload_failures == 1)
        assert store.current.version == "v2"
        _write(policy_file, _policy_text("v3"))
        await _wait_for(lambda: store.current.version == "v3")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen == ["v2", "v3"]
