"""OpenTelemetry metrics: decisions, refusals and metered tokens (GenAI semantic conventions).

Instruments come from the global MeterProvider; `extproc.service.server` installs one with a
Prometheus reader when `--metrics-port` is given. Attributes carry tenant/project/key id and model,
never a key or a prompt.
"""

from __future__ import annotations

from opentelemetry import metrics

from extproc.limiter.types import Decision
from extproc.policy.model import ApiKey
from extproc.records.record import UsageRecord


class Telemetry:
    def __init__(self, meter: metrics.Meter | None = None) -> None:
        m = meter or metrics.get_meter("tokenmeter")
        self._decisions = m.create_counter(
            "tokenmeter.decisions", unit="{request}", description="Admission decisions by outcome"
        )
        self._refusals = m.create_counter(
            "tokenmeter.refusals", unit="{request}", description="Requests refused by the processor"
        )
        self._alerts = m.create_counter(
            "tokenmeter.alerts", unit="{request}", description="Requests over an alert-only limit"
        )
        self._tokens = m.create_counter(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens metered per request"
        )

    def decision(self, key: ApiKey, decision: Decision) -> None:
        attrs: dict[str, str | bool] = {
            "tenant": key.tenant,
            "project": key.project,
            "key_id": key.key_id,
            "allowed": decision.allowed,
            "degraded": decision.degraded,
            "pool": decision.pool or "",
        }
        self._decisions.add(1, attrs)
        for scope in decision.alerts:
            self._alerts.add(1, {"tenant": key.tenant, "scope": scope})

    def refusal(self, key: ApiKey | None, reason: str) -> None:
        self._refusals.add(1, {"tenant": key.tenant if key else "", "reason": reason})

    def usage(self, rec: UsageRecord) -> None:
        base: dict[str, str | bool] = {
            "tenant": rec.tenant or "",
            "project": rec.project or "",
            "key_id": rec.key_id or "",
            "gen_ai.request.model": rec.model or "",
            "pool": rec.pool or "",
            "estimated": rec.usage_source == "estimated",
        }
        self._tokens.add(rec.prompt_tokens, {**base, "gen_ai.token.type": "input"})
        self._tokens.add(rec.completion_tokens, {**base, "gen_ai.token.type": "output"})
