"""Alert events: quota thresholds crossed and requests over alert-only limits, never on the request path.

The processor calls `AlertSink.emit` (synchronous, O(1)); the event goes to the log, a metric, and
optionally a webhook delivered by a background task (extproc.alerts.webhook).
"""

from extproc.alerts.event import AlertEvent, AlertKind
from extproc.alerts.sink import AlertSink
from extproc.alerts.webhook import Backoff, WebhookConfig, WebhookWorker

__all__ = ["AlertEvent", "AlertKind", "AlertSink", "Backoff", "WebhookConfig", "WebhookWorker"]
