"""The alert sink of `tokenmeter serve`, from the process settings (`--alert-webhook`, ...)."""

from __future__ import annotations

from pathlib import Path

from extproc.alerts.sink import AlertSink
from extproc.alerts.webhook import WebhookConfig, WebhookWorker
from extproc.service.telemetry import Telemetry
from extproc.settings import Settings

__all__ = ["MIN_SECRET_BYTES", "alert_sink", "read_secret", "webhook_config"]

MIN_SECRET_BYTES = 16


def read_secret(path: str) -> bytes:
    """The webhook secret: the file's bytes, surrounding whitespace stripped (OSError, ValueError)."""
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the webhook secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def webhook_config(settings: Settings) -> WebhookConfig | None:
    """The webhook the settings name, or None. Raises ValueError (a bad URL, a secret without a
    webhook, a short secret) or OSError (an unreadable secret file): checked before serving."""
    if settings.alert_webhook is None:
        if settings.alert_webhook_secret_file is not None:
            raise ValueError("--alert-webhook-secret-file needs --alert-webhook")
        return None
    secret = read_secret(settings.alert_webhook_secret_file) if settings.alert_webhook_secret_file else None
    return WebhookConfig(settings.alert_webhook, secret=secret, queue_size=settings.alert_queue)


def alert_sink(settings: Settings, telemetry: Telemetry) -> AlertSink:
    """The sink (log line and metric always; the webhook when configured). Not started."""
    config = webhook_config(settings)
    return AlertSink(telemetry, WebhookWorker(config, telemetry) if config is not None else None)
