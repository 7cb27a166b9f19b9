"""Reload on request (SIGHUP) and on a Kubernetes ConfigMap update (a real `..data` symlink swap).

A ConfigMap volume holds `policy.yaml -> ..data/policy.yaml` and `..data -> ..<timestamp>`; kubelet
writes a new timestamped directory, points a temporary symlink at it, renames that onto `..data`
(atomic), then removes the old directory. The new file can have the old one's size and mtime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import extproc.policy.watch as watch
from extproc.policy import Policy, PolicyError, PolicyStore, hash_key
from extproc.policy.loader import read_policy_text
from tests.unit.policy_files import small_policy

KEY = hash_key("reload-signals-raw")


def _policy_text(version: str, tokens_per_minute: int = 100) -> str:
    return small_policy(version, tokens_per_minute, raw_key="reload-signals-raw")


def _limit(policy: Policy) -> int | None:
    """The key's tokens per minute (the policy's `tokens_per_minute`)."""
    rules = policy.keys_by_sha256[KEY].limits.rules
    return next((r.limit for r in rules if r.measure == "tokens" and r.window_s == 60), None)


class ConfigMapDir:
    """A directory laid out like a mounted ConfigMap, updated the way kubelet's atomic writer does."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.generation = 0
        self._data_dir = self._write_generation(text, mtime_ns=None)
        (root / "..data").symlink_to(self._data_dir.name)
        self.policy = root / "policy.yaml"
        self.policy.symlink_to("..data/policy.yaml")

    def _write_generation(self, text: str, mtime_ns: int | None) -> Path:
        self.generation += 1
        d = self.root / f"..2026_11_30_10_00_00.{self.generation:09d}"
        d.mkdir()
        f = d / "policy.yaml"
        f.write_text(text)
        if mtime_ns is not None:
            os.utime(f, ns=(mtime_ns, mtime_ns))
        return d

    def swap(self, text: str, *, same_mtime: bool = True, remove_old: bool = True) -> None:
        """Publish `text` (by default with the current file's mtime, so only the swap itself shows)."""
        old = self._data_dir
        mtime = (old / "policy.yaml").stat().st_mtime_ns if same_mtime else None
        new = self._write_generation(text, mtime)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.replace(tmp, self.root / "..data")
        self._data_dir = new
        if remove_old:
            shutil.rmtree(old)

    @property
    def real_file(self) -> Path:
        return self._data_dir / "policy.yaml"


@pytest.fixture
def configmap(tmp_path: Path) -> ConfigMapDir:
    return ConfigMapDir(tmp_path, _policy_text("v1"))


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def append(self, event_type: str, /, **fields: Any) -> None:
        self.events.append((event_type, fields))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]


