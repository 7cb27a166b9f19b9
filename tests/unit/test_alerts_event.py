"""The alert event's JSON: the webhook payload and the log line."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from extproc.alerts import AlertEvent, AlertKind
from extproc.alerts.dedupe import Dedupe

JULY_1 = datetime(2025, 7, 1, tzinfo=UTC).timestamp()

FIELDS = {"schema", "id", "kind", "tenant", "scope", "limit", "limit_value", "used", "percent", "period_end",
          "request_id", "policy_version", "at"}


def threshold(**changes: object) -> AlertEvent:
    fields: dict[str, object] = dict(
        kind=AlertKind.THRESHOLD, tenant="acme", scope="project:acme/chatbot",
        limit="tokens per month (billing period)", limit_value=1_000_000, used=800_123, percent=80,
        period_end=JULY_1, request_id="req-1", policy_version="v7", at=JULY_1 - 86_400.5,
    )
    fields.update(changes)
    return AlertEvent(**fields)  # type: ignore[arg-type]


def test_to_json_has_stable_field_names_and_iso_8601_utc_times() -> None:
    payload = orjson.loads(threshold().to_json())
    assert set(payload) == FIELDS
    assert payload["schema"] == "tokenmeter.alert.v1"
    assert payload["kind"] == "threshold"
    assert (payload["tenant"], payload["scope"]) == ("acme", "project:acme/chatbot")
    assert (payload["limit_value"], payload["used"], payload["percent"]) == (1_000_000, 800_123, 80)
    assert payload["period_end"] == "2025-07-01T00:00:00.000Z"
    assert payload["at"] == "2025-06-29T23:59:59.500Z"
    assert (payload["request_id"], payload["policy_version"]) == ("req-1", "v7")


def test_over_limit_event_without_period_or_percent_writes_nulls() -> None:
    payload = orjson.loads(threshold(kind=AlertKind.OVER_LIMIT, percent=None, period_end=None,
                                     request_id=None).to_json())
    assert payload["kind"] == "over_limit"
    assert payload["percent"] is None and payload["period_end"] is None and payload["request_id"] is None


def test_each_event_has_its_own_id_for_receivers_to_drop_repeats() -> None:
    a, b = threshold(), threshold()
    assert a.id != b.id
    assert orjson.loads(a.to_json())["id"] == a.id


def test_client_chosen_strings_are_bounded() -> None:
    event = threshold(request_id="r" * 10_000, scope="key:" + "k" * 10_000, tenant="t" * 300)
    payload = orjson.loads(event.to_json())
    assert payload["request_id"] == "r" * 256 + "..."
    assert len(payload["scope"]) == 259 and len(payload["tenant"]) == 259
    assert len(event.to_json()) < 2_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_dedupe_passes_a_key_once_per_interval() -> None:
    clock = FakeClock()
    d = Dedupe(clock=clock)
    assert d.admit("scope-a", 60.0)
    clock.now += 59.9
    assert not d.admit("scope-a", 60.0)
    assert d.admit("scope-b", 60.0)  # keys are independent
    clock.now += 0.1
    assert d.admit("scope-a", 60.0)  # 60 s after it last passed
    assert not d.admit("scope-a", 60.0)


def test_dedupe_table_stays_bounded_and_forgets_the_least_recently_passed_key() -> None:
    clock = FakeClock()
    d = Dedupe(max_keys=2, clock=clock)
    assert d.admit("a", 60.0) and d.admit("b", 60.0) and d.admit("c", 60.0)
    assert len(d) == 2
    assert not d.admit("b", 60.0) and not d.admit("c", 60.0)
    assert d.admit("a", 60.0)  # evicted: passes again early (an extra alert, never a lost one)
    assert len(d) == 2


def test_dedupe_refuses_an_empty_table() -> None:
    with pytest.raises(ValueError):
        Dedupe(max_keys=0)
