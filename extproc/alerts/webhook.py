"""Deliver alert events to a webhook from a background task: bounded queue, retries, never blocking.

`offer` (from the event loop's thread) puts an event's JSON on a bounded queue and returns; a full
queue drops the new event (counted: ``queue_full``). One task POSTs the events in order, one per
request (extproc.alerts.http), each attempt under a deadline. A 2xx delivers; any other status, a
timeout, a failed connection or an answer that is not HTTP is a failed attempt, retried after a
full-jitter exponential backoff (a delay drawn from [0, min(max_s, base_s * 2**retry)]); an event
that fails `attempts` times is dropped (counted: ``attempts_exhausted``). `aclose` lets the task
deliver what is queued for at most `drain_s` seconds, then stops it; what is left is dropped
(counted: ``shutdown``).

With a secret, each request carries ``x-tokenmeter-signature: sha256=<hex>``, the HMAC-SHA256 of the
body, so the receiver can tell the events are ours. Delivery is at least once (a 2xx lost on its way
back is retried): receivers drop repeats by the event's `id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from extproc.alerts.http import Endpoint, HttpError, post
from extproc.service.telemetry import Telemetry

__all__ = ["SIGNATURE_HEADER", "Backoff", "WebhookConfig", "WebhookWorker", "full_jitter", "signature"]

log = logging.getLogger("tokenmeter.alerts")

SIGNATURE_HEADER = "x-tokenmeter-signature"

Sleep = Callable[[float], Awaitable[None]]
Jitter = Callable[[float], float]  # the backoff cap -> the delay to wait


def full_jitter(cap: float) -> float:
    return random.uniform(0.0, cap)


def signature(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.5
    max_s: float = 30.0
    attempts: int = 5  # in all, the first included

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.max_s < 0:
            raise ValueError("a backoff needs attempts >= 1 and delays >= 0")

    def cap(self, retry: int) -> float:
        """The longest wait before retry number `retry` (0 for the first)."""
        return min(self.max_s, self.base_s * 2.0 ** min(retry, 64))


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: bytes | None = field(default=None, repr=False)
    queue_size: int = 1000
    timeout_s: float = 5.0  # per attempt: connect, send, read the status line
    backoff: Backoff = field(default_factory=Backoff)
    drain_s: float = 5.0  # how long `aclose` waits for the queue to empty

    def __post_init__(self) -> None:
        Endpoint.parse(self.url)  # ValueError for a URL the client cannot use
        if self.queue_size < 1:
            raise ValueError("the alert queue needs room for at least one event")
        if self.timeout_s <= 0 or self.drain_s < 0:
            raise ValueError("timeout_s must be > 0 and drain_s >= 0")
        if self.secret is not None and not self.secret:
            raise ValueError("the webhook secret is empty")


class WebhookWorker:
    def __init__(
        self,
        config: WebhookConfig,
        telemetry: Telemetry,
        *,
        sleep: Sleep = asyncio.sleep,
        jitter: Jitter = full_jitter,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.endpoint = Endpoint.parse(config.url)
        self._telemetry = telemetry
        self._sleep = sleep
        self._jitter = jitter
        # made once: reading the system's CA files blocks
        self._ssl = ssl_context or (ssl.create_default_context() if self.endpoint.https else None)
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(config.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._cut = 0  # events stopped mid-delivery by aclose
        self._full = False  # dropping for a full queue (logged once per episode)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, body: bytes) -> None:
        """Queue one event's JSON for delivery; O(1), never blocks. A full queue drops it."""
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self._telemetry.alert_dropped("queue_full")
            if not self._full:
                self._full = True
                log.warning("alert webhook %s: queue full (%d), dropping new events", self.endpoint,
                            self.config.queue_size)
        else:
            self._full = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="alert-webhook")

    async def aclose(self) -> None:
        """Deliver what is queued for at most `drain_s` seconds, then stop; the rest is dropped."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.drain_s):
                    await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left, self._cut = self._queue.qsize() + self._cut, 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if left:
            self._telemetry.alert_dropped("shutdown", left)
            log.warning("alert webhook %s: %d events not delivered at shutdown", self.endpoint, left)

    async def _run(self) -> None:
        while True:
            body = await self._queue.get()
            try:
                await self.deliver(body)
            except asyncio.CancelledError:
                self._cut += 1  # stopped mid-delivery: dropped at shutdown
                raise
            except Exception:  # deliver handles what a server can do; this is a bug, survived
                log.exception("alert webhook %s: event dropped", self.endpoint)
                self._telemetry.alert_dropped("error")
            finally:
                self._queue.task_done()

    async def deliver(self, body: bytes) -> bool:
        """POST one event until a 2xx or `attempts` failures (then dropped and counted)."""
        headers = {"Content-Type": "application/json"}
        if self.config.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.config.secret, body)
        backoff = self.config.backoff
        detail = ""
        for attempt in range(backoff.attempts):
            if attempt:
                await self._sleep(self._jitter(backoff.cap(attempt - 1)))
            failure = await self._attempt(body, headers)
            if failure is None:
                self._telemetry.alert_delivered()
                return True
            reason, detail = failure
            self._telemetry.alert_attempt_failed(reason)
            log.info("alert webhook %s: attempt %d of %d failed: %s", self.endpoint, attempt + 1,
                     backoff.attempts, detail)
        self._telemetry.alert_dropped("attempts_exhausted")
        log.warning("alert webhook %s: event dropped after %d failed attempts (last: %s)", self.endpoint,
                    backoff.attempts, detail)
        return False

    async def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[str, str] | None:
        """None when delivered, else (the metric's reason, what happened)."""
        try:
            status = await post(self.endpoint, body, headers, timeout_s=self.config.timeout_s, ssl_context=self._ssl)
        except TimeoutError:  # before OSError: TimeoutError is one
            return "timeout", f"no answer within {self.config.timeout_s:g}s"
        except ssl.SSLError as exc:  # before ValueError: a failed certificate check is both
            return "tls", f"{type(exc).__name__}: {exc}"
        except (HttpError, ValueError) as exc:
            return "protocol", f"{type(exc).__name__}: {exc}"
        except OSError as exc:  # refused, reset, unreachable
            return "connection", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # nothing a server does should get here: counted, survived
            return "error", f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else ("status", f"HTTP {status}")