def _edit_in_place_keeping_stat(path: Path, text: str) -> None:
    """Rewrite the file the path leads to (same inode), same size, then put its mtime back: no stat
    the watcher makes can tell."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


# -- the ConfigMap symlink swap ------------------------------------------------------------------


def test_configmap_swap_with_same_size_and_mtime_is_reloaded(configmap: ConfigMapDir) -> None:
    audit = Audit()
    store = PolicyStore(configmap.policy, audit=audit)
    seen: list[str] = []
    store.add_listener(lambda p: seen.append(p.version))
    before = configmap.real_file.stat()
    configmap.swap(_policy_text("v2", tokens_per_minute=200))  # same length as v1/100
    after = configmap.real_file.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert store.reload_now() is True
    assert store.current.version == "v2"
    assert _limit(store.current) == 200
    assert store.current.source == str(configmap.policy)  # named by the path it was given
    assert seen == ["v2"]
    assert audit.types() == ["policy_loaded", "policy_loaded"]
    assert audit.events[1][1]["previous_version"] == "v1"
    assert store.reload_now() is False  # and seen once


def test_configmap_swaps_keep_being_seen(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    for n in range(2, 7):
        configmap.swap(_policy_text(f"v{n}", tokens_per_minute=100 + n))
        assert store.reload_now() is True
        assert store.current.version == f"v{n}"


def test_configmap_swap_to_the_same_content_does_not_reload(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    seen: list[Policy] = []
    store.add_listener(seen.append)
    before = store.current
    configmap.swap(_policy_text("v1"))
    assert store.reload_now() is False
    assert store.current is before
    assert seen == []


def test_configmap_swap_to_a_bad_policy_keeps_the_last_good(configmap: ConfigMapDir) -> None:
    audit = Audit()
    store = PolicyStore(configmap.policy, audit=audit)
    configmap.swap("version: [\n")
    assert store.reload_now() is False
    assert store.current.version == "v1"
    assert store.last_error is not None and store.last_error.file == str(configmap.policy)
    assert audit.types()[-1] == "policy_rejected"
    configmap.swap(_policy_text("v2"))
    assert store.reload_now() is True
    assert store.last_error is None


async def test_run_picks_up_a_configmap_swap(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    task = asyncio.create_task(store.run(interval=0.02))
    try:
        configmap.swap(_policy_text("v2", tokens_per_minute=300))
        await _wait_for(lambda: store.current.version == "v2")
        assert _limit(store.current) == 300
    finally:
        await _stop(task)


def test_a_swap_that_removes_the_directory_mid_read_is_read_again(
    configmap: ConfigMapDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read resolved `..data` to the old directory, which kubelet removed before the open: "not
    found", but the stat after the read shows a new file: read again, no rejected edit."""
    store = PolicyStore(configmap.policy)
    real_read = read_policy_text
    calls = 0

    def read_during_swap(path: str | Path) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            configmap.swap(_policy_text("v2"))
            raise PolicyError(str(path), None, "policy file not found")
        return real_read(path)

    configmap.swap(_policy_text("v1", tokens_per_minute=999))  # a first swap: the stat shows a change
    monkeypatch.setattr(watch, "read_policy_text", read_during_swap)
    assert store.reload_now() is True
    assert store.current.version == "v2"
    assert store.reload_failures == 0
    assert calls == 2


# -- files written while read ----------------------------------------------------------------------


def test_a_file_still_being_written_is_read_again_not_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy_text("v1"))
    store = PolicyStore(path)
    full = _policy_text("v2", tokens_per_minute=4321)
    half = full[: len(full) // 2]
    path.write_text(half)  # the writer's first chunk
    real_read = read_policy_text
    reads: list[str] = []

    def read_then_writer_finishes(p: str | Path) -> str:
        text = real_read(p)
        reads.append(text)
        if len(reads) == 1:
            with open(path, "a", encoding="utf-8") as f:  # the writer's second chunk, during the read
                f.write(full[len(half):])
        return text

    monkeypatch.setattr(watch, "read_policy_text", read_then_writer_finishes)
    assert store.reload_now() is True
    assert reads == [half, full]
    assert store.current.version == "v2"
    assert _limit(store.current) == 4321
    assert store.reload_failures == 0


def test_a_file_that_keeps_changing_is_left_for_the_next_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy_text("v1"))
    store = PolicyStore(path)
    monkeypatch.setattr(watch, "READ_RETRY_S", 0.0)
    real_read = read_policy_text
    growing = True

    def read_while_growing(p: str | Path) -> str:
        text = real_read(p)
        if growing:
            with open(path, "a", encoding="utf-8") as f:
                f.write("# more\n")
        return text

    path.write_text(_policy_text("v2"))
    monkeypatch.setattr(watch, "read_policy_text", read_while_growing)
    assert store.reload_now() is False  # never the same stat twice: nothing used, nothing rejected
    assert store.current.version == "v1"
    assert store.reload_failures == 0
    growing = False
    assert store.reload_now() is True  # the next look reads it, though its stat has not changed since
    assert store.current.version == "v2"


