"""The usage record: its schema (tokenmeter.v1.UsageRecord) and the codec, its JSON Lines form read
backwards compatibly, and how settlement fills it (set_usage, Limit.strictest)."""

from __future__ import annotations

import dataclasses

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.metering.usage import Usage
from extproc.protos.tokenmeter.v1 import admission_pb2 as apb
from extproc.protos.tokenmeter.v1 import usage_record_pb2 as upb
from extproc.records.codec import record_from_proto, record_to_proto
from extproc.records.record import API_LABELS, Limit, UsageRecord
from extproc.settlement.outcome import Decision, Ending


def _full() -> UsageRecord:
    """Every field set to a value other than its default."""
    return UsageRecord(
        request_id="tm-01HZX4", time=1_767_225_600.125, decision=Decision.THROTTLED, policy_version="2026-11-27.1",
        tenant="acme", project="web", team="search", key_id="ci-bot", path="/v1/messages", model="claude-sonnet",
        response_model="claude-sonnet-2026", pool="h100", status=429, stream=True, reserved_tokens=4096,
        prompt_tokens=2600, completion_tokens=50, cached_tokens=500, reasoning_tokens=7, usage_source="reported",
        alerts=("tenant:acme", "project:acme/web"), degraded=True, ending=Ending.INCOMPLETE, duration_ms=12.345,
        api="anthropic_messages", cache_write_tokens=2000, time_to_first_token_ms=3.5, cost="0.0087",
        currency="USD", price_version="2026-11", price_missing=True,
        decided_by=Limit("key:ci-bot", "tokens", "throttle"), replica="tokenmeter-0",
    )


def test_every_field_is_set_by_the_fixture() -> None:
    defaults = UsageRecord("", 0.0, Decision.PENDING, "")
    full = _full()
    unset = [f.name for f in dataclasses.fields(UsageRecord)
             if f.name not in ("request_id", "time", "decision", "policy_version")
             and getattr(full, f.name) == getattr(defaults, f.name)]
    assert unset == []


def test_round_trip_of_every_field_through_the_proto() -> None:
    rec = _full()
    msg = record_to_proto(rec)
    data = msg.SerializeToString(deterministic=True)
    back = upb.UsageRecord.FromString(data)
    assert record_from_proto(back) == rec
    assert back.admission.api == apb.API_ANTHROPIC_MESSAGES
    assert back.admission.decision == apb.DECISION_THROTTLED
    assert back.ending == apb.ENDING_INCOMPLETE
    assert back.admission.admitted_at.ToNanoseconds() == 1_767_225_600_125_000_000
    assert back.duration.ToNanoseconds() == 12_345_000
    assert (back.cost, back.usage_source) == ("0.0087", upb.USAGE_SOURCE_REPORTED)


def test_every_record_field_is_in_the_schema() -> None:
    """The proto is the contract: a record field that no message field carries fails here."""
    facts = set(apb.AdmissionFacts.DESCRIPTOR.fields_by_name)
    record = set(upb.UsageRecord.DESCRIPTOR.fields_by_name)
    renamed = {"time": "admitted_at", "model": "requested_model", "duration_ms": "duration",
               "time_to_first_token_ms": "time_to_first_token"}
    missing = [f.name for f in dataclasses.fields(UsageRecord)
               if renamed.get(f.name, f.name) not in facts | record]
    assert missing == []


def test_unset_optionals_stay_unset() -> None:
    rec = UsageRecord("r1", 10.5, Decision.ADMITTED, "v")
    msg = record_to_proto(rec)
    assert not msg.HasField("status") and not msg.HasField("cost")
    assert not msg.HasField("time_to_first_token") and not msg.HasField("decided_by")
    assert record_from_proto(msg) == rec
    zero = dataclasses.replace(rec, status=0, cost="0", time_to_first_token_ms=0.0, decided_by=Limit("pool"))
    assert record_from_proto(record_to_proto(zero)) == zero  # 0 is not absent


def test_decisions_the_facts_enum_lacks_travel_in_the_ending() -> None:
    by_envoy = UsageRecord("envoy:1", 1.0, Decision.REFUSED_BY_ENVOY, "v", status=413, ending=Ending.REFUSED)
    msg = record_to_proto(by_envoy)
    assert (msg.admission.decision, msg.ending) == (apb.DECISION_UNSPECIFIED, apb.ENDING_REFUSED_BY_ENVOY)
    assert record_from_proto(msg) == by_envoy
    ungoverned = UsageRecord("envoy:2", 1.0, Decision.NOT_GOVERNED, "v", status=200)
    msg = record_to_proto(ungoverned)
    assert msg.ending == apb.ENDING_NOT_GOVERNED
    assert record_from_proto(msg) == ungoverned
    failed = UsageRecord("r", 1.0, Decision.ADMITTED, "v", status=503)
    msg = record_to_proto(failed)
    assert msg.ending == apb.ENDING_FAILED_UPSTREAM
    assert record_from_proto(msg) == failed


_names = st.one_of(st.none(), st.text(min_size=1, max_size=20))
_count = st.integers(min_value=0, max_value=2**40)
_ms = st.integers(min_value=0, max_value=10**10).map(lambda us: us / 1000)  # settle rounds to the microsecond
_BY_ENVOY = (Decision.REFUSED_BY_ENVOY, Decision.NOT_GOVERNED)
_PAIRS: list[tuple[Decision, Ending]] = [(d, e) for d in Decision if d not in _BY_ENVOY for e in Ending]
_PAIRS += [(Decision.REFUSED_BY_ENVOY, Ending.REFUSED), (Decision.NOT_GOVERNED, Ending.COMPLETED)]


