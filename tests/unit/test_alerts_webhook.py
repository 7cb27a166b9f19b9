"""The webhook worker against a real local HTTP(S) server: delivery, signature, retries, drops, drain."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from extproc.alerts import AlertSink, Backoff, WebhookConfig, WebhookWorker
from extproc.alerts.webhook import full_jitter
from extproc.service.telemetry import Telemetry
from tests.unit.test_alerts_event import threshold
from tests.unit.webhook_receiver import (
    CLOSE,
    GARBAGE,
    HALF,
    INTERIM,
    LONG,
    SILENT,
    closed_port,
    receiver,
    self_signed,
)

SECRET = b"0123456789abcdef-webhook"
GUARD_S = 20.0  # a broken drain fails the test instead of hanging it (not a performance bound)


class Sleeps:
    """The injected sleep: keeps the delays asked for, waits for none."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.requested.append(delay)


class Setup:
    def __init__(self, url: str, *, attempts: int = 3, queue_size: int = 100, timeout_s: float = 5.0,
                 drain_s: float = GUARD_S, secret: bytes | None = SECRET, ssl_context: ssl.SSLContext | None = None,
                 jitter: Callable[[float], float] = lambda cap: cap) -> None:
        self.telemetry = Telemetry()
        self.sleeps = Sleeps()
        config = WebhookConfig(url, secret=secret, queue_size=queue_size, timeout_s=timeout_s,
                               backoff=Backoff(attempts=attempts), drain_s=drain_s)
        self.worker = WebhookWorker(config, self.telemetry, sleep=self.sleeps, jitter=jitter, ssl_context=ssl_context)
        self.sink = AlertSink(self.telemetry, self.worker)

    async def close(self) -> None:
        async with asyncio.timeout(GUARD_S):
            await self.sink.aclose()

    @property
    def delivered(self) -> int:
        return self.telemetry.webhook_delivered[()]

    def failed(self, reason: str) -> int:
        return self.telemetry.webhook_failed_attempts[(reason,)]

    def dropped(self, reason: str) -> int:
        return self.telemetry.webhook_dropped[(reason,)]


async def test_an_event_is_posted_as_json_with_its_hmac_signature() -> None:
    async with receiver([200]) as server:
        s = Setup(server.url("/hooks/alerts?team=ops"))
        await s.sink.start()
        event = threshold()
        s.sink.emit(event)
        await s.close()
    [got] = server.received
    assert got.target == "/hooks/alerts?team=ops"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["host"] == f"127.0.0.1:{server.port}"
    assert got.body == event.to_json()
    assert orjson.loads(got.body)["scope"] == "project:acme/chatbot"
    expected = "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-tokenmeter-signature"] == expected
    assert (s.delivered, s.sleeps.requested) == (1, [])


async def test_without_a_secret_there_is_no_signature_header() -> None:
    async with receiver([204]) as server:
        s = Setup(server.url(), secret=None)
        await s.sink.start()
        s.sink.emit(threshold())
        await s.close()
    assert "x-tokenmeter-signature" not in server.received[0].headers
    assert s.delivered == 1


async def test_failed_attempts_are_retried_with_exponential_backoff_then_delivered() -> None:
    async with receiver([500, 503, 200]) as server:
        s = Setup(server.url(), attempts=5)
        await s.sink.start()
        s.sink.emit(threshold())
        await s.close()
    assert len(server.received) == 3
    assert len({r.body for r in server.received}) == 1  # the same event, retried
    assert s.sleeps.requested == [0.5, 1.0]  # base 0.5 s, doubling (jitter injected as the cap itself)
    assert (s.failed("status"), s.delivered, s.dropped("attempts_exhausted")) == (2, 1, 0)


