"""The project's own protobuf messages: the checked-in generated code, and the AdmissionFacts codec
for Envoy's dynamic metadata (extproc.protos.facts)."""

from __future__ import annotations

import ast
import base64
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from extproc.apis import api_by_id, api_for_path
from extproc.protos import facts as F
from extproc.protos.tokenmeter.v1 import admission_pb2 as pb
from extproc.service.metadata import STRIP_USAGE_KEY

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "extproc" / "protos" / "tokenmeter" / "v1" / "admission_pb2.py"


def _full() -> pb.AdmissionFacts:
    """Every field set to a value other than its default."""
    return pb.AdmissionFacts(
        request_id="tm-01HZX4",
        admitted_at=timestamp_pb2.Timestamp(seconds=1_767_225_600, nanos=123_456_789),
        policy_version="sha256:abc123",
        tenant="acme",
        project="web",
        team="search",
        key_id="ci-bot",
        api=pb.API_OPENAI_CHAT,
        path="/v1/chat/completions",
        requested_model="llama-3.1-8b",
        stream=True,
        pool="h100",
        reserved_tokens=4_096 + 2**40,
        prompt_estimate=1_234,
        decision=pb.DECISION_ADMITTED_ALERT,
        max_output_tokens=2_048,
        alerts=["tenant:acme", "project:acme/web"],
        degraded=True,
        usage_injected=True,
        shadow_scope="key:ci-bot",
        shadow_action="throttle",
        shadow_kind="quota_requests",
    )


def _struct(fields: dict[str, str | bool]) -> struct_pb2.Struct:
    """As Envoy hands the namespace back (the access log entry's filter_metadata["tokenmeter"]),
    with the rest of the processor's metadata beside the facts."""
    struct = struct_pb2.Struct()
    struct.update(fields)
    struct.update({"seal": "0" * 32, "rl_limit_tokens": "100000", "reserved_tokens": 7.0, "stream": True})
    return struct


def test_every_field_is_set_by_the_round_trip_fixture() -> None:
    facts = _full()
    for field in pb.AdmissionFacts.DESCRIPTOR.fields:
        if field.is_repeated:
            assert len(getattr(facts, field.name)) > 0, field.name
        else:
            assert facts.HasField(field.name) if field.has_presence else getattr(facts, field.name), field.name


def test_round_trip_of_every_field_through_the_struct() -> None:
    facts = _full()
    struct = _struct(F.facts_to_struct_fields(facts))
    wire = struct_pb2.Struct.FromString(struct.SerializeToString())  # as it crosses gRPC
    for metadata in (wire, wire.fields):
        back = F.facts_from_struct(metadata)
        assert back == facts
        assert back is not None
        for field in pb.AdmissionFacts.DESCRIPTOR.fields:
            assert getattr(back, field.name) == getattr(facts, field.name), field.name


def test_plain_fields_for_envoy() -> None:
    fields = F.facts_to_struct_fields(_full())
    assert set(fields) == {*F.PLAIN_FIELDS, F.FACTS_KEY, STRIP_USAGE_KEY}
    assert {k: v for k, v in fields.items() if k != F.FACTS_KEY} == {
        STRIP_USAGE_KEY: True,  # usage_injected: the route that strips the usage event matches on it
        "request_id": "tm-01HZX4",
        "tenant": "acme",
        "project": "web",
        "team": "search",
        "key_id": "ci-bot",
        "pool": "h100",
        "policy_version": "sha256:abc123",
        "decision": "alert",
        "model": "llama-3.1-8b",
    }
    unset = F.facts_to_struct_fields(pb.AdmissionFacts(request_id="r", decision=pb.DECISION_ADMITTED))
    assert (unset["team"], unset["pool"], unset["decision"]) == ("", "", "admitted")
    assert STRIP_USAGE_KEY not in unset


