"""Policy reloads in a running stack, through Envoy, with the policy mounted like a Kubernetes ConfigMap.

`policy.yaml -> ..data/policy.yaml`, `..data -> ..<timestamp>`: an update writes a new timestamped
directory and renames a temporary symlink onto `..data` (kubelet's atomic writer). The processor's
watcher sees that swap even when the new file has the old one's size and mtime; SIGHUP makes it read
an edit no stat can show. Counters (Redis) outlive reloads; requests in flight never fail on one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from extproc.devstack.stack import Stack, StackOptions
from extproc.policy import hash_key
from tests.e2e.client import Reply, chat, usage_records, wait_for, wait_record

SWAP = "reload-swap-key"  # its limit changes: the x-ratelimit-limit-tokens header shows which policy
TIGHT = "reload-tight-key"  # 1000 tokens per minute, never changed: its counters must survive reloads
STREAM = "reload-stream-key"  # generous: the in-flight streams


def _policy(version: str, *, swap_tpm: int = 5000, tight_tpm: int = 1000, other_tpm: int = 10000) -> str:
    return f"""\
version: "{version}"
mode: enforce
request:
  default_max_tokens: 64
models: ["llama-test"]
pools:
  - name: h100
    endpoints: ["model-h100:8000"]
tenants:
  acme:
    projects:
      chat: {{}}
  globex:
    projects:
      search: {{}}
  initech:
    limits: {{tokens_per_minute: {other_tpm}}}
    projects:
      misc: {{}}
keys:
  - id: swap
    sha256: "{hash_key(SWAP)}"
    tenant: acme
    project: chat
    limits: {{tokens_per_minute: {swap_tpm}}}
  - id: tight
    sha256: "{hash_key(TIGHT)}"
    tenant: globex
    project: search
    limits: {{tokens_per_minute: {tight_tpm}}}
  - id: stream
    sha256: "{hash_key(STREAM)}"
    tenant: acme
    project: chat
    limits: {{tokens_per_minute: 10000000, requests_per_minute: 100000}}
  - id: other
    sha256: "{hash_key('reload-other-key')}"
    tenant: initech
    project: misc
"""


class ConfigMapVolume:
    """A directory laid out and updated like a mounted ConfigMap (kubelet's atomic writer)."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        root.mkdir(parents=True)
        self._n = 0
        self.data_dir = self._generation(text)
        (root / "..data").symlink_to(self.data_dir.name)
        self.policy = root / "policy.yaml"
        self.policy.symlink_to("..data/policy.yaml")

    def _generation(self, text: str) -> Path:
        self._n += 1
        d = self.root / f"..2026_11_30_10_00_{self._n:02d}.000000001"
        d.mkdir()
        (d / "policy.yaml").write_text(text)
        return d

    def swap(self, text: str, *, same_stat: bool = False) -> None:
        """Publish `text`; `same_stat`: the new file gets the old one's mtime (and must have its size)."""
        old = self.data_dir
        before = (old / "policy.yaml").stat()
        new = self._generation(text)
        if same_stat:
            assert (new / "policy.yaml").stat().st_size == before.st_size
            os.utime(new / "policy.yaml", ns=(before.st_atime_ns, before.st_mtime_ns))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.replace(tmp, self.root / "..data")
        self.data_dir = new
        shutil.rmtree(old)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path_factory.mktemp("reload") / "configmap", _policy("r1"))


@pytest.fixture(scope="module")
def stack(volume: ConfigMapVolume) -> Iterator[Stack]:
    run_dir = volume.root.parent / "run"
    audit = run_dir / "audit.jsonl"
    opts = StackOptions(policy=volume.policy, run_dir=run_dir, processor_extra=("--audit-log", str(audit)))
    with Stack(opts) as s:
        yield s


def _loaded_versions(stack: Stack) -> list[str]:
    path = stack.run_dir / "audit.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            event: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("type") == "policy_loaded":
            out.append(str(event["version"]))
    return out


def _wait_loaded(stack: Stack, version: str, timeout: float = 5.0) -> None:
    """Until the processor's audit trail says `version` took effect."""
    if not wait_for(lambda: version in _loaded_versions(stack), timeout):
        raise AssertionError(f"policy {version} never loaded; loaded: {_loaded_versions(stack)}\n"
                             f"{stack.proc('processor').log_tail()}")


def _limit_header(stack: Stack) -> int:
    reply = chat(stack.base_url, SWAP, max_tokens=1)
    assert reply.status == 200, reply.body
    return int(reply.headers["x-ratelimit-limit-tokens"])


def test_a_configmap_swap_applies_the_new_limit_without_any_stat_trick(stack: Stack, volume: ConfigMapVolume) -> None:
    assert _limit_header(stack) == 5000
    volume.swap(_policy("r2", swap_tpm=7000), same_stat=True)  # same size and mtime: only the target changed
    assert wait_for(lambda: _limit_header(stack) == 7000, timeout=5.0), "the swap was never applied"
    _wait_loaded(stack, "r2")


