"""OpenTelemetry metrics: decisions, refusals and metered tokens (GenAI semantic conventions).

Instruments come from the global MeterProvider; `extproc.service.server` installs one with a
Prometheus reader when `--metrics-port` is given. Attributes carry tenant/project/key id and model,
never a key or a prompt.

The request path only adds to plain in-process tallies (a dict increment); the instruments are
observable counters whose callbacks report the tallies when a reader collects (a scrape). A
synchronous OTel counter costs about 9 us per `add` with these attributes (the SDK builds and
hashes an attribute set each time), three of them per request: measured in bench/RESULTS.md.
The exported series are the same: cumulative sums per attribute set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from extproc.limiter.types import Decision
from extproc.policy.model import ApiKey
from extproc.records.record import UsageRecord

Tally = Counter[tuple[str | bool, ...]]

OTHER = "other"


def key_label(key_id: str) -> str:
    """A key id as a metric label: the policy's keys by id; every principal of a JWT provider
    ("jwt:<provider>:<sub>", one per person) as "jwt:<provider>", so the set stays bounded."""
    if key_id.startswith("jwt:"):
        return key_id[: key_id.find(":", 4)] if key_id.find(":", 4) > 0 else key_id
    return key_id
_DECISION = ("tenant", "project", "key_id", "allowed", "degraded", "pool")
_ALERT = ("tenant", "scope")
_REFUSAL = ("tenant", "reason")
_TOKENS = ("tenant", "project", "key_id", "gen_ai.request.model", "pool", "estimated", "gen_ai.token.type")
_ALERT_EVENT = ("kind", "tenant")
_REASON = ("reason",)


def _reporter(tally: Tally, names: tuple[str, ...]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(total, dict(zip(names, values, strict=True))) for values, total in tally.copy().items()]

    return observe


class Telemetry:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        m = meter or metrics.get_meter("tokenmeter")
        self.models: frozenset[str] = frozenset()  # the live policy's (Context keeps it current)
        self.decisions: Tally = Counter()
        self.alerts: Tally = Counter()
        self.refusals: Tally = Counter()
        self.tokens: Tally = Counter()
        # alert events (extproc.alerts), and their webhook deliveries
        self.alert_events: Tally = Counter()
        self.webhook_delivered: Tally = Counter()
        self.webhook_failed_attempts: Tally = Counter()
        self.webhook_dropped: Tally = Counter()
        for name, tally, attributes, unit, description in (
            ("tokenmeter.decisions", self.decisions, _DECISION, "{request}", "Admission decisions by outcome"),
            ("tokenmeter.refusals", self.refusals, _REFUSAL, "{request}", "Requests refused by the processor"),
            ("tokenmeter.alerts", self.alerts, _ALERT, "{request}", "Requests over an alert-only limit"),
            ("gen_ai.client.token.usage", self.tokens, _TOKENS, "{token}", "Tokens metered per request"),
            ("tokenmeter.alerts.events", self.alert_events, _ALERT_EVENT, "{event}",
             "Alert events emitted (log line, and webhook when configured)"),
            ("tokenmeter.alerts.webhook.delivered", self.webhook_delivered, (), "{event}",
             "Alert events the webhook accepted (2xx)"),
            ("tokenmeter.alerts.webhook.failed_attempts", self.webhook_failed_attempts, _REASON, "{attempt}",
             "Webhook attempts that failed (status, timeout, connection, tls, protocol)"),
            ("tokenmeter.alerts.webhook.dropped", self.webhook_dropped, _REASON, "{event}",
             "Alert events the webhook never got (queue_full, attempts_exhausted, shutdown)"),
        ):
            m.create_observable_counter(name, [_reporter(tally, attributes)], unit=unit, description=description)

    def decision(self, key: ApiKey, decision: Decision) -> None:
        self.decisions[(key.tenant, key.project, key_label(key.key_id), decision.allowed, decision.degraded,
                        decision.pool or "")] += 1
        for scope in decision.alerts:
            self.alerts[(key.tenant, scope)] += 1

    def alert_event(self, kind: str, tenant: str) -> None:
        self.alert_events[(kind, tenant)] += 1

    def alert_delivered(self) -> None:
        self.webhook_delivered[()] += 1

    def alert_attempt_failed(self, reason: str) -> None:
        self.webhook_failed_attempts[(reason,)] += 1

    def alert_dropped(self, reason: str, count: int = 1) -> None:
        self.webhook_dropped[(reason,)] += count

    def refusal(self, key: ApiKey | None, reason: str) -> None:
        self.refusals[(key.tenant if key else "", reason)] += 1

    def usage(self, rec: UsageRecord) -> None:
        # A model name is the client's choice: as a label it is one of the policy's models or
        # "other", so no client can grow the label set (tenant, project, key, pool come from the policy).
        model = rec.model if rec.model in self.models else OTHER
        base = (rec.tenant or "", rec.project or "", key_label(rec.key_id or ""), model, rec.pool or "",
                rec.usage_source == "estimated")
        self.tokens[(*base, "input")] += rec.prompt_tokens
        self.tokens[(*base, "output")] += rec.completion_tokens