@st.composite
def _records(draw: st.DrawFn) -> UsageRecord:
    decision, ending = draw(st.sampled_from(_PAIRS))
    return UsageRecord(
        request_id=draw(st.text(min_size=1, max_size=30)),
        # any float of a real unix time (its ulp is over 100 ns: exact to the nanosecond is exact)
        time=draw(st.one_of(st.just(0.0), st.floats(min_value=1e9, max_value=4e9))),
        decision=decision, ending=ending,
        policy_version=draw(st.text(max_size=10)),
        tenant=draw(_names), project=draw(_names), team=draw(_names), key_id=draw(_names), path=draw(_names),
        model=draw(_names), response_model=draw(_names), pool=draw(_names),
        status=draw(st.one_of(st.none(), st.integers(min_value=0, max_value=599))),
        stream=draw(st.booleans()), reserved_tokens=draw(_count), prompt_tokens=draw(_count),
        completion_tokens=draw(_count), cached_tokens=draw(_count), reasoning_tokens=draw(_count),
        usage_source=draw(st.sampled_from(["none", "reported", "estimated"])),
        alerts=tuple(draw(st.lists(st.text(min_size=1, max_size=10), max_size=3))),
        degraded=draw(st.booleans()), duration_ms=draw(_ms),
        api=draw(st.one_of(st.none(), st.sampled_from(sorted(API_LABELS.values())))),
        cache_write_tokens=draw(_count), time_to_first_token_ms=draw(st.one_of(st.none(), _ms)),
        cost=draw(st.one_of(st.none(), st.decimals(min_value=0, max_value=10**6, places=12).map(str))),
        currency=draw(st.one_of(st.none(), st.just("USD"))), price_version=draw(_names),
        price_missing=draw(st.booleans()),
        decided_by=draw(st.one_of(st.none(), st.builds(Limit, st.text(max_size=10), _names, _names))),
        replica=draw(_names),
    )


@settings(max_examples=300)
@given(_records())
def test_round_trip_of_arbitrary_records(rec: UsageRecord) -> None:
    data = record_to_proto(rec).SerializeToString(deterministic=True)
    assert record_from_proto(upb.UsageRecord.FromString(data)) == rec
    assert UsageRecord.from_json(rec.to_json()) == rec  # and through JSON Lines


# -- JSON Lines ---------------------------------------------------------------------------


def test_a_line_written_before_the_new_fields_still_loads() -> None:
    old = (b'{"request_id":"a1","time":1767225600.5,"decision":"alert","policy_version":"p1","tenant":"acme",'
           b'"project":"web","team":null,"key_id":"k","path":"/v1/chat/completions","model":"m",'
           b'"response_model":"m","pool":"h100","status":200,"stream":false,"reserved_tokens":100,'
           b'"prompt_tokens":10,"completion_tokens":5,"cached_tokens":0,"reasoning_tokens":0,'
           b'"usage_source":"reported","alerts":["tenant:acme"],"degraded":false,"ending":"completed",'
           b'"duration_ms":12.5}')
    rec = UsageRecord.from_json(old)
    assert (rec.decision, rec.alerts, rec.prompt_tokens) == (Decision.ALERT, ("tenant:acme",), 10)
    assert (rec.cost, rec.cache_write_tokens, rec.decided_by, rec.api, rec.replica) == (None, 0, None, None, None)
    # and the oldest: no ending either
    minimal = UsageRecord.from_json(b'{"request_id":"a","time":1,"decision":"throttled","policy_version":"p"}')
    assert minimal.ending is Ending.COMPLETED


def test_keys_a_newer_writer_added_are_ignored() -> None:
    data = orjson.loads(_full().to_json())
    data["carbon_grams"] = 1.5
    assert UsageRecord.from_json(orjson.dumps(data)) == _full()


def test_the_json_line_names_every_field() -> None:
    data = orjson.loads(_full().to_json())
    assert data["decided_by"] == {"scope": "key:ci-bot", "kind": "tokens", "action": "throttle"}
    assert data["cost"] == "0.0087" and data["cache_write_tokens"] == 2000
    assert set(data) == {f.name for f in dataclasses.fields(UsageRecord)}


# -- filling the record ---------------------------------------------------------------------


def test_set_usage_takes_every_kind() -> None:
    rec = UsageRecord("r", 0.0, Decision.ADMITTED, "v")
    rec.set_usage(Usage(2600, 50, cached_tokens=500, cache_creation_tokens=2000, reasoning_tokens=7))
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.cache_write_tokens,
            rec.reasoning_tokens, rec.usage_source) == (2600, 50, 500, 2000, 7, "reported")
    rec.set_usage(Usage(10, 0, estimated=True))
    assert (rec.cache_write_tokens, rec.usage_source) == (0, "estimated")
    rec.set_usage(Usage(0, 0))
    assert rec.usage_source == "none"


def test_the_strictest_scope_is_what_shadow_mode_would_have_done() -> None:
    actions = {"tenant:acme": "alert", "project:acme/web": "throttle", "key:k": "block"}
    assert Limit.strictest(("tenant:acme", "project:acme/web"), actions) == Limit("project:acme/web", None, "throttle")
    assert Limit.strictest(("project:acme/web", "key:k"), actions) == Limit("key:k", None, "block")
    assert Limit.strictest(("tenant:acme",), actions) is None  # would only have alerted
    assert Limit.strictest(("team:acme/web/x",), actions) == Limit("team:acme/web/x", None, "throttle")
    assert Limit.strictest((), actions) is None