def test_sighup_applies_an_edit_that_no_stat_shows(stack: Stack, volume: ConfigMapVolume) -> None:
    assert _limit_header(stack) == 7000
    real = volume.data_dir / "policy.yaml"
    before = real.stat()
    text = _policy("r3", swap_tpm=8000)
    assert len(text.encode()) == before.st_size
    with open(volume.policy, "r+", encoding="utf-8") as f:  # in place, through the symlinks
        f.write(text)
    os.utime(real, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = real.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    time.sleep(1.5)  # over one poll interval (1 s): the watcher's stat cannot see this edit
    assert _limit_header(stack) == 7000
    stack.proc("processor").popen.send_signal(signal.SIGHUP)
    assert wait_for(lambda: _limit_header(stack) == 8000, timeout=5.0), "SIGHUP did not apply the edit"
    _wait_loaded(stack, "r3")
    assert "policy reloaded from" in stack.proc("processor").log_tail(200)
    assert "(SIGHUP): version r3" in stack.proc("processor").log_tail(200)
    assert stack.proc("processor").alive()


def _spend(stack: Stack) -> tuple[int, dict[str, Any]]:
    """One request of the tight key, settled: the remaining tokens it was told, and its record."""
    reply = chat(stack.base_url, TIGHT, max_tokens=100)
    assert reply.status == 200, reply.body
    rec = wait_record(stack.usage_log, reply.headers["x-tokenmeter-request-id"])
    assert rec["decision"] == "admitted"  # decided by Redis
    time.sleep(0.2)  # its settlement is applied off the request path
    return int(reply.headers["x-ratelimit-remaining-tokens"]), rec


def test_counters_survive_reloads_that_leave_their_limit_unchanged(stack: Stack, volume: ConfigMapVolume) -> None:
    first, rec1 = _spend(stack)
    second, _ = _spend(stack)
    step = first - second  # every request costs the same (the fake server is deterministic)
    used = int(rec1["prompt_tokens"]) + int(rec1["completion_tokens"])
    assert step == used > 0

    volume.swap(_policy("r4", swap_tpm=8000))  # only the version changed
    stack.proc("processor").popen.send_signal(signal.SIGHUP)
    _wait_loaded(stack, "r4")
    third, rec3 = _spend(stack)
    assert rec3["policy_version"] == "r4"
    assert third == second - step, "the tight key's window was reset by a reload that changed only the version"

    volume.swap(_policy("r5", swap_tpm=8000, other_tpm=20000))  # only an unrelated tenant changed
    stack.proc("processor").popen.send_signal(signal.SIGHUP)
    _wait_loaded(stack, "r5")
    fourth, rec4 = _spend(stack)
    assert rec4["policy_version"] == "r5"
    assert fourth == third - step, "the tight key's window was reset by a reload of another tenant"

    # A changed limit applies to the same window: what was used stays used.
    volume.swap(_policy("r6", swap_tpm=8000, other_tpm=20000, tight_tpm=2000))
    stack.proc("processor").popen.send_signal(signal.SIGHUP)
    _wait_loaded(stack, "r6")
    fifth, rec5 = _spend(stack)
    assert rec5["policy_version"] == "r6"
    assert fifth == 2000 - 1000 + fourth - step


def test_requests_in_flight_never_fail_on_reloads(stack: Stack, volume: ConfigMapVolume) -> None:
    streams = 8
    chunks, delay_ms = 30, 80  # each stream lasts ~2.4 s, across every reload below
    versions = [f"r{n}" for n in range(7, 10)]
    short: list[Reply] = []
    swapping = threading.Event()

    def stream(_: int) -> Reply:
        return chat(stack.base_url, STREAM, stream=True, max_tokens=chunks,
                    extra_headers={"x-fake-chunk-delay-ms": str(delay_ms)})

    def short_requests() -> None:  # new requests keep arriving while the policy changes
        while not swapping.is_set():
            short.append(chat(stack.base_url, STREAM, max_tokens=2))

    with ThreadPoolExecutor(max_workers=streams + 1) as pool:
        futures = [pool.submit(stream, i) for i in range(streams)]
        shorts = pool.submit(short_requests)
        time.sleep(0.3)  # every stream is admitted and mid-way
        for n, version in enumerate(versions):
            volume.swap(_policy(version, swap_tpm=8000 + 1000 * n, other_tpm=20000, tight_tpm=2000))
            if n % 2:
                stack.proc("processor").popen.send_signal(signal.SIGHUP)  # alternately: SIGHUP or the poll
            _wait_loaded(stack, version)
        swapping.set()
        replies = [f.result(timeout=30) for f in futures]
        shorts.result(timeout=30)

    started_before = {r.headers.get("x-tokenmeter-request-id") for r in replies}
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.complete
        assert reply.body.rstrip().endswith(b"data: [DONE]")
        assert len([c for c in reply.sse_data() if c["choices"] and c["choices"][0]["delta"].get("content")]) == chunks
    assert short and all(r.status == 200 for r in short), [r.status for r in short if r.status != 200]

    ids = [r.headers["x-tokenmeter-request-id"] for r in [*replies, *short]]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        wait_record(stack.usage_log, rid)
    time.sleep(0.3)  # a second record would come as soon as the first
    records = [r for r in usage_records(stack.usage_log) if r["request_id"] in set(ids)]
    assert sorted(r["request_id"] for r in records) == sorted(ids)  # exactly one each
    for rec in records:
        if rec["request_id"] in started_before:
            assert rec["policy_version"] == "r6"  # decided and ended under the policy they started with
            assert int(rec["completion_tokens"]) == chunks
    assert _loaded_versions(stack)[-3:] == versions
    assert stack.proc("processor").alive()
