"""The metrics a scrape sees: cumulative counts per attribute set, from the request path's tallies."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.limiter.types import Decision
from extproc.policy.model import ApiKey
from extproc.records.record import UsageRecord
from extproc.service.telemetry import Telemetry
from extproc.settlement.outcome import Decision as Outcome

KEY = ApiKey("acme-web", "0" * 64, "acme", "chat", "search")


def scrape(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    out: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                assert m.data.is_monotonic  # type: ignore[union-attr]
                out[m.name] = [(dict(p.attributes or {}), p.value) for p in m.data.data_points]  # type: ignore[union-attr]
    return out


def record(prompt: int, completion: int, *, source: str = "reported") -> UsageRecord:
    rec = UsageRecord(request_id="r", time=0.0, decision=Outcome.ADMITTED, policy_version="v1", tenant="acme",
                      project="chat", team="search", key_id="acme-web", model="llama", pool="h100")
    rec.prompt_tokens, rec.completion_tokens, rec.usage_source = prompt, completion, source
    return rec


def test_a_scrape_sees_cumulative_decisions_tokens_and_refusals_by_attribute_set() -> None:
    reader = InMemoryMetricReader()
    t = Telemetry(MeterProvider(metric_readers=[reader]).get_meter("test"))
    t.decision(KEY, Decision(allowed=True, pool="h100"))
    t.decision(KEY, Decision(allowed=True, pool="h100", alerts=("project:acme/chat",)))
    t.decision(KEY, Decision(allowed=False, denied_scope="key:acme-web", denied_kind="tokens"))
    t.usage(record(10, 20))
    t.usage(record(5, 7))
    t.usage(record(3, 4, source="estimated"))
    t.refusal(None, "refused")
    t.refusal(KEY, "throttled")
    t.refusal(KEY, "throttled")
    first = scrape(reader)
    admitted = {"tenant": "acme", "project": "chat", "key_id": "acme-web", "allowed": True, "degraded": False,
                "pool": "h100"}
    assert (admitted, 2) in first["tokenmeter.decisions"]
    assert ({**admitted, "allowed": False, "pool": ""}, 1) in first["tokenmeter.decisions"]
    assert first["tokenmeter.alerts"] == [({"tenant": "acme", "scope": "project:acme/chat"}, 1)]
    tokens = {(a["gen_ai.token.type"], a["estimated"]): v for a, v in first["gen_ai.client.token.usage"]}
    assert tokens == {("input", False): 15, ("output", False): 27, ("input", True): 3, ("output", True): 4}
    assert sorted((a["reason"], a["tenant"], v) for a, v in first["tokenmeter.refusals"]) == [
        ("refused", "", 1), ("throttled", "acme", 2)]

    t.usage(record(1, 1))
    again = {(a["gen_ai.token.type"], a["estimated"]): v for a, v in scrape(reader)["gen_ai.client.token.usage"]}
    assert again[("output", False)] == 28  # cumulative, not per scrape


def test_jwt_principals_share_one_key_label_per_provider() -> None:
    from extproc.service.telemetry import key_label

    assert key_label("jwt:corp_idp:alice") == key_label("jwt:corp_idp:bob") == "jwt:corp_idp"
    assert key_label("acme-web") == "acme-web"
