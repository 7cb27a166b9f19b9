"""AlertSink.emit: one JSON log line, a metric, a bounded webhook queue, local dedupe; never blocks or raises."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from extproc.alerts import AlertKind, AlertSink, WebhookConfig, WebhookWorker
from extproc.service.telemetry import Telemetry
from tests.unit.test_alerts_event import FIELDS, FakeClock, threshold
from tests.unit.test_telemetry import scrape

# Names a key, a credential or a prompt would travel under: none may appear in an alert.
SECRET_LIKE = ("key", "authorization", "token", "secret", "password", "prompt", "message", "content", "input",
               "body")


def alert_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records
            if r.name == "tokenmeter.alerts" and r.levelno == logging.WARNING]


def test_emit_writes_one_json_warning_line_with_no_key_or_prompt_field(caplog: pytest.LogCaptureFixture) -> None:
    sink = AlertSink(Telemetry())
    event = threshold()
    with caplog.at_level(logging.WARNING, logger="tokenmeter.alerts"):
        sink.emit(event)
    [line] = alert_lines(caplog)
    assert line == orjson.loads(event.to_json())
    assert set(line) == FIELDS
    assert [name for name in line if any(word in name for word in SECRET_LIKE)] == []


def test_emit_counts_events_by_kind_and_tenant_on_the_metric() -> None:
    reader = InMemoryMetricReader()
    sink = AlertSink(Telemetry(MeterProvider(metric_readers=[reader]).get_meter("test")))
    sink.emit(threshold())
    sink.emit(threshold(percent=100))
    sink.emit(threshold(kind=AlertKind.OVER_LIMIT, tenant="globex"))
    points = sorted((a["kind"], a["tenant"], v) for a, v in scrape(reader)["tokenmeter.alerts.events"])
    assert points == [("over_limit", "globex", 1), ("threshold", "acme", 2)]


def test_a_dedupe_key_goes_through_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    telemetry = Telemetry()
    sink = AlertSink(telemetry, clock=clock)
    over = threshold(kind=AlertKind.OVER_LIMIT)
    with caplog.at_level(logging.WARNING, logger="tokenmeter.alerts"):
        for _ in range(5):
            sink.emit(over, dedupe_key="project:acme/chatbot|tokens/min", dedupe_s=60.0)
        sink.emit(over, dedupe_key="key:ci-bot|tokens/min", dedupe_s=60.0)
        clock.now += 60.0
        sink.emit(over, dedupe_key="project:acme/chatbot|tokens/min", dedupe_s=60.0)
        sink.emit(over)  # no key: never deduplicated
        sink.emit(over)
    assert len(alert_lines(caplog)) == 5
    assert sink.suppressed == 4
    assert telemetry.alert_events[("over_limit", "acme")] == 5


def test_a_full_webhook_queue_drops_new_events_and_emit_never_waits() -> None:
    # No event loop runs here at all: emit cannot be awaiting anything.
    telemetry = Telemetry()
    worker = WebhookWorker(WebhookConfig("http://127.0.0.1:9/hook", queue_size=3), telemetry)
    sink = AlertSink(telemetry, worker)
    events = [threshold(used=i) for i in range(10)]
    for event in events:
        sink.emit(event)
    assert worker.queued == 3
    assert telemetry.webhook_dropped[("queue_full",)] == 7
    assert telemetry.alert_events[("threshold", "acme")] == 10  # logged and counted all the same


class Exploding:
    kind = AlertKind.THRESHOLD
    tenant = "acme"

    def to_json(self) -> bytes:
        raise RuntimeError("boom")


def test_emit_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    sink = AlertSink(Telemetry())
    with caplog.at_level(logging.ERROR, logger="tokenmeter.alerts"):
        sink.emit(Exploding())  # type: ignore[arg-type]
    assert any("alert event not emitted" in r.getMessage() for r in caplog.records)

