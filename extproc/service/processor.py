"""One ext_proc stream = the admission of one HTTP request. Protocol messages in, decisions out.

With the generated Envoy configuration (extproc.envoy.config) Envoy sends ONE message per request:
the buffered body, with path, method and credentials as attributes; or, for a request without a
body (GET /v1/models), its headers. The processor identifies the caller, parses and bounds the
request, reserves on every scope in one limiter round trip, picks the pool, and answers once: an
admission (metadata, an edited body) or a refusal. The response never comes here: Envoy meters it,
and its access log ends the request (extproc.service.access_log -> extproc.settlement.settle).

Each request is in one Phase. It ends, whatever the way, through Settlement.end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from extproc.alerts import AlertEvent, AlertKind, AlertSink
from extproc.apis import ApiSchema, BadRequest, api_for_path
from extproc.apis._request import bound_output
from extproc.audit import AuditLog, EnforcementKind, enforcement
from extproc.limiter.types import KIND_POOL, Limiter, PoolCeiling, Reservation
from extproc.limiter.types import Decision as LimiterDecision
from extproc.metering.usage import Usage
from extproc.policy.model import Action, ApiKey, JwtProvider, LimitRule, Mode, OverCap, Policy
from extproc.records.record import API_LABELS, Limit, RecordSink, UsageRecord, bounded
from extproc.service import responses as R
from extproc.service.admission import (
    OTHER_MODEL,
    ScopePath,
    output_limit,
    pool_ceilings,
    reservation_tokens,
    rule_kind,
    scope_path,
)
from extproc.service.errors import error_body
from extproc.service.identity import (
    ClaimRefusal,
    KeyRefusal,
    asserted_by,
    identify,
    identify_jwt,
    identify_trusted,
    verified_claims,
)
from extproc.service.inflight import Inflight
from extproc.service.metadata import (
    CREDENTIAL_HEADERS,
    H_KEY_ID,
    H_POOL,
    H_PROJECT,
    H_REQUEST_ID,
    H_TEAM,
    H_TENANT,
    HEADER_PREFIX,
    OUTPUT_LIMIT_KEY,
    attribute_header,
)
from extproc.service.meter_stream import MeterStream
from extproc.service.ratelimit_headers import period_end, ratelimit_headers, ratelimit_metadata, retry_after
from extproc.service.seal import Seal
from extproc.service.telemetry import Telemetry
from extproc.settlement.admitted import Admitted
from extproc.settlement.outcome import Decision, Ending
from extproc.settlement.settle import Settlement

log = logging.getLogger("tokenmeter.processor")



class PolicySource(Protocol):
    """Where the live policy comes from (extproc.policy.PolicyStore, or a fixed one in tests)."""

    @property
    def current(self) -> Policy: ...


@dataclass(frozen=True)
class FixedPolicy:
    current: Policy


class Context:
    """What every stream shares: the live policy, the limiter, the settlement, telemetry."""

    def __init__(
        self,
        policies: PolicySource,
        limiter: Limiter,
        sink: RecordSink,
        telemetry: Telemetry | None = None,
        seal: Seal | None = None,
        audit: AuditLog | None = None,
        alerts: AlertSink | None = None,
    ) -> None:
        self.policies = policies
        self.alerts = alerts  # alert events: emit() is O(1) and never raises (extproc.alerts)
        self.audit = audit  # enforcement events go to the audit trail (extproc.audit), off the request path
        self.seal = seal  # seals the admission facts that come back to be settled (extproc.service.seal)
        self.limiter = limiter
        self.sink = sink
        self.telemetry = telemetry or Telemetry()
        self.settlement = Settlement(limiter, sink, self.telemetry, prices=lambda: self.policy.prices,
                                     replica=REPLICA)
        # admitted here, not ended yet: what a draining processor waits for (extproc.service.server)
        self.inflight: Inflight[Admitted] = Inflight()
        # Envoy's request id -> ours, for each body-only request until its access log entry: how an
        # entry without our metadata (Envoy never applied the reply) finds its admission. Envoy
        # issues that id (the listener ignores a client's x-request-id). Ids only: small.
        self.by_envoy_id: Inflight[str] = Inflight()

        # derived from the live policy once per key, not per request (dropped when it reloads)
        self._derived_for: Policy | None = None
        self._scopes: dict[str, ScopePath] = {}
        # by (model, tenant, project): each from the policy (OTHER_MODEL for a model no pool names)
        self._pools_by_model: dict[tuple[str, str, str], tuple[PoolCeiling, ...]] = {}
        self._pool_models: frozenset[str] = frozenset()
        self._counted: frozenset[str] = frozenset()

    @property
    def policy(self) -> Policy:
        return self.policies.current

    def _derived(self, policy: Policy) -> None:
        if policy is not self._derived_for:
            self._derived_for, self._scopes, self._pools_by_model = policy, {}, {}
            self._pool_models = frozenset(m for p in policy.pools if p.models is not None for m in p.models)
            self._counted = frozenset(p.name for p in policy.pools if not p.reports_usage)
            self.telemetry.models = policy.models

    def scopes(self, key: ApiKey, policy: Policy) -> ScopePath:
        """The key's scope path under `policy` (admission.scope_path), computed once per policy."""
        self._derived(policy)
        path = self._scopes.get(key.key_id)
        if path is None:
            path = self._scopes[key.key_id] = scope_path(key, policy)
        return path

    def pools(self, policy: Policy, model: str = "", key: ApiKey | None = None) -> tuple[PoolCeiling, ...]:
        """The pools that serve `model` ("": every pool), in preference order, with the caller's share."""
        self._derived(policy)
        tenant, project = (key.tenant, key.project) if key is not None else ("", "")
        if model and model not in self._pool_models:
            model = OTHER_MODEL  # a name no pool lists (a client's choice): served by the pools for every model
        ck = (model, tenant, project)
        found = self._pools_by_model.get(ck)
        if found is None:
            found = self._pools_by_model[ck] = pool_ceilings(policy, model, tenant, project)
        return found

    def counted_pools(self, policy: Policy) -> frozenset[str]:
        """Pools whose servers report no usage: their responses are metered by the processor."""
        self._derived(policy)
        return self._counted


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _attribute_headers(req: pb.ProcessingRequest) -> dict[str, str]:
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    out: dict[str, str] = {}
    if attrs is None:
        return out
    for name, value in attrs.fields.items():
        header = attribute_header(name)
        if header is not None and value.WhichOneof("kind") == "string_value":
            out[header] = value.string_value
    return out


