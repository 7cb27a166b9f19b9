"""One ext_proc stream = one HTTP request. This module turns protocol messages into decisions.

Phases, in the order Envoy sends them:
  request headers  -> identify the caller, strip spoofable headers, set attribution
  request body     -> parse, bound, reserve on the limiter (one round trip), choose the pool
  response headers -> add x-ratelimit-* headers, learn whether the body is an SSE stream
  response body    -> meter each chunk as it passes (answered at once), settle at end of stream
If the stream ends early (client gone, upstream reset) the reservation is settled at the estimate.

envoy/envoy-native.yaml skips the request headers: the body comes alone, with path, method and
credentials as Envoy attributes, and is admitted in one reply; the response never comes here
(Envoy meters it, and its access log settles: extproc.service.access_log).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.limiter.types import Decision, Limiter, PoolCeiling, Reservation
from extproc.metering.request import (
    BadRequest,
    RequestInfo,
    Schema,
    inject_stream_usage,
    parse_request,
    schema_for_path,
)
from extproc.metering.usage_chunk import UsageChunkFilter
from extproc.policy.model import Action, ApiKey, Policy
from extproc.records.record import RecordSink, UsageRecord
from extproc.service import responses as R
from extproc.service.accounting import ResponseAccounting
from extproc.service.admission import ScopePath, pool_ceilings, reservation_tokens, scope_path
from extproc.service.errors import error_body
from extproc.service.identity import identify
from extproc.service.inflight import Inflight
from extproc.service.metadata import ATTRIBUTE_HEADERS as _ATTRIBUTE_HEADERS
from extproc.service.metadata import (
    H_KEY_ID,
    H_POOL,
    H_PROJECT,
    H_REQUEST_ID,
    H_TEAM,
    H_TENANT,
    HEADER_PREFIX,
    NAMESPACE,
    STRIP_USAGE_KEY,
)
from extproc.service.ratelimit_headers import ratelimit_headers, ratelimit_metadata, retry_after
from extproc.service.seal import SEAL_KEY, Seal
from extproc.service.telemetry import Telemetry

log = logging.getLogger("tokenmeter.processor")

# Credentials of the caller are the gateway's business, not the model server's.
_CREDENTIAL_HEADERS = ("authorization", "x-api-key")


class PolicySource(Protocol):
    """Where the live policy comes from (extproc.policy.PolicyStore, or a fixed one in tests)."""

    @property
    def current(self) -> Policy: ...


@dataclass(frozen=True)
class FixedPolicy:
    current: Policy


class Context:
    """What every stream shares: the live policy, the limiter, the record sink, telemetry."""

    def __init__(
        self,
        policies: PolicySource,
        limiter: Limiter,
        sink: RecordSink,
        telemetry: Telemetry | None = None,
        seal: Seal | None = None,
    ) -> None:
        self.policies = policies
        self.seal = seal  # seals admission metadata that comes back to be settled (extproc.service.seal)
        self.limiter = limiter
        self.sink = sink
        self.telemetry = telemetry or Telemetry()
        # admitted here, response accounted for elsewhere, not ended yet
        self.inflight: Inflight[ResponseAccounting] = Inflight()
        # Envoy's request id -> ours, for each body-only request until its access log entry: how an
        # entry without our metadata (Envoy never applied the reply) finds its admission. Envoy
        # issues that id (the listener ignores a client's x-request-id). Ids only: small.
        self.by_envoy_id: Inflight[str] = Inflight()

        # derived from the live policy once per key, not per request (dropped when it reloads)
        self._derived_for: Policy | None = None
        self._scopes: dict[str, ScopePath] = {}
        self._pools: tuple[PoolCeiling, ...] = ()

    @property
    def policy(self) -> Policy:
        return self.policies.current

    def _derived(self, policy: Policy) -> None:
        if policy is not self._derived_for:
            self._derived_for, self._scopes, self._pools = policy, {}, pool_ceilings(policy)

    def scopes(self, key: ApiKey, policy: Policy) -> ScopePath:
        """The key's scope path under `policy` (admission.scope_path), computed once per policy."""
        self._derived(policy)
        path = self._scopes.get(key.key_id)
        if path is None:
            path = self._scopes[key.key_id] = scope_path(key, policy)
        return path

    def pools(self, policy: Policy) -> tuple[PoolCeiling, ...]:
        self._derived(policy)
        return self._pools


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
        header = _ATTRIBUTE_HEADERS.get(name)
        if header is not None and value.WhichOneof("kind") == "string_value":
            out[header] = value.string_value
    return out


