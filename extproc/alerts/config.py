"""The alert sink of `tokenmeter serve`, from the process settings (`--alert-webhook`, ...)."""

from __future__ import annotations

from extproc.alerts.sink import AlertSink
from extproc.alerts.webhook import WebhookConfig, WebhookWorker
from extproc.service.telemetry import Telemetry
from extproc.settings import Settings, read_secret

__all__ = ["alert_sink", "webhook_config"]


def webhook_config(settings: Settings) -> WebhookConfig | None:
    """The webhook the settings name, or None. Raises ValueError (a bad URL, a secret without a
    webhook, a short secret) or OSError (an unreadable secret file): checked before serving."""
    if settings.alert_webhook is None:
        if settings.alert_webhook_secret_file is not None:
            raise ValueError("--alert-webhook-secret-file needs --alert-webhook")
        return None
    secret = (read_secret(settings.alert_webhook_secret_file, "webhook secret")
              if settings.alert_webhook_secret_file else None)
    return WebhookConfig(settings.alert_webhook, secret=secret, queue_size=settings.alert_queue)


def alert_sink(settings: Settings, telemetry: Telemetry) -> AlertSink:
    """The sink (log line and metric always; the webhook when configured). Not started."""
    config = webhook_config(settings)
    return AlertSink(telemetry, WebhookWorker(config, telemetry) if config is not None else None)