def test_the_facts_field_carries_exactly_the_sealed_bytes() -> None:
    facts = _full()
    data = F.facts_bytes(facts)
    assert data == F.facts_bytes(pb.AdmissionFacts.FromString(data))  # stable
    fields = F.facts_to_struct_fields(facts)
    assert base64.b64decode(str(fields[F.FACTS_KEY])) == data
    assert F.facts_payload(_struct(fields)) == data
    assert F.parse_facts(data) == facts


def test_max_output_tokens_keeps_an_explicit_zero_apart_from_absent() -> None:
    def through_metadata(facts: pb.AdmissionFacts) -> pb.AdmissionFacts | None:
        return F.facts_from_struct(_struct(F.facts_to_struct_fields(facts)))

    zero = through_metadata(pb.AdmissionFacts(request_id="r", max_output_tokens=0))
    absent = through_metadata(pb.AdmissionFacts(request_id="r"))
    assert zero is not None and absent is not None
    assert zero.HasField("max_output_tokens") and zero.max_output_tokens == 0
    assert not absent.HasField("max_output_tokens")


@pytest.mark.parametrize(
    "value",
    [
        None,  # no facts field: the old loose fields only
        struct_pb2.Value(number_value=1.0),  # not a string
        struct_pb2.Value(string_value=""),
        struct_pb2.Value(string_value="not base64!"),
        struct_pb2.Value(string_value="é"),
        struct_pb2.Value(string_value=base64.b64encode(b"\xff\xff\xff").decode()),  # not a message
    ],
)
def test_missing_or_malformed_facts_decode_to_none(value: struct_pb2.Value | None) -> None:
    struct = _struct({"tenant": "acme", "request_id": "r"})
    if value is not None:
        struct.fields[F.FACTS_KEY].CopyFrom(value)
    assert F.facts_from_struct(struct) is None


@given(
    text=st.text(max_size=40),
    number=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    alerts=st.lists(st.text(max_size=20), max_size=4),
    flag=st.booleans(),
    decision=st.sampled_from(pb.Decision.values()),
    api=st.sampled_from(pb.Api.values()),
)
def test_round_trip_of_arbitrary_values(
    text: str, number: int, alerts: list[str], flag: bool, decision: int, api: int
) -> None:
    facts = pb.AdmissionFacts(
        request_id=text, tenant=text, project=text, team=text, key_id=text, path=text, pool=text,
        policy_version=text, requested_model=text, reserved_tokens=number, prompt_estimate=number,
        max_output_tokens=number, alerts=alerts, stream=flag, degraded=flag, usage_injected=flag,
        decision=pb.Decision.Name(decision), api=pb.Api.Name(api),
    )
    facts.admitted_at.FromNanoseconds(abs(number) % 2**62)
    assert F.facts_from_struct(_struct(F.facts_to_struct_fields(facts))) == facts


def test_decision_labels() -> None:
    assert F.decision_label(pb.DECISION_ADMITTED) == "admitted"  # degraded is a flag, never a suffix
    assert F.decision_value("shadow") == pb.DECISION_ADMITTED_SHADOW
    assert F.decision_value("nonsense") == pb.DECISION_UNSPECIFIED
    assert F.decision_label(pb.DECISION_THROTTLED) == "throttled"
    assert F.decision_label(pb.DECISION_REFUSED_UNAUTHENTICATED) == "refused"
    assert F.decision_label(pb.DECISION_UNSPECIFIED) == "pending"
    assert len({F.decision_label(pb.Decision.Value(name)) for name in pb.Decision.keys()}) == len(pb.Decision.keys())
    from extproc.settlement.outcome import Decision

    for name in pb.Decision.keys():  # every proto Decision is one of the record's
        Decision(F.decision_label(pb.Decision.Value(name)))