_counter = 0
# Unique per process even where every replica is pid 1 (containers).
_ID_PREFIX = f"{secrets.token_hex(4)}{os.getpid():x}"


def _new_request_id() -> str:
    global _counter
    _counter += 1
    return f"{_ID_PREFIX}-{time.time_ns():x}-{_counter:x}"


@dataclass
class RequestState:
    policy: Policy
    request_id: str
    path: str = ""
    schema: Schema | None = None  # of the path (None: not a metered inference path)
    key: ApiKey | None = None
    info: RequestInfo | None = None
    decision: Decision | None = None
    settled: bool = False  # a refusal was answered, or the response was accounted for
    record: UsageRecord | None = None
    scopes: ScopePath | None = None
    accounting: ResponseAccounting | None = None
    # Envoy sends this stream no response body (envoy-observe.yaml: an observability-mode stream
    # meters it): the request's accounting belongs to that stream, not to this one's close().
    response_elsewhere: bool = False
    reserving: bool = False  # a reservation may exist in the limiter (the call was made)
    # we injected stream_options.include_usage and the response comes here: take its chunk back
    usage_filter: UsageChunkFilter | None = None
    # the reply just sent answers the last message Envoy sends on this stream (the end of the
    # response body, or a refusal): the stream can be closed from this side
    answered_last: bool = False


