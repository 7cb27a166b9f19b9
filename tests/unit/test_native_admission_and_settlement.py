"""envoy/envoy-native.yaml at the protocol level: the request body alone admits (credentials and
path as attributes), and Envoy's access log entry settles and records the request."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as alog
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.apis.anthropic_messages import API as ANTHROPIC
from extproc.apis.openai_chat import API as CHAT_API
from extproc.apis.openai_embeddings import API as EMBEDDINGS
from extproc.apis.openai_responses import API as RESPONSES
from extproc.limiter.types import Decision, Reservation
from extproc.policy import load_policy
from extproc.protos.facts import facts_from_struct
from extproc.service.access_log import AccessLogReceiver, settle_entry
from extproc.service.metadata import NAMESPACE, SETTLE_LOG_NAME, USAGE_NAMESPACE
from extproc.service.processor import Context, FixedPolicy, StreamProcessor
from tests.unit.recorders import ListSink

POLICY = Path(__file__).parents[1] / "e2e" / "policy.yaml"
ATTRS = "envoy.filters.http.ext_proc"


class RecordingLimiter:
    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.reserved: list[Reservation] = []
        self.settled: list[tuple[str, str, int]] = []

    async def reserve(self, r: Reservation) -> Decision:
        self.reserved.append(r)
        if self.allow:
            return Decision(allowed=True, pool="h100")
        return Decision(allowed=False, denied_scope="key:e2e-basic", denied_kind="tokens", retry_after_seconds=2.0)

    def settle(self, tenant: str, request_id: str, actual_tokens: int, output_tokens: int | None = None) -> None:
        self.settled.append((tenant, request_id, actual_tokens))

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


def _context(allow: bool = True) -> tuple[Context, RecordingLimiter, ListSink]:
    limiter, sink = RecordingLimiter(allow), ListSink()
    return Context(FixedPolicy(load_policy(POLICY)), limiter, sink), limiter, sink


def body_only(body: dict[str, object], *, path: str = "/v1/chat/completions",
              key: str | None = "e2e-basic-key", header: str = "authorization",
              envoy_id: str = "envoy-1") -> pb.ProcessingRequest:
    """What Envoy sends with envoy-native.yaml: the buffered body, headers as CEL attributes."""
    req = pb.ProcessingRequest(request_body=pb.HttpBody(body=orjson.dumps(body), end_of_stream=True))
    attrs = req.attributes[ATTRS]
    attrs.update({"request.path": path, "request.method": "POST", "request.id": envoy_id})
    if key is not None:
        attrs.update({f"request.headers['{header}']": f"Bearer {key}" if header == "authorization" else key})
    req.protocol_config.request_body_mode = ProcessingMode.BUFFERED
    req.protocol_config.response_body_mode = ProcessingMode.NONE
    return req


CHAT = {"model": "llama-test", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def access_log_entry(admission: pb.ProcessingResponse, *, status: int = 200, usage: dict[str, object] | None = None,
                     body_bytes: int = 300, cut: bool = False) -> alog.HTTPAccessLogEntry:
    entry = alog.HTTPAccessLogEntry()
    entry.request.request_id = "envoy-1"
    md = entry.common_properties.metadata.filter_metadata
    md[NAMESPACE].CopyFrom(admission.dynamic_metadata.fields[NAMESPACE].struct_value)
    if usage is not None:
        md[USAGE_NAMESPACE].update(usage)
    entry.response.response_code.value = status
    entry.response.response_body_bytes = body_bytes
    entry.common_properties.response_flags.upstream_connection_termination = cut
    entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(12)
    return entry


async def test_the_body_alone_admits_with_attribution_in_metadata_and_ends_the_exchange() -> None:
    ctx, limiter, sink = _context()
    proc = StreamProcessor(ctx)
    resp = await proc.handle(body_only(CHAT))
    assert resp.WhichOneof("response") == "request_body"
    md = resp.dynamic_metadata.fields[NAMESPACE].struct_value
    assert (md["tenant"], md["key_id"], md["pool"], md["decision"]) == ("acme", "e2e-basic", "h100", "admitted")
    facts = facts_from_struct(md)  # the admission facts: this project's message (protos/), one field
    assert facts is not None and facts.reserved_tokens == limiter.reserved[0].tokens > 0
    assert (facts.tenant, facts.key_id, facts.request_id) == ("acme", "e2e-basic", md["request_id"])
    # Envoy ignores header mutations without a headers phase (the route sets attribution instead),
    # but re-routes on the processor's metadata only after a reply that carries one: an empty one.
    mutation = resp.request_body.response.header_mutation
    assert resp.request_body.response.HasField("header_mutation") and not mutation.set_headers
    assert proc.exchange_over
    proc.close(graceful=True)
    assert limiter.settled == [] and sink.records == []  # the access log entry settles it


async def test_an_x_api_key_attribute_identifies_the_caller_too() -> None:
    ctx, _limiter, _ = _context()
    resp = await StreamProcessor(ctx).handle(body_only(CHAT, header="x-api-key"))
    assert resp.dynamic_metadata.fields[NAMESPACE].struct_value["tenant"] == "acme"


async def test_a_body_without_credentials_gets_401_and_no_reservation() -> None:
    ctx, limiter, sink = _context()
    resp = await StreamProcessor(ctx).handle(body_only(CHAT, key=None))
    assert resp.immediate_response.status.code == 401
    assert limiter.reserved == []
    assert [r.decision for r in sink.records] == ["refused"]


async def test_an_unmetered_post_path_is_refused_from_the_body_alone() -> None:
    ctx, limiter, _ = _context()
    resp = await StreamProcessor(ctx).handle(body_only({"query": "q"}, path="/v1/rerank"))
    assert resp.immediate_response.status.code == 404
    assert limiter.reserved == []


async def test_over_the_limit_the_body_alone_gets_429_with_retry_after() -> None:
    ctx, _, sink = _context(allow=False)
    resp = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert resp.immediate_response.status.code == 429
    headers = {h.header.key: h.header.raw_value.decode() for h in resp.immediate_response.headers.set_headers}
    assert headers["retry-after"] == "2"
    assert [r.decision for r in sink.records] == ["throttled"]


async def test_a_stream_request_gets_include_usage_injected_in_the_body() -> None:
    ctx, _, _ = _context()
    resp = await StreamProcessor(ctx).handle(body_only({**CHAT, "stream": True}))
    sent = orjson.loads(resp.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}


async def test_the_access_log_entry_settles_reported_usage_and_writes_the_record() -> None:
    ctx, limiter, sink = _context()
    proc = StreamProcessor(ctx)
    admission = await proc.handle(body_only(CHAT))
    request_id = admission.dynamic_metadata.fields[NAMESPACE].struct_value["request_id"]
    entry = access_log_entry(admission, usage={"prompt_tokens": 9, "completion_tokens": 7, "response_model": "m-1"})
    assert settle_entry(ctx, entry)
    assert limiter.settled == [("acme", request_id, 16)]
    (rec,) = sink.records
    assert (rec.request_id, rec.tenant, rec.key_id, rec.pool, rec.model) == (
        request_id, "acme", "e2e-basic", "h100", "llama-test")
    assert (rec.status, rec.prompt_tokens, rec.completion_tokens, rec.usage_source) == (200, 9, 7, "reported")
    assert (rec.response_model, rec.decision, rec.duration_ms) == ("m-1", "admitted", 12.0)


async def test_a_cut_stream_without_usage_stays_charged_at_its_reservation() -> None:
    ctx, limiter, sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only({**CHAT, "stream": True}))
    reserved = limiter.reserved[0].tokens
    assert settle_entry(ctx, access_log_entry(admission, usage=None, cut=True))
    assert limiter.settled[0][2] == reserved
    assert ((sink.records[0].decision, sink.records[0].ending), sink.records[0].usage_source) == (
        ("admitted", "incomplete"), "estimated")


async def test_an_upstream_error_without_usage_is_charged_nothing() -> None:
    ctx, limiter, sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert settle_entry(ctx, access_log_entry(admission, status=503, usage=None, body_bytes=40))
    assert limiter.settled[0][2] == 0
    assert (sink.records[0].status, sink.records[0].usage_source) == (503, "none")


async def test_a_complete_body_without_usage_is_estimated_within_the_reservation() -> None:
    ctx, limiter, sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT))
    reserved = limiter.reserved[0].tokens
    assert settle_entry(ctx, access_log_entry(admission, usage=None, body_bytes=8))
    charged = limiter.settled[0][2]
    assert 0 < charged <= reserved
    assert sink.records[0].usage_source == "estimated"


async def test_entries_of_refused_requests_settle_nothing_and_add_no_record() -> None:
    ctx, limiter, sink = _context()
    refused = await StreamProcessor(ctx).handle(body_only(CHAT, key=None))
    assert not settle_entry(ctx, access_log_entry(refused))
    assert limiter.settled == [] and len(sink.records) == 1  # only the refusal's own record


def test_a_request_envoy_answered_itself_gets_an_unattributed_record() -> None:
    ctx, limiter, sink = _context()
    entry = alog.HTTPAccessLogEntry()  # no tokenmeter metadata: the processor never saw it
    entry.request.path = "/v1/chat/completions?x=1"
    entry.request.request_id = "envoy-rid-1"
    entry.response.response_code.value = 400
    assert settle_entry(ctx, entry)  # recorded here
    (rec,) = sink.records
    assert (rec.request_id, rec.decision, rec.status, rec.path, rec.tenant) == (
        "envoy:envoy-rid-1", "refused_by_envoy", 400, "/v1/chat/completions", None)
    assert limiter.settled == []


async def test_only_the_settle_log_settles_and_a_bad_entry_does_not_drop_the_batch() -> None:
    ctx, limiter, _sink = _context()
    first = await StreamProcessor(ctx).handle(body_only(CHAT))
    second = await StreamProcessor(ctx).handle(body_only(CHAT))
    bad = access_log_entry(first)
    bad.common_properties.metadata.filter_metadata[NAMESPACE].fields["reserved_tokens"].CopyFrom(
        struct_pb2.Value(string_value="not a number"))

    def batch(log_name: str | None, *entries: alog.HTTPAccessLogEntry) -> als.StreamAccessLogsMessage:
        msg = als.StreamAccessLogsMessage()
        if log_name is not None:
            msg.identifier.log_name = log_name
        msg.http_logs.log_entry.extend(entries)
        return msg

    async def stream(*msgs: als.StreamAccessLogsMessage):  # type: ignore[no-untyped-def]
        for m in msgs:
            yield m

    receiver = AccessLogReceiver(ctx)
    await receiver.StreamAccessLogs(stream(batch("someone.else", access_log_entry(first))), None)
    assert limiter.settled == []
    await receiver.StreamAccessLogs(
        stream(batch(SETTLE_LOG_NAME, bad), batch(None, access_log_entry(second, usage={"prompt_tokens": 1,
                                                                                      "completion_tokens": 2}))),
        None,
    )
    assert [s[2] for s in limiter.settled][-1] == 3
    assert receiver.settled >= 1


def test_reported_usage_is_read_back_per_api() -> None:
    openai = CHAT_API.usage_from_envoy({"prompt_tokens": 10.0, "completion_tokens": 5.0, "cached_tokens": 4.0})
    assert openai is not None and (openai.prompt_tokens, openai.completion_tokens, openai.cached_tokens) == (10, 5, 4)
    # Anthropic: cache reads and writes are on top of input_tokens (as when the processor parses).
    anthropic = ANTHROPIC.usage_from_envoy({"input_tokens": 3.0, "output_tokens": 8.0, "cache_read_input_tokens": 20.0,
                                            "cache_creation_input_tokens": 2.0})
    assert anthropic is not None and (anthropic.prompt_tokens, anthropic.completion_tokens) == (25, 8)
    assert anthropic.cached_tokens == 20
    responses = RESPONSES.usage_from_envoy({"input_tokens": 6.0, "output_tokens": 2.0, "output_reasoning_tokens": 1.0})
    assert responses is not None and (responses.prompt_tokens, responses.reasoning_tokens) == (6, 1)
    embeddings = EMBEDDINGS.usage_from_envoy({"prompt_tokens": 7.0, "total_tokens": 7.0})
    assert embeddings is not None and embeddings.completion_tokens == 0
    # Half a report (a stream cut after message_start) is no report.
    assert ANTHROPIC.usage_from_envoy({"input_tokens": 3.0}) is None
    assert CHAT_API.usage_from_envoy({"response_model": "x"}) is None
    assert CHAT_API.usage_from_envoy({"prompt_tokens": -1.0, "completion_tokens": 2.0}) is None


async def test_a_request_is_in_flight_from_admission_until_its_access_log_entry() -> None:
    ctx, _, _ = _context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert len(ctx.inflight) == 1  # a draining processor waits for it
    settle_entry(ctx, access_log_entry(admission, usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert len(ctx.inflight) == 0


def test_in_flight_entries_are_forgotten_by_age_and_by_count() -> None:
    from extproc.service.inflight import Inflight

    now = [0.0]
    table: Inflight[int] = Inflight(max_age_s=10, max_entries=3, clock=lambda: now[0])
    for i in range(3):
        table.add(f"r{i}", i)
    table.add("r3", 3)  # over the count: the oldest goes
    assert len(table) == 3
    table.done("r1")
    assert len(table) == 2
    now[0] = 11.0
    table.add("r4", 4)  # r2 and r3 are past their age
    assert table.take_all() == [4] and len(table) == 0


async def test_a_response_envoy_replaced_after_the_model_answered_stays_charged() -> None:
    # e.g. a JSON response larger than json_to_metadata's buffer: Envoy answers 500 itself
    ctx, limiter, sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT))
    reserved = limiter.reserved[0].tokens
    entry = access_log_entry(admission, status=500, usage=None, body_bytes=21)
    entry.response.response_code_details = "response_payload_too_large"
    entry.common_properties.time_to_first_upstream_rx_byte.FromMilliseconds(40)
    assert settle_entry(ctx, entry)
    assert limiter.settled[0][2] == reserved
    assert ((sink.records[0].decision, sink.records[0].ending), sink.records[0].usage_source) == (
        ("admitted", "incomplete"), "estimated")


class _StoppedServer:
    def __init__(self) -> None:
        self.stops: list[float] = []

    async def stop(self, grace: float) -> None:
        self.stops.append(grace)


async def test_a_lone_processor_leaves_what_is_still_open_at_the_end_of_its_grace_to_its_real_end() -> None:
    # Recording it at its reservation would record it twice once its access log entry reaches the
    # next processor (or ledger recovery reads it from Envoy's file access log).
    from extproc.service.server import ExternalProcessor, _drain

    ctx, limiter, sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only({**CHAT, "stream": True}))
    server = _StoppedServer()
    await _drain(server, ExternalProcessor(ctx), 0.2, replicas=1)
    assert server.stops and limiter.settled == [] and sink.records == []
    restarted, limiter2, sink2 = _context()  # the next processor gets the entry, and ends it once
    assert settle_entry(restarted, access_log_entry(admission, usage={"prompt_tokens": 3, "completion_tokens": 4}))
    assert [(r.ending, r.completion_tokens) for r in sink2.records] == [("completed", 4)]
    assert [s[2] for s in limiter2.settled] == [7]  # charged what it used, once


async def test_one_of_several_replicas_does_not_wait_for_entries_that_may_go_elsewhere() -> None:
    import time

    from extproc.service.server import HEALTH_NOTICE_S, ExternalProcessor, _drain

    ctx, limiter, sink = _context()
    await StreamProcessor(ctx).handle(body_only(CHAT))
    started = time.monotonic()
    await _drain(_StoppedServer(), ExternalProcessor(ctx), 5.0, replicas=2)
    assert time.monotonic() - started < 1.0 + HEALTH_NOTICE_S  # its health notice, not its grace
    assert limiter.settled == [] and sink.records == []  # another replica's access log settles it


async def test_an_admission_whose_reply_envoy_never_applied_gives_the_reservation_back() -> None:
    # Envoy timed out the reply (or the client left while it was on the wire): the access log entry
    # has none of our metadata, and no route sent the request to a model server.
    ctx, limiter, sink = _context()
    await StreamProcessor(ctx).handle(body_only(CHAT, envoy_id="envoy-lost"))
    entry = alog.HTTPAccessLogEntry()
    entry.request.request_id = "envoy-lost"
    entry.response.response_code.value = 504
    entry.response.response_code_details = "ext_proc_error_gRPC_error_4"  # Envoy's ext_proc call failed
    assert settle_entry(ctx, entry)  # recorded here, as aborted
    assert [s[2] for s in limiter.settled] == [0]
    assert [(r.ending, r.status, r.tenant) for r in sink.records] == [("aborted", 504, "acme")]
    assert len(ctx.inflight) == 0 and len(ctx.by_envoy_id) == 0


async def test_a_client_reusing_a_request_id_cannot_get_another_request_refunded() -> None:
    # x-request-id is the client's when it sends one: a body-less POST (Envoy answers it without
    # the processor) carrying the id of an admitted, still running request of the same client.
    ctx, limiter, _sink = _context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT, envoy_id="chosen-id"))
    reserved = limiter.reserved[0].tokens
    decoy = alog.HTTPAccessLogEntry()
    decoy.request.request_id = "chosen-id"
    decoy.response.response_code.value = 400
    decoy.response.response_code_details = "direct_response"
    settle_entry(ctx, decoy)
    real = access_log_entry(admission, usage={"prompt_tokens": 1, "completion_tokens": 1})
    real.request.request_id = "chosen-id"
    settle_entry(ctx, real)
    # the first settlement of a request id wins (the limiter's settle is idempotent): the reservation
    assert limiter.settled[0][2] == reserved


async def test_a_client_gone_while_reserving_gets_one_record_not_two() -> None:
    import asyncio

    from tests.unit.test_processor_close import HangingLimiter

    limiter, sink = HangingLimiter(), ListSink()
    ctx = Context(FixedPolicy(load_policy(POLICY)), limiter, sink)
    proc = StreamProcessor(ctx)
    task = asyncio.create_task(proc.handle(body_only(CHAT, envoy_id="envoy-gone")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proc.close(graceful=False)
    entry = alog.HTTPAccessLogEntry()  # Envoy's entry: 499-like, none of our metadata
    entry.request.request_id = "envoy-gone"
    assert not settle_entry(ctx, entry)
    assert [(r.decision, r.ending) for r in sink.records] == [("pending", "aborted")]


async def test_with_a_settle_secret_an_entry_without_metadata_never_refunds() -> None:
    # Such an entry carries no seal: anyone who can reach the processor's port could have sent it.
    ctx, limiter, sink = _sealed_context()
    await StreamProcessor(ctx).handle(body_only(CHAT, envoy_id="envoy-lost"))
    entry = alog.HTTPAccessLogEntry()
    entry.request.request_id = "envoy-lost"
    entry.response.response_code.value = 504
    entry.response.response_code_details = "ext_proc_error_gRPC_error_4"
    assert settle_entry(ctx, entry)  # recorded here, as aborted
    assert [s[2] for s in limiter.settled] == [limiter.reserved[0].tokens]  # stays charged
    assert [(r.decision, r.ending) for r in sink.records] == [("admitted", "aborted")]


def _sealed_context() -> tuple[Context, RecordingLimiter, ListSink]:
    from extproc.service.seal import Seal

    limiter, sink = RecordingLimiter(), ListSink()
    ctx = Context(FixedPolicy(load_policy(POLICY)), limiter, sink, seal=Seal(b"0123456789abcdef-shared"))
    return ctx, limiter, sink


async def test_with_a_settle_secret_a_sealed_entry_settles_and_a_tampered_one_does_not() -> None:
    ctx, limiter, sink = _sealed_context()
    admission = await StreamProcessor(ctx).handle(body_only(CHAT))
    assert admission.dynamic_metadata.fields[NAMESPACE].struct_value["seal"]
    assert settle_entry(ctx, access_log_entry(admission, usage={"prompt_tokens": 2, "completion_tokens": 3}))
    assert limiter.settled[-1][2] == 5

    second = await StreamProcessor(ctx).handle(body_only(CHAT, envoy_id="envoy-2"))
    tampered = access_log_entry(second, usage={"prompt_tokens": 0, "completion_tokens": 0})
    md = tampered.common_properties.metadata.filter_metadata[NAMESPACE].fields
    facts = facts_from_struct(md)
    assert facts is not None
    facts.tenant = "globex"  # charge someone else
    md["facts"].string_value = base64.b64encode(facts.SerializeToString()).decode()
    assert not settle_entry(ctx, tampered)
    made_up = access_log_entry(second)
    del made_up.common_properties.metadata.filter_metadata[NAMESPACE].fields["seal"]
    assert not settle_entry(ctx, made_up)
    assert len(limiter.settled) == 1 and len(sink.records) == 1
    # the plain copies are for Envoy's readers only: editing them changes nothing that is settled
    plain = access_log_entry(second, usage={"prompt_tokens": 1, "completion_tokens": 1})
    plain.common_properties.metadata.filter_metadata[NAMESPACE].fields["tenant"].string_value = "globex"
    assert settle_entry(ctx, plain)
    assert limiter.settled[-1][0] == "acme" and sink.records[-1].tenant == "acme"


def test_a_settle_secret_must_not_be_trivially_short() -> None:
    from extproc.service.seal import Seal

    with pytest.raises(ValueError):
        Seal(b"short")
