"""`tokenmeter ledger recover`: a request whose record a crash lost is recorded from Envoy's file
access log exactly as the live path would have recorded it, once."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from extproc.policy import load_policy
from extproc.service.metadata import NAMESPACE
from extproc.service.processor import StreamProcessor
from extproc.settlement.recover import recover
from tests.unit.test_native_admission_and_settlement import CHAT, POLICY, _context, body_only


async def _admitted_line(status: int = 200) -> dict[str, object]:
    ctx, _limiter, _sink = _context()
    reply = await StreamProcessor(ctx).handle(body_only(CHAT))
    admission = MessageToDict(reply.dynamic_metadata.fields[NAMESPACE].struct_value)
    return {
        "time": "2026-11-30T10:00:00.000Z", "path": "/v1/chat/completions", "status": status,
        "details": "via_upstream", "duration_ms": 12, "envoy_request_id": "e-1", "response_flags": "-",
        "bytes_sent": 300, "upstream_host": "127.0.0.1:1", "ttfb_ms": 3, "admission": admission,
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }


async def test_a_lost_record_is_recovered_once_as_the_live_path_records_it(tmp_path: Path) -> None:
    line = await _admitted_line()
    refused = {"time": "2026-11-30T10:00:01.000Z", "path": "/v1/chat/completions", "status": 401,
               "details": "tokenmeter_refused", "envoy_request_id": "e-2", "response_flags": "-",
               "admission": {"request_id": "p-refused", "decision": "refused", "policy_version": "e2e-1"}}
    unseen = {"time": "2026-11-30T10:00:02.000Z", "path": "/v1/chat/completions", "status": 400,
              "details": "direct_response", "envoy_request_id": "e-3", "response_flags": "-"}
    envoy_log = tmp_path / "access.jsonl"
    envoy_log.write_text("".join(json.dumps(x) + "\n" for x in (line, refused, unseen)) + '{"torn":')
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text('{"request_id": "other", "decision": "admitted"}\n{"request_id": "tor')  # a torn write
    policy = load_policy(POLICY)

    result = recover([envoy_log], ledger, policy=policy)
    assert (result.recovered, result.present, result.unreadable) == (3, 0, 1)
    records = [json.loads(x) for x in ledger.read_text().splitlines()[2:]]
    admitted, refusal, envoy_only = records
    assert admitted["request_id"] == line["admission"]["request_id"]  # type: ignore[index]
    assert (admitted["prompt_tokens"], admitted["completion_tokens"], admitted["usage_source"]) == (4, 6, "reported")
    assert (admitted["tenant"], admitted["decision"], admitted["ending"]) == ("acme", "admitted", "completed")
    assert (refusal["request_id"], refusal["decision"], refusal["status"]) == ("p-refused", "refused", 401)
    assert (envoy_only["request_id"], envoy_only["decision"]) == ("envoy:e-3", "refused_by_envoy")

    again = recover([envoy_log], ledger, policy=policy)
    assert (again.recovered, again.present) == (0, 3)


async def test_a_cut_response_is_recovered_as_incomplete(tmp_path: Path) -> None:
    line = await _admitted_line()
    line["response_flags"] = "UC"
    line["usage"] = {}
    envoy_log = tmp_path / "access.jsonl"
    envoy_log.write_text(json.dumps(line) + "\n")
    ledger = tmp_path / "usage.jsonl"
    recover([envoy_log], ledger, policy=load_policy(POLICY))
    (rec,) = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert (rec["ending"], rec["usage_source"]) == ("incomplete", "estimated")
    assert rec["prompt_tokens"] + rec["completion_tokens"] == rec["reserved_tokens"]