class StreamProcessor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.s = RequestState(policy=ctx.policy, request_id=_new_request_id())

    @property
    def exchange_over(self) -> bool:
        """Nothing more will come on this stream that needs an answer: the end of the response or a
        refusal was answered, or the request was answered and the response goes elsewhere (or
        nowhere). The caller closes the stream then, so that it does not stay open (and hold memory
        here) for the whole response, and is not left for Envoy to end (grpc.aio leaks a little
        per stream that the client ends: bench/RESULTS.md)."""
        s = self.s
        return s.answered_last or (s.response_elsewhere and (s.settled or s.accounting is not None))

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        which = req.WhichOneof("request")
        if which == "response_body":
            return self._on_response_body(req)
        if req.HasField("protocol_config"):  # on the first message of the stream
            self.s.response_elsewhere = req.protocol_config.response_body_mode == _BODY_NONE
        if which == "request_headers":
            msg = req.request_headers
            return await self._admit_headers(_headers(msg), end_of_stream=msg.end_of_stream)
        if which == "request_body":
            if self.s.record is None:
                # Request headers are skipped (envoy/envoy-native.yaml): the body comes alone, with
                # the path, method and credentials as attributes. One message for the whole request.
                headers = _attribute_headers(req)
                envoy_id = headers.get("x-request-id")
                if envoy_id:
                    self.ctx.by_envoy_id.add(envoy_id, self.s.request_id)
                return await self._admit_headers(headers, end_of_stream=False, body=req.request_body)
            return await self._on_request_body(req.request_body)
        if which == "response_headers":
            return self._on_response_headers(req.response_headers)
        if which == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    # -- request headers -------------------------------------------------------------------

    async def _admit_headers(
        self, headers: Mapping[str, str], *, end_of_stream: bool, body: pb.HttpBody | None = None
    ) -> pb.ProcessingResponse:
        """The caller's identity and attribution. With `body` (headers skipped, see handle), the
        body's admission follows in the same reply."""
        s = self.s
        s.path = headers.get(":path", "")
        key = identify(headers, s.policy)
        s.record = UsageRecord(
            request_id=s.request_id,
            time=time.time(),
            decision="pending",
            policy_version=s.policy.version,
            path=s.path.split("?", 1)[0],
        )
        if key is None:
            return self._refuse(
                401,
                "Missing or unknown API key. Send it as 'Authorization: Bearer <key>'.",
                type_="invalid_request_error",
                code="invalid_api_key",
                decision="refused",
            )
        s.key = key
        s.record.tenant, s.record.project = key.tenant, key.project
        s.record.team, s.record.key_id = key.team, key.key_id
        s.scopes = self.ctx.scopes(key, s.policy)
        attribution = [
            (H_TENANT, key.tenant),
            (H_PROJECT, key.project),
            (H_KEY_ID, key.key_id),
            (H_REQUEST_ID, s.request_id),
        ]
        if key.team is not None:
            attribution.append((H_TEAM, key.team))
        set_names = {name for name, _ in attribution}
        remove = [h for h in headers if h.startswith(HEADER_PREFIX) and h not in set_names]
        remove += [h for h in _CREDENTIAL_HEADERS if h in headers]
        metadata: dict[str, R.MetadataValue] = {
            "request_id": s.request_id,
            "tenant": key.tenant,
            "project": key.project,
            "team": key.team or "",
            "key_id": key.key_id,
            "policy_version": s.policy.version,
        }
        schema = s.schema = schema_for_path(s.path)
        if schema is None or end_of_stream:
            # Not a metered LLM call (or no body): count the request, no token accounting.
            if schema is not None:
                return self._bad_request(BadRequest("request body is required", None))
            if headers.get(":method", "GET") not in _UNMETERED_METHODS:
                # Deny by default: a model server's other POST endpoints (score, rerank, pooling,
                # tokenize, ...) use the GPU too, and are not metered here.
                return self._refuse(
                    404,
                    f"{s.record.path} is not an endpoint this gateway meters.",
                    type_="invalid_request_error",
                    code="unsupported_endpoint",
                    decision="unsupported",
                )
            decision = await self._reserve(0)
            refusal = self._refusal_for(decision)
            if refusal is not None:
                return refusal
            metadata.update(self._admitted_metadata(decision))
            s.record.decision = str(metadata["decision"])
            s.settled = True
            if decision.allowed:  # no tokens to meter: give the reservation back now
                self.ctx.limiter.settle(key.tenant, s.request_id, 0)
            self._emit()
            if body is not None:
                return R.request_body(
                    [*attribution, (H_POOL, decision.pool or "")], remove, metadata=metadata, clear_route_cache=True
                )
            return R.request_headers(
                [*attribution, (H_POOL, decision.pool or "")],
                remove,
                metadata=metadata,
                clear_route_cache=True,
                skip_request_body=True,
            )
        if body is not None:
            # Without a headers phase Envoy applies no header mutation: envoy-native.yaml's route
            # sets the attribution headers from this metadata and removes the credentials.
            return await self._on_request_body(body, header_metadata=metadata)
        return R.request_headers(attribution, remove, metadata=metadata)

    # -- request body ----------------------------------------------------------------------

    async def _on_request_body(
        self, msg: pb.HttpBody, header_metadata: Mapping[str, R.MetadataValue] | None = None
    ) -> pb.ProcessingResponse:
        """The body's admission. `header_metadata`: the headers were skipped, and their metadata
        goes out with this reply (see _admit_headers)."""
        s = self.s
        assert s.key is not None and s.record is not None
        body = msg.body
        if len(body) > s.policy.request.max_body_bytes:
            return self._refuse(
                413,
                f"Request body is {len(body)} bytes; the limit is {s.policy.request.max_body_bytes}.",
                type_="invalid_request_error",
                code="request_too_large",
                decision="too_large",
            )
        schema = s.schema or Schema.OPENAI
        try:
            info = parse_request(body, schema)
        except BadRequest as exc:
            return self._bad_request(exc)
        s.info = info
        s.record.model, s.record.stream = info.model, info.stream
        tokens = reservation_tokens(
            info.prompt_tokens_estimate, info.max_output_tokens, s.policy, info.n
        )
        decision = await self._reserve(tokens)
        refusal = self._refusal_for(decision)
        if refusal is not None:
            return refusal
        new_body = inject_stream_usage(body) if info.wants_usage_injection else None
        if new_body is not None and not s.response_elsewhere:
            s.usage_filter = UsageChunkFilter()
        # Without a headers phase Envoy ignores header mutations; it still needs one (even empty) in
        # the reply to re-route on the new metadata, and R.request_body always sends one.
        set_headers: list[tuple[str, str]] = []
        if header_metadata is None:
            set_headers = [(H_POOL, decision.pool or "")]
            if new_body is not None:
                set_headers.append(("content-length", str(len(new_body))))
        metadata = dict(header_metadata or {})
        metadata.update(self._admitted_metadata(decision))
        s.record.decision = str(metadata["decision"])
        s.accounting = ResponseAccounting(s.record, schema=schema, prompt_estimate=info.prompt_tokens_estimate)
        metadata.update(s.accounting.to_metadata())
        if new_body is not None:
            # the route that serves it takes the usage event the client did not ask for back out
            metadata[STRIP_USAGE_KEY] = True
        if self.ctx.seal is not None:
            metadata[SEAL_KEY] = self.ctx.seal.sign(metadata)
        if s.response_elsewhere:
            self.ctx.inflight.add(s.request_id, s.accounting)
        return R.request_body(set_headers, body=new_body, metadata=metadata, clear_route_cache=True)

    async def _reserve(self, tokens: int) -> Decision:
        s = self.s
        assert s.key is not None and s.record is not None and s.scopes is not None
        s.reserving = True
        decision = await self.ctx.limiter.reserve(
            Reservation(
                request_id=s.request_id,
                tenant=s.key.tenant,
                scopes=s.scopes.scopes,
                tokens=tokens,
                pools=self.ctx.pools(s.policy),
            )
        )
        s.decision = decision
        if decision.allowed:
            s.record.reserved_tokens = tokens
            s.record.pool = decision.pool
        s.record.alerts = decision.alerts
        s.record.degraded = decision.degraded
        self.ctx.telemetry.decision(s.key, decision)
        return decision

    def _admitted_metadata(self, decision: Decision) -> dict[str, R.MetadataValue]:
        label = "admitted"
        if decision.alerts:
            label = "alert" if self.s.policy.mode.value == "enforce" else "shadow"
        if decision.degraded:
            label += "_degraded"
        # Envoy's route adds the x-ratelimit-* response headers from these (envoy/envoy.yaml).
        metadata: dict[str, R.MetadataValue] = {"pool": decision.pool or "", "decision": label}
        metadata.update(ratelimit_metadata(decision))
        return metadata

    def _refusal_for(self, decision: Decision) -> pb.ProcessingResponse | None:
        if decision.allowed:
            return None
        s = self.s
        if decision.denied_kind == "backend":
            return self._refuse(
                503,
                "Quota service unavailable; the policy fails closed. Retry shortly.",
                type_="api_error",
                code="quota_service_unavailable",
                decision="refused_backend",
                headers=[("retry-after", retry_after(decision))],
            )
        actions = s.scopes.actions if s.scopes else {}
        action = actions.get(decision.denied_scope or "", Action.THROTTLE)
        what = _denial_text(decision)
        if action is Action.BLOCK:
            return self._refuse(
                403,
                f"Quota exhausted for {decision.denied_scope}: {what}. Requests are blocked.",
                type_="insufficient_quota",
                code="quota_exhausted",
                decision="blocked",
                headers=ratelimit_headers(decision),
            )
        return self._refuse(
            429,
            f"Rate limit reached for {decision.denied_scope}: {what}. "
            f"Retry after {retry_after(decision)}s.",
            type_="rate_limit_exceeded" if decision.denied_kind != "too_large" else "invalid_request_error",
            code="rate_limit_exceeded" if decision.denied_kind != "too_large" else "request_exceeds_limit",
            decision="throttled",
            headers=[("retry-after", retry_after(decision)), *ratelimit_headers(decision)],
        )

    # -- responses -------------------------------------------------------------------------

    def _on_response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        """Only when a config sends response headers (envoy/envoy.yaml skips them and passes the
        status as the `response.code` attribute with the first body chunk instead)."""
        acc = self.s.accounting
        if acc is None:
            return R.response_headers(skip_response_body=True)
        acc.status = _status(_headers(msg).get(":status"))
        if msg.end_of_stream:
            self.s.answered_last = True
            return R.response_headers(metadata=self._finish(complete=True))
        return R.response_headers()

    def _on_response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        acc = self.s.accounting
        msg = req.response_body
        if acc is None:
            return R.CONTINUE_RESPONSE_BODY
        if acc.status is None:
            acc.status = _response_code(req)
        acc.feed(msg.body)
        # the usage chunk the client did not ask for (we injected include_usage), after metering it
        body = self.s.usage_filter.filter(msg.body) if self.s.usage_filter is not None else None
        if not msg.end_of_stream:
            return R.CONTINUE_RESPONSE_BODY if body is None else R.response_body(body=body)
        self.s.answered_last = True
        return R.response_body(self._finish(complete=True), body=body)

    def observe(self, req: pb.ProcessingRequest) -> bool:
        """A message of an observability-mode stream (no reply is read). True: the response is over,
        and the caller must close the stream (or Envoy holds it for its deferred close timeout)."""
        s = self.s
        if s.accounting is None:
            if s.settled:
                return True
            fields = req.metadata_context.filter_metadata.get(NAMESPACE)
            if fields is not None and self.ctx.seal is not None and not self.ctx.seal.verify(fields.fields):
                log.warning("meter stream with unsealed or tampered admission metadata: ignored")
                fields = None
            s.accounting = ResponseAccounting.from_metadata(fields.fields) if fields is not None else None
            if s.accounting is None:  # refused or not metered: nothing to account for
                s.settled = True
                return True
            s.record = s.accounting.record
        acc = s.accounting
        which = req.WhichOneof("request")
        if which == "response_headers":
            acc.status = _status(_headers(req.response_headers).get(":status"))
            done = bool(req.response_headers.end_of_stream)
        elif which == "response_body":
            if acc.status is None:
                acc.status = _response_code(req)
            acc.feed(req.response_body.body)
            done = bool(req.response_body.end_of_stream)
        else:
            done = False
        if done:
            self._finish(complete=True)
        return done

    def _finish(self, *, complete: bool) -> dict[str, R.MetadataValue]:
        s = self.s
        if s.accounting is None or s.settled:
            return {}
        s.settled = True
        self.ctx.inflight.done(s.accounting.record.request_id)
        return s.accounting.finish(self.ctx.limiter, self.ctx.sink, self.ctx.telemetry, complete=complete)

    def close(self, *, graceful: bool = False) -> None:
        """The gRPC stream ended. Settle anything left open: a response that ended normally without
        a body (graceful) as complete, a cut stream at its estimate; give back a reservation whose
        request was abandoned before an answer; record requests that ended early."""
        s = self.s
        if s.settled:
            return
        if s.accounting is not None:
            if not s.response_elsewhere:
                self._finish(complete=graceful and s.accounting.meter.bytes_seen == 0)
            return
        if s.reserving and s.key is not None:  # cancelled while (or right after) reserving
            self.ctx.limiter.settle(s.key.tenant, s.request_id, 0)
        if s.record is not None and s.record.decision == "pending":
            s.settled = True
            s.record.decision = "aborted"  # e.g. the client went away, or Envoy refused the body itself
            self._emit()

    # -- refusals --------------------------------------------------------------------------

    def _bad_request(self, exc: BadRequest) -> pb.ProcessingResponse:
        return self._refuse(
            400, exc.message, type_="invalid_request_error", code="invalid_request", decision="bad_request",
            param=exc.param,
        )

    def _refuse(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str,
        decision: str,
        headers: list[tuple[str, str]] | None = None,
        param: str | None = None,
    ) -> pb.ProcessingResponse:
        s = self.s
        s.settled = True
        s.answered_last = True  # Envoy answers the client itself and sends nothing more
        if s.record is not None:
            s.record.decision = decision
            s.record.status = status
            self._emit()
        self.ctx.telemetry.refusal(s.key, decision)
        metadata: Mapping[str, R.MetadataValue] = {
            "request_id": s.request_id,
            "decision": decision,
            "policy_version": s.policy.version,
        }
        return R.immediate(
            status,
            error_body(message, type_=type_, code=code, param=param),
            headers=[(H_REQUEST_ID, s.request_id), *(headers or [])],
            details=f"tokenmeter_{decision}",
            metadata=metadata,
        )

    def _emit(self) -> None:
        rec = self.s.record
        if rec is None:
            return
        rec.duration_ms = round((time.time() - rec.time) * 1000, 3)
        self.ctx.sink.emit(rec)


_BODY_NONE = 0  # ProcessingMode.BodySendMode.NONE
_UNMETERED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _status(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _response_code(req: pb.ProcessingRequest) -> int | None:
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None or "response.code" not in attrs.fields:
        return None
    return int(attrs.fields["response.code"].number_value)


def _denial_text(decision: Decision) -> str:
    kind = decision.denied_kind or "limit"
    return {
        "tokens": "tokens per minute",
        "requests": "requests per window",
        "quota_tokens": "token quota for the billing period",
        "quota_requests": "request quota for the billing period",
        "too_large": "this single request needs more tokens than the whole limit",
        "pool": "no model pool has capacity",
    }.get(kind, kind)
