"""Reserve-based admission under concurrency, through Envoy, with two processor replicas on one Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from extproc.devstack.stack import Stack, StackOptions
from tests.e2e.client import chat, fake_stats, usage_records, wait_record
from tests.e2e.conftest import E2E_POLICY

TIGHT = "e2e-tight-key"  # 1000 tokens per minute
LIMIT = 1000




def test_concurrent_burst_stays_within_the_limit_and_settles_to_reported_usage(tmp_path: Path) -> None:
    with Stack(StackOptions(policy=E2E_POLICY, run_dir=tmp_path / "run", processors=2)) as s:
        with ThreadPoolExecutor(max_workers=40) as pool:
            replies = list(pool.map(lambda _: chat(s.base_url, TIGHT, max_tokens=None), range(40)))
        statuses = [r.status for r in replies]
        assert set(statuses) == {200, 429}, statuses
        admitted_ids = {r.headers["x-tokenmeter-request-id"] for r in replies if r.status == 200}

        deadline = time.monotonic() + 5
        while True:
            recs = {r["request_id"]: r for r in usage_records(s.usage_log)}
            if admitted_ids <= recs.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        admitted = [recs[rid] for rid in admitted_ids]
        assert all(r["decision"] == "admitted" for r in admitted)  # decided by Redis, not a fallback

        reported = sum(
            fake_stats(port)["by_tenant"].get("globex", {}).get(k, 0)
            for port in s.pool_ports.values()
            for k in ("prompt_tokens", "completion_tokens")
        )
        metered = sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in admitted)
        assert metered == reported
        # Each admission saw every earlier request at its reservation or, once settled, at its real
        # (smaller) count, so the window never held more than the limit; refunds made room for more.
        assert metered <= LIMIT

        time.sleep(0.3)  # settlements are applied off the request path
        probe = chat(s.base_url, TIGHT, max_tokens=1)
        assert probe.status == 200
        probe_rec = wait_record(s.usage_log, probe.headers["x-tokenmeter-request-id"])
        remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
        assert remaining == LIMIT - reported - int(probe_rec["reserved_tokens"])