def test_a_half_written_file_read_while_the_writer_pauses_is_a_rejected_edit(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(_policy_text("v1"))
    audit = Audit()
    store = PolicyStore(path, audit=audit)
    full = _policy_text("v2", tokens_per_minute=555)
    path.write_text(full[: full.index("keys:") + 8])  # stops mid-mapping
    assert store.reload_now() is False
    assert store.current.version == "v1"
    assert store.reload_failures == 1
    assert audit.types()[-1] == "policy_rejected"
    with open(path, "a", encoding="utf-8") as f:
        f.write(full[full.index("keys:") + 8:])
    assert store.reload_now() is True
    assert _limit(store.current) == 555


# -- reload on request: SIGHUP ---------------------------------------------------------------------


def test_an_in_place_edit_with_its_stat_put_back_is_seen_only_when_forced(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    _edit_in_place_keeping_stat(configmap.policy, _policy_text("v9", tokens_per_minute=777))
    assert store.reload_now() is False  # a stat-driven look cannot see it
    assert store.current.version == "v1"
    assert store.reload_now(force=True, reason="SIGHUP") is True
    assert store.current.version == "v9"
    assert _limit(store.current) == 777


@pytest.fixture
def sighup_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


async def test_sighup_reloads_at_once_and_is_logged_and_audited(
    configmap: ConfigMapDir, sighup_restored: None, caplog: pytest.LogCaptureFixture
) -> None:
    """As `serve()` wires it: loop.add_signal_handler(SIGHUP, store.request_reload, "SIGHUP"), with a
    poll interval far too long to matter."""
    audit = Audit()
    store = PolicyStore(configmap.policy, audit=audit)
    seen: list[str] = []
    store.add_listener(lambda p: seen.append(p.version))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, store.request_reload, "SIGHUP")
    task = asyncio.create_task(store.run(interval=3600))
    try:
        await asyncio.sleep(0.05)  # run() is waiting
        _edit_in_place_keeping_stat(configmap.policy, _policy_text("v2", tokens_per_minute=222))
        with caplog.at_level(logging.INFO, logger="tokenmeter.policy"):
            os.kill(os.getpid(), signal.SIGHUP)
            await _wait_for(lambda: store.current.version == "v2")
            assert _limit(store.current) == 222
            assert seen == ["v2"]
            assert audit.types() == ["policy_loaded", "policy_loaded"]
            assert audit.events[1][1]["version"] == "v2"
            assert audit.events[1][1]["previous_version"] == "v1"
            assert any("(SIGHUP): version v2" in r.getMessage() for r in caplog.records)

            caplog.clear()
            os.kill(os.getpid(), signal.SIGHUP)  # nothing changed: said so, nothing loaded or audited
            await _wait_for(lambda: any("unchanged" in r.getMessage() for r in caplog.records))
            assert seen == ["v2"]
            assert len(audit.events) == 2

            configmap.swap(_policy_text("v3"))  # a swap too is picked up by SIGHUP, not the poll
            os.kill(os.getpid(), signal.SIGHUP)
            await _wait_for(lambda: store.current.version == "v3")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await _stop(task)


async def test_sighup_on_a_bad_edit_keeps_the_last_good_and_says_so_once(
    configmap: ConfigMapDir, caplog: pytest.LogCaptureFixture
) -> None:
    audit = Audit()
    store = PolicyStore(configmap.policy, audit=audit)
    task = asyncio.create_task(store.run(interval=3600))
    try:
        await asyncio.sleep(0)
        configmap.swap("keys: nope\n")
        with caplog.at_level(logging.INFO, logger="tokenmeter.policy"):
            store.request_reload("SIGHUP")
            await _wait_for(lambda: store.reload_failures == 1)
            assert store.current.version == "v1"
            assert audit.types()[-1] == "policy_rejected"
            store.request_reload("SIGHUP")  # the same bad file: reminded in the log, not counted again
            await _wait_for(lambda: any("still refused" in r.getMessage() for r in caplog.records))
        assert store.reload_failures == 1
        assert audit.types().count("policy_rejected") == 1
    finally:
        await _stop(task)


async def test_a_request_before_run_starts_is_served_when_it_does(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    _edit_in_place_keeping_stat(configmap.policy, _policy_text("v2"))
    store.request_reload("SIGHUP")
    task = asyncio.create_task(store.run(interval=3600))
    try:
        await _wait_for(lambda: store.current.version == "v2")
    finally:
        await _stop(task)


async def test_request_reload_from_another_thread(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    task = asyncio.create_task(store.run(interval=3600))
    try:
        await asyncio.sleep(0.05)
        _edit_in_place_keeping_stat(configmap.policy, _policy_text("v2"))
        await asyncio.to_thread(store.request_reload, "test")
        await _wait_for(lambda: store.current.version == "v2")
    finally:
        await _stop(task)


def test_request_reload_without_a_running_watcher_does_nothing_at_once(configmap: ConfigMapDir) -> None:
    store = PolicyStore(configmap.policy)
    _edit_in_place_keeping_stat(configmap.policy, _policy_text("v2"))
    store.request_reload("SIGHUP")  # no loop to wake: no error, no I/O
    assert store.current.version == "v1"


async def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not met within 5 s")


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
