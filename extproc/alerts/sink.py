"""Where the processor sends alert events: `emit` logs, counts and queues them, and returns.

`emit` is synchronous and O(1): it never awaits, never does network I/O and never raises, so the
request path can call it as it decides. Each event (1) becomes one JSON line on the logger
``tokenmeter.alerts`` at WARNING, (2) is counted on ``tokenmeter.alerts.events`` by kind and tenant,
(3) with a webhook configured, is queued for it (extproc.alerts.webhook). Call it from the event
loop's thread.

Threshold events are deduplicated cluster-wide by the limiter (once per period per scope).
Over-limit events would fire on every request over the limit: the caller passes a `dedupe_key`
(scope and limit) and `dedupe_s`, and the same key goes through at most once per `dedupe_s` seconds
on this replica (extproc.alerts.dedupe); repeats are counted in `suppressed`, nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from extproc.alerts.dedupe import DEFAULT_MAX_KEYS, Dedupe
from extproc.alerts.event import AlertEvent
from extproc.alerts.webhook import WebhookWorker
from extproc.service.telemetry import Telemetry

__all__ = ["LOGGER", "AlertSink"]

LOGGER = "tokenmeter.alerts"
log = logging.getLogger(LOGGER)


class AlertSink:
    def __init__(
        self,
        telemetry: Telemetry | None = None,
        webhook: WebhookWorker | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_dedupe_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.telemetry = telemetry or Telemetry()
        self.webhook = webhook
        self._dedupe = Dedupe(max_keys=max_dedupe_keys, clock=clock)
        self.suppressed = 0  # events a dedupe key held back

    def emit(self, event: AlertEvent, *, dedupe_key: str | None = None, dedupe_s: float = 0.0) -> None:
        """Log, count and (with a webhook) queue `event`, unless `dedupe_key` went through within
        the last `dedupe_s` seconds. Never blocks, never raises."""
        try:
            if dedupe_key is not None and dedupe_s > 0 and not self._dedupe.admit(dedupe_key, dedupe_s):
                self.suppressed += 1
                return
            body = event.to_json()
            log.warning("%s", body.decode())
            self.telemetry.alert_event(str(event.kind), event.tenant)
            if self.webhook is not None:
                self.webhook.offer(body)
        except Exception:  # an alert is never worth failing a request for
            log.exception("alert event not emitted")

    async def start(self) -> None:
        """Start the webhook's delivery task (if any); call from the running loop."""
        if self.webhook is not None:
            self.webhook.start()

    async def aclose(self) -> None:
        """Deliver what is queued for a bounded time (the webhook's `drain_s`), then stop."""
        if self.webhook is not None:
            await self.webhook.aclose()