def test_backoff_doubles_up_to_its_maximum_and_full_jitter_stays_below_the_cap() -> None:
    assert [Backoff().cap(i) for i in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert Backoff(base_s=1.0, max_s=5.0).cap(10_000) == 5.0
    draws = [full_jitter(2.0) for _ in range(2_000)]
    assert all(0.0 <= d <= 2.0 for d in draws)
    assert min(draws) < 0.5 < 1.5 < max(draws)  # spread over the range, not the cap every time


async def test_a_server_that_is_down_costs_emit_nothing_and_its_events_are_dropped_after_the_attempts() -> None:
    s = Setup(f"http://127.0.0.1:{closed_port()}/hook", attempts=3)
    await s.sink.start()
    s.sink.emit(threshold(used=1))
    s.sink.emit(threshold(used=2))
    assert s.worker.queued == 2  # emit returned without waiting for any delivery
    await s.close()
    assert s.failed("connection") == 6
    assert s.sleeps.requested == [0.5, 1.0, 0.5, 1.0]
    assert (s.dropped("attempts_exhausted"), s.delivered) == (2, 0)


@pytest.mark.parametrize("misbehaviour", [CLOSE, GARBAGE, HALF, LONG])
async def test_a_server_that_closes_mid_response_or_sends_garbage_is_a_failed_attempt(misbehaviour: str) -> None:
    async with receiver([misbehaviour, 200]) as server:
        s = Setup(server.url(), attempts=2)
        await s.sink.start()
        s.sink.emit(threshold())
        await s.close()
    assert (s.failed("protocol"), s.delivered) == (1, 1)


async def test_the_worker_survives_a_dropped_event_and_delivers_the_next() -> None:
    async with receiver([GARBAGE, HALF, 200]) as server:
        s = Setup(server.url(), attempts=2)
        await s.sink.start()
        s.sink.emit(threshold(used=1))
        s.sink.emit(threshold(used=2))
        await s.close()
    assert (s.dropped("attempts_exhausted"), s.delivered) == (1, 1)
    assert orjson.loads(server.received[-1].body)["used"] == 2


async def test_an_interim_100_continue_is_skipped() -> None:
    async with receiver([INTERIM]) as server:
        s = Setup(server.url(), attempts=1)
        await s.sink.start()
        s.sink.emit(threshold())
        await s.close()
    assert s.delivered == 1


async def test_a_server_that_never_answers_times_the_attempt_out() -> None:
    async with receiver([SILENT, 200]) as server:
        s = Setup(server.url(), attempts=2, timeout_s=0.2)
        await s.sink.start()
        s.sink.emit(threshold())
        await s.close()
    assert (s.failed("timeout"), s.delivered) == (1, 1)


async def test_aclose_delivers_what_is_queued() -> None:
    async with receiver([200]) as server:
        s = Setup(server.url())
        await s.sink.start()
        for used in range(5):
            s.sink.emit(threshold(used=used))
        await s.close()
    assert [orjson.loads(r.body)["used"] for r in server.received] == [0, 1, 2, 3, 4]
    assert s.delivered == 5
    assert not s.telemetry.webhook_dropped


async def test_aclose_gives_up_after_its_drain_time_and_counts_what_was_left() -> None:
    async with receiver([SILENT]) as server:
        s = Setup(server.url(), timeout_s=60.0, drain_s=0.1)
        await s.sink.start()
        for used in range(3):
            s.sink.emit(threshold(used=used))
        await s.close()  # the first attempt would wait 60 s: the drain stops it
    assert (s.dropped("shutdown"), s.delivered) == (3, 0)


async def test_https_with_a_trusted_certificate_delivers(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    async with receiver([200], ssl_context=server_tls) as server:
        trusted = Setup(server.url(scheme="https"), attempts=1, ssl_context=ssl.create_default_context(cafile=cert))
        await trusted.sink.start()
        trusted.sink.emit(threshold())
        await trusted.close()
        untrusted = Setup(server.url(scheme="https"), attempts=1)  # the system's CAs: not this certificate
        await untrusted.sink.start()
        untrusted.sink.emit(threshold())
        await untrusted.close()
    assert trusted.delivered == 1
    assert len(server.received) == 1
    assert (untrusted.failed("tls"), untrusted.delivered) == (1, 0)