_counter = 0
# Unique per process even where every replica is pid 1 (containers): it prefixes every request id
# this replica issues and names it on the records it writes.
_ID_PREFIX = f"{secrets.token_hex(4)}{os.getpid():x}"
REPLICA = f"{socket.gethostname()[:64]}/{_ID_PREFIX}"


def _new_request_id() -> str:
    global _counter
    _counter += 1
    return f"{_ID_PREFIX}-{time.time_ns():x}-{_counter:x}"


class Phase(Enum):
    """Where one request stands on this stream."""

    NEW = auto()  # nothing received yet
    IDENTIFIED = auto()  # the caller is known; its body has not come yet
    RESERVING = auto()  # the limiter was asked: a reservation may exist
    ADMITTED = auto()  # answered with an admission: it ends in Envoy's access log
    ENDED = auto()  # ended here (refused, unmetered, aborted): settled and recorded


@dataclass
class RequestState:
    policy: Policy
    request_id: str
    phase: Phase = Phase.NEW
    path: str = ""
    api: ApiSchema | None = None  # of the path (None: not a metered inference path)
    key: ApiKey | None = None
    record: UsageRecord | None = None
    scopes: ScopePath | None = None
    model: str = ""  # the canonical model asked for ("": none), which narrows the limits that apply


class StreamProcessor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.s = RequestState(policy=ctx.policy, request_id=_new_request_id())
        self.meter: MeterStream | None = None  # this stream meters a response instead of admitting

    @property
    def exchange_over(self) -> bool:
        """The request was answered (admitted or ended), or the response metered to its end:
        nothing more comes on this stream. The caller closes it then (left to Envoy's half-close,
        grpc.aio keeps a little per stream)."""
        if self.meter is not None:
            return self.meter.done
        return self.s.phase in (Phase.ADMITTED, Phase.ENDED)

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        which = req.WhichOneof("request")
        if self.meter is not None or (which == "response_body" and self.s.phase is Phase.NEW):
            # The response of a pool that reports no usage (extproc.service.meter_stream).
            if self.meter is None:
                self.meter = MeterStream(self.ctx.seal)
            return self.meter.handle(req)
        if which == "request_body":
            if self.s.phase is Phase.NEW:
                # The usual case: the body alone, with path, method and credentials as attributes.
                headers = _attribute_headers(req)
                envoy_id = headers.get("x-request-id")
                if envoy_id:
                    self.ctx.by_envoy_id.add(envoy_id, self.s.request_id)
                return await self._admit_headers(headers, end_of_stream=False, body=req.request_body,
                                                 verified=self._verified_jwt(req))
            return await self._on_request_body(req.request_body)
        if which == "request_headers":
            msg = req.request_headers
            return await self._admit_headers(_headers(msg), end_of_stream=msg.end_of_stream,
                                             verified=self._verified_jwt(req))
        # Not sent by the generated configuration: answer without effect.
        if which == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        if which == "response_headers":
            return R.response_headers()
        if which == "response_body":
            return R.CONTINUE_RESPONSE_BODY
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    # -- identity --------------------------------------------------------------------------

    def _verified_jwt(self, req: pb.ProcessingRequest) -> tuple[JwtProvider, Struct] | None:
        """The token Envoy verified (its jwt_authn metadata), only where the policy names issuers."""
        if not self.s.policy.identity.jwt:
            return None
        return verified_claims(req.metadata_context.filter_metadata, self.s.policy)

    async def _admit_headers(
        self, headers: Mapping[str, str], *, end_of_stream: bool, body: pb.HttpBody | None = None,
        verified: tuple[JwtProvider, Struct] | None = None,
    ) -> pb.ProcessingResponse:
        """The caller's identity and attribution. With `body` (the usual case), the body's admission
        follows in the same reply."""
        s = self.s
        s.path = headers.get(":path", "")
        now = time.time()
        # Headers the authenticator set (Envoy strips the client's copies) identify the caller; else a
        # verified token (Envoy removed it from the request); else the API key.
        asserted = asserted_by(headers, s.policy)
        found: ApiKey | KeyRefusal | ClaimRefusal | None
        if asserted is not None:
            found = identify_trusted(headers, asserted, s.policy)
        elif verified is not None:
            found = identify_jwt(*verified, s.policy)
        else:
            found = identify(headers, s.policy, now)
        s.record = UsageRecord(
            request_id=s.request_id,
            time=now,
            decision=Decision.PENDING,
            policy_version=s.policy.version,
            path=s.path.split("?", 1)[0],
        )
        if isinstance(found, ClaimRefusal):  # a valid token for no tenant/project of this policy
            s.record.key_id = found.key_id
            return self._refuse(403, found.message, type_="permission_error", code=found.code,
                                decision=Decision.REFUSED)
        if found is None:
            return self._refuse(
                401,
                "Missing or unknown API key. Send it as 'Authorization: Bearer <key>'.",
                type_="invalid_request_error",
                code="invalid_api_key",
                decision=Decision.REFUSED,
            )
        key = found.key if isinstance(found, KeyRefusal) else found
        s.key = key
        s.record.tenant, s.record.project = key.tenant, key.project
        s.record.team, s.record.key_id = key.team, key.key_id
        if isinstance(found, KeyRefusal):  # known, but disabled, not valid yet or expired: 403, naming the key id
            return self._refuse(
                403, found.message, type_="permission_error", code=found.code, decision=Decision.REFUSED)
        s.phase = Phase.IDENTIFIED
        # a token's or header's principal is not cached by key id: its tenant comes with each request
        per_request = asserted is not None or verified is not None
        s.scopes = scope_path(key, s.policy) if per_request else self.ctx.scopes(key, s.policy)
        api = s.api = api_for_path(s.path)
        if api is not None and not end_of_stream:
            if body is not None:
                return await self._on_request_body(body)
            return R.request_headers([], [])  # the body follows
        if api is not None:
            return self._bad_request(BadRequest("request body is required", None))
        carries_body = (body is not None and bool(body.body)) or (body is None and not end_of_stream)
        return await self._admit_unmetered(headers, key, with_body=body is not None, carries_body=carries_body)

    async def _admit_unmetered(
        self, headers: Mapping[str, str], key: ApiKey, *, with_body: bool, carries_body: bool
    ) -> pb.ProcessingResponse:
        """Not a metered LLM call: count the request (no tokens), or refuse a method that could use
        the GPU unmetered."""
        s = self.s
        assert s.record is not None
        if headers.get(":method", "GET") not in _UNMETERED_METHODS:
            # Deny by default: a model server's other POST endpoints (score, rerank, pooling,
            # tokenize, ...) use the GPU too, and are not metered here.
            return self._unsupported()
        if carries_body:
            # Deny by default: a body on a path that is not metered (a GET /v1/models with a body, an
            # OPTIONS with one) is nothing a model server should get from this gateway.
            return self._refuse(
                400, f"{headers.get(':method', 'GET')} {s.record.path} must not carry a body.",
                type_="invalid_request_error", code="unexpected_body", decision=Decision.BAD_REQUEST)
        decision = await self._reserve(0)
        refusal = self._refusal_for(decision)
        if refusal is not None:
            return refusal
        metadata = self._attribution_metadata(key)
        metadata.update(self._admitted_metadata(decision))
        s.record.decision = self._admitted_decision(decision)
        metadata["decision"] = str(s.record.decision)
        s.phase = Phase.ENDED
        self.ctx.settlement.end(s.record, Ending.COMPLETED, usage=Usage(0, 0), charge=0 if decision.allowed else None)
        attribution = [*self._attribution(key), (H_POOL, decision.pool or "")]
        remove = self._removed_headers(headers, attribution)
        if with_body:
            return R.request_body(attribution, remove, metadata=metadata, clear_route_cache=True)
        return R.request_headers(attribution, remove, metadata=metadata, clear_route_cache=True,
                                 skip_request_body=True)

    def _attribution(self, key: ApiKey) -> list[tuple[str, str]]:
        out = [(H_TENANT, key.tenant), (H_PROJECT, key.project), (H_KEY_ID, key.key_id),
               (H_REQUEST_ID, self.s.request_id)]
        if key.team is not None:
            out.append((H_TEAM, key.team))
        return out

    @staticmethod
    def _removed_headers(headers: Mapping[str, str], attribution: list[tuple[str, str]]) -> list[str]:
        set_names = {name for name, _ in attribution}
        remove = [h for h in headers if h.startswith(HEADER_PREFIX) and h not in set_names]
        return remove + [h for h in CREDENTIAL_HEADERS if h in headers]

    def _attribution_metadata(self, key: ApiKey) -> dict[str, R.MetadataValue]:
        s = self.s
        return {
            "request_id": s.request_id,
            "tenant": key.tenant,
            "project": key.project,
            "team": key.team or "",
            "key_id": key.key_id,
            "policy_version": s.policy.version,
        }

    # -- the body: admission ---------------------------------------------------------------

    async def _on_request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        s = self.s
        assert s.key is not None and s.record is not None
        body = msg.body
        if len(body) > s.policy.request.max_body_bytes:
            return self._refuse(
                413,
                f"Request body is {len(body)} bytes; the limit is {s.policy.request.max_body_bytes}.",
                type_="invalid_request_error",
                code="request_too_large",
                decision=Decision.TOO_LARGE,
            )
        if s.api is None:  # a body on an unmetered path: only request headers come for those
            return self._unsupported()
        api = s.api
        try:
            info = api.parse_request(body)
        except BadRequest as exc:
            return self._bad_request(exc)
        # the operator's aliases name the model the servers serve: the record, the metric labels, the
        # key's allow-list and the forwarded body all use that canonical name
        model = s.policy.canonical_model(info.model)
        s.record.model, s.record.stream = bounded(model), info.stream
        s.record.api = API_LABELS.get(api.api)
        if s.key.models is not None and model not in s.key.models:
            return self._refuse(
                403, f"The model '{bounded(info.model)}' is not allowed for key '{s.key.key_id}'.",
                type_="invalid_request_error", code="model_not_allowed", decision=Decision.REFUSED, param="model")
        s.model = model  # narrows the limits that apply, and the pools
        if not self.ctx.pools(s.policy, s.model, s.key):  # the same lookup the reservation makes
            return self._refuse(
                404, f"The model '{bounded(info.model)}' is not served by this gateway.",
                type_="invalid_request_error", code="model_not_found", decision=Decision.REFUSED, param="model")
        rules = s.policy.request
        asked = info.max_output_tokens
        if asked is not None and asked > rules.max_tokens_cap and api.output_keys and rules.over_cap is OverCap.REFUSE:
            return self._bad_request(BadRequest(
                f"The request asks for up to {asked} output tokens; this gateway allows at most "
                f"{rules.max_tokens_cap}.", api.output_keys[0]))
        # What the forwarded request may generate: exactly what is reserved for it.
        limit = output_limit(asked, s.policy)
        tokens = reservation_tokens(info.prompt_tokens_estimate, asked, s.policy, info.n)
        decision = await self._reserve(tokens, output=tokens - info.prompt_tokens_estimate)
        refusal = self._refusal_for(decision)
        if refusal is not None:
            return refusal
        # An alias is forwarded as the model it stands for (the servers serve canonical names); the
        # later edits work on that body.
        renamed = _with_model(body, model) if model != info.model else None
        body = renamed or body
        capped = bound_output(body, api.output_keys, asked, limit)
        # Ask the server for stream usage on the client's behalf, unless its pool reports none anyway
        # (there the processor meters the response: extproc.service.meter_stream).
        inject = info.wants_usage_injection and decision.pool not in self.ctx.counted_pools(s.policy)
        injected = api.inject_stream_usage(capped or body) if inject else None
        new_body = injected or capped or renamed
        s.record.decision = self._admitted_decision(decision)
        admitted = Admitted(s.record, api=api, prompt_estimate=info.prompt_tokens_estimate)
        # The route sets the attribution headers from this metadata (Envoy applies no header
        # mutation of a body reply without a headers phase) and picks the pool's cluster; it also
        # needs a header mutation (even empty) in the reply to re-route, which R.request_body sends.
        metadata = admitted.to_metadata(self.ctx.seal, usage_injected=injected is not None)
        metadata.update(self._admitted_metadata(decision))
        if api.output_keys:
            metadata[OUTPUT_LIMIT_KEY] = str(limit)  # the client sees it: x-tokenmeter-max-output-tokens
        s.phase = Phase.ADMITTED
        self.ctx.inflight.add(s.request_id, admitted)
        return R.request_body([], body=new_body, metadata=metadata, clear_route_cache=True)

    async def _reserve(self, tokens: int, *, output: int = 0) -> LimiterDecision:
        s = self.s
        assert s.key is not None and s.record is not None and s.scopes is not None
        s.phase = Phase.RESERVING
        reservation = Reservation(
            request_id=s.request_id,
            tenant=s.key.tenant,
            scopes=s.scopes.for_model(s.model),
            tokens=tokens,
            pools=self.ctx.pools(s.policy, s.model, s.key),
            output_tokens=output,
        )
        decision = await self.ctx.limiter.reserve(reservation)
        wait_s = s.policy.routing.max_wait_ms / 1000
        if wait_s > 0 and not decision.allowed and decision.denied_kind == KIND_POOL:
            decision = await self._wait_for_pool(reservation, decision, time.monotonic() + wait_s)
        if decision.allowed:
            s.record.reserved_tokens = tokens
            s.record.pool = decision.pool
        s.record.alerts = decision.alerts
        s.record.degraded = decision.degraded
        self.ctx.telemetry.decision(s.key, decision)
        if decision.allowed and self.ctx.audit is not None:
            for scope in decision.alerts:  # over an alert-only limit (or any limit, in shadow mode)
                self._audit(EnforcementKind.ALERT, scope, None)
            if decision.degraded:
                self._audit(EnforcementKind.DEGRADED_ADMISSION, None, None)
        if self.ctx.alerts is not None and (decision.thresholds or decision.over):
            self._raise_alerts(self.ctx.alerts, decision)
        return decision

    async def _wait_for_pool(self, r: Reservation, decision: LimiterDecision, deadline: float) -> LimiterDecision:
        """Every pool for the model is at its ceiling: ask again when room is due, while that is before
        the policy's bounded wait ends (a denial writes nothing, so the same reservation is asked)."""
        while not decision.allowed and decision.denied_kind == KIND_POOL:
            due = decision.retry_after_seconds
            if time.monotonic() + due > deadline:
                break
            await asyncio.sleep(max(0.005, due))
            decision = await self.ctx.limiter.reserve(r)
        return decision

    def _raise_alerts(self, sink: AlertSink, decision: LimiterDecision) -> None:
        """Thresholds the limiter saw crossed (once per period per scope, cluster-wide), and requests let
        through over a limit whose action is `alert` (at most one event per scope and limit a minute)."""
        s = self.s
        assert s.key is not None and s.scopes is not None
        tenant, rid, version = s.key.tenant, s.request_id, s.policy.version
        for t in decision.thresholds:
            rule = s.scopes.rule(s.model, t.scope, t.rule)
            sink.emit(AlertEvent(kind=AlertKind.THRESHOLD, scope=t.scope, limit=rule.describe if rule else "quota",
                                 limit_value=t.limit, used=t.used, percent=t.percent, period_end=t.period_end,
                                 tenant=tenant, request_id=rid, policy_version=version))
        for scope, index, used in decision.over:
            rule = s.scopes.rule(s.model, scope, index)
            if rule is None or rule.action is not Action.ALERT:
                continue  # over in shadow mode: recorded (decided_by), not an alert of the policy
            sink.emit(AlertEvent(kind=AlertKind.OVER_LIMIT, scope=scope, limit=rule.describe, limit_value=rule.limit,
                                 used=used, tenant=tenant, request_id=rid, policy_version=version),
                      dedupe_key=f"{tenant}|{scope}|{index}|{rule.limit}", dedupe_s=60.0)

    def _audit(self, kind: EnforcementKind, scope: str | None, limit_kind: str | None) -> None:
        audit, s = self.ctx.audit, self.s
        if audit is None or s.key is None:
            return
        audit.record(enforcement(kind, s.request_id, s.key.tenant, s.key.project, s.key.key_id, scope, limit_kind,
                                 s.policy.version))

    def _admitted_decision(self, decision: LimiterDecision) -> Decision:
        if not decision.alerts:
            return Decision.ADMITTED
        mode = self.s.scopes.mode if self.s.scopes is not None else self.s.policy.mode
        if mode is Mode.ENFORCE:
            return Decision.ALERT
        if self.s.record is not None and self.s.scopes is not None:  # what enforce mode would have done
            worst = self.s.scopes.strictest(self.s.model, decision.over)
            if worst is not None:
                scope, rule, action = worst
                self.s.record.decided_by = Limit(scope, rule_kind(rule) if rule is not None else None, str(action))
        return Decision.SHADOW

    def _admitted_metadata(self, decision: LimiterDecision) -> dict[str, R.MetadataValue]:
        # Envoy's route adds the x-ratelimit-* response headers from these.
        metadata: dict[str, R.MetadataValue] = {"pool": decision.pool or ""}
        metadata.update(ratelimit_metadata(decision))
        return metadata

    def _refusal_for(self, decision: LimiterDecision) -> pb.ProcessingResponse | None:
        if decision.allowed:
            return None
        s = self.s
        if decision.denied_kind == "backend":
            self._audit(EnforcementKind.REFUSED_BACKEND, None, "backend")
            return self._refuse(
                503,
                "The quota service could not decide in time (unavailable, or this gateway is busy). "
                "Retry shortly.",
                type_="api_error",
                code="quota_service_unavailable",
                decision=Decision.REFUSED_BACKEND,
                headers=[("retry-after", retry_after(decision))],
            )
        scope = decision.denied_scope or ""
        rule = s.scopes.rule(s.model, scope, decision.denied_rule) if s.scopes else None
        action = s.scopes.action(s.model, scope, decision.denied_rule) if s.scopes else Action.THROTTLE
        what = _denial_text(decision, rule)
        kind = EnforcementKind.BLOCK if action is Action.BLOCK else EnforcementKind.THROTTLE
        self._audit(kind, decision.denied_scope, decision.denied_kind)
        if s.record is not None:
            s.record.decided_by = Limit(decision.denied_scope or "", decision.denied_kind, str(action))
        if action is Action.BLOCK:
            until = _until(decision, rule)
            return self._refuse(
                403,
                f"Quota exhausted for {decision.denied_scope}: {what}. Requests are blocked {until}.",
                type_="insufficient_quota",
                code="quota_exhausted",
                decision=Decision.BLOCKED,
                headers=ratelimit_headers(decision),
            )
        too_large = decision.denied_kind == "too_large"
        return self._refuse(
            429,
            f"Rate limit reached for {decision.denied_scope}: {what}. Retry after {retry_after(decision)}s.",
            type_="invalid_request_error" if too_large else "rate_limit_exceeded",
            code="request_exceeds_limit" if too_large else "rate_limit_exceeded",
            decision=Decision.THROTTLED,
            headers=[("retry-after", retry_after(decision)), *ratelimit_headers(decision)],
        )

    # -- the end of the stream -------------------------------------------------------------

    def close(self, *, graceful: bool = False) -> None:
        """The gRPC stream ended. A request still being reserved (the client left, Envoy gave up)
        never reached a model server: its reservation is given back and it is recorded as aborted;
        so is an identified request whose body never came. An admitted request ends later, in
        Envoy's access log."""
        s = self.s
        if s.record is None or s.phase not in (Phase.IDENTIFIED, Phase.RESERVING):
            return
        charge = 0 if s.phase is Phase.RESERVING else None
        s.phase = Phase.ENDED
        self.ctx.settlement.end(s.record, Ending.ABORTED, usage=Usage(0, 0), charge=charge)

    # -- refusals --------------------------------------------------------------------------

    def _unsupported(self) -> pb.ProcessingResponse:
        path = self.s.record.path if self.s.record is not None else ""
        return self._refuse(404, f"{path} is not an endpoint this gateway meters.", type_="invalid_request_error",
                            code="unsupported_endpoint", decision=Decision.UNSUPPORTED)

    def _bad_request(self, exc: BadRequest) -> pb.ProcessingResponse:
        return self._refuse(
            400, exc.message, type_="invalid_request_error", code="invalid_request",
            decision=Decision.BAD_REQUEST, param=exc.param,
        )

    def _refuse(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str,
        decision: Decision,
        headers: list[tuple[str, str]] | None = None,
        param: str | None = None,
    ) -> pb.ProcessingResponse:
        s = self.s
        s.phase = Phase.ENDED
        if s.record is not None:
            s.record.decision = decision
            self.ctx.settlement.end(s.record, Ending.REFUSED, status=status)
        self.ctx.telemetry.refusal(s.key, decision)
        metadata: dict[str, R.MetadataValue] = {
            "request_id": s.request_id,
            "decision": str(decision),
            "policy_version": s.policy.version,
        }
        if s.key is not None:  # who was refused: Envoy's access log keeps it (ledger recovery reads it)
            metadata.update(tenant=s.key.tenant, project=s.key.project, key_id=s.key.key_id, team=s.key.team or "")
        return R.immediate(
            status,
            error_body(message, type_=type_, code=code, param=param),
            headers=[(H_REQUEST_ID, s.request_id), *(headers or [])],
            details=f"tokenmeter_{decision}",
            metadata=metadata,
        )


_UNMETERED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _with_model(body: bytes, model: str) -> bytes:
    """`body` (one `parse_request` accepted: a JSON object) naming `model` instead."""
    obj = orjson.loads(body)
    obj["model"] = model
    return orjson.dumps(obj)


def _denial_text(decision: LimiterDecision, rule: LimitRule | None) -> str:
    kind = decision.denied_kind or "limit"
    if kind == "pool":
        return "no model pool has capacity"
    limit = f"{rule.describe} (limit {rule.limit})" if rule is not None else kind.replace("_", " ")
    if kind == "too_large":
        return f"this single request needs more than the whole limit: {limit}"
    return limit


def _until(decision: LimiterDecision, rule: LimitRule | None) -> str:
    """When a blocked caller may come back: the end of the billing period, or of the window."""
    if rule is not None and rule.period is not None:
        ends = period_end(decision.retry_after_seconds, time.time())
        return f"until the billing period ends at {ends}, or an operator lifts the block"
    return f"for {retry_after(decision)}s, or until an operator lifts the block"