def test_the_api_of_a_path_is_its_admission_facts_value() -> None:
    """AdmissionFacts.api is the `ApiSchema.api` of the request's path (extproc.apis)."""
    expected = {
        "/v1/chat/completions?x=1": pb.API_OPENAI_CHAT,
        "/V1//%63hat/completions/": pb.API_OPENAI_CHAT,
        "/v1/completions": pb.API_OPENAI_COMPLETIONS,
        "/v1/embeddings": pb.API_OPENAI_EMBEDDINGS,
        "/v1/responses": pb.API_OPENAI_RESPONSES,
        "/v1/messages": pb.API_ANTHROPIC_MESSAGES,
    }
    for path, value in expected.items():
        api = api_for_path(path)
        assert api is not None and api.api == value, path
        assert api_by_id(value) is api
    assert api_for_path("/v1/models") is None
    assert api_by_id(pb.API_UNSPECIFIED) is None


def test_messages_live_in_their_python_package() -> None:
    """codegen qualifies protoc's module name: the classes pickle (multiprocessing, caches)."""
    assert pb.AdmissionFacts.__module__ == "extproc.protos.tokenmeter.v1.admission_pb2"
    facts = _full()
    assert pickle.loads(pickle.dumps(facts)) == facts
    assert pb.AdmissionFacts.DESCRIPTOR.full_name == "tokenmeter.v1.AdmissionFacts"
    assert pb.DESCRIPTOR.name == "tokenmeter/v1/admission.proto"


def test_generated_code_imports_only_the_protobuf_runtime() -> None:
    tree = ast.parse(GENERATED.read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert modules and all(m.startswith("google.protobuf") for m in modules), modules


# -- codegen ----------------------------------------------------------------------------------


def _codegen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc.protos.codegen", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def test_checked_in_code_is_up_to_date() -> None:
    result = _codegen("--check")
    assert result.returncode == 0, result.stderr


def test_check_detects_a_changed_proto(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    source = protos / "tokenmeter" / "v1" / "admission.proto"
    text = source.read_text()
    assert text.rstrip().endswith("}")
    source.write_text(text.rstrip()[:-1] + "  string added_later = 99;\n}\n")
    result = _codegen("--check", "--proto-dir", str(protos))
    assert result.returncode == 1
    assert "differs: tokenmeter/v1/admission_pb2.py" in result.stderr
    assert "differs: tokenmeter/v1/admission_pb2.pyi" in result.stderr


def test_check_detects_a_new_proto_and_codegen_writes_it(tmp_path: Path) -> None:
    """A second .proto importing the first: its module imports ours by the package path."""
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    (protos / "tokenmeter" / "v1" / "usage.proto").write_text(
        'syntax = "proto3";\npackage tokenmeter.v1;\nimport "tokenmeter/v1/admission.proto";\n'
        "message UsageSample {\n  AdmissionFacts admission = 1;\n  Ending ending = 2;\n}\n"
    )
    result = _codegen("--check", "--proto-dir", str(protos))
    assert result.returncode == 1
    assert "missing: tokenmeter/v1/usage_pb2.py" in result.stderr

    out = tmp_path / "out"
    shutil.copytree(ROOT / "extproc" / "protos", out)
    assert _codegen("--proto-dir", str(protos), "--out-dir", str(out)).returncode == 0
    usage = (out / "tokenmeter" / "v1" / "usage_pb2.py").read_text()
    assert "from extproc.protos.tokenmeter.v1 import admission_pb2" in usage
    assert "'extproc.protos.tokenmeter.v1.usage_pb2'" in usage
    assert "from extproc.protos.tokenmeter.v1 import admission_pb2" in (out / "tokenmeter/v1/usage_pb2.pyi").read_text()
    assert _codegen("--check", "--proto-dir", str(protos), "--out-dir", str(out)).returncode == 0

    # and a generated module whose .proto is gone is reported, then deleted
    result = _codegen("--check", "--out-dir", str(out))
    assert result.returncode == 1 and "no source: tokenmeter/v1/usage_pb2.py" in result.stderr
    assert _codegen("--out-dir", str(out)).returncode == 0
    assert not (out / "tokenmeter" / "v1" / "usage_pb2.py").exists()
