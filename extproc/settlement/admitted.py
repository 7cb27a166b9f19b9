"""An admitted request's facts: written into Envoy's metadata at admission, read back (by any
replica) from Envoy's access log entry when the request ends, and ended there (extproc.settlement.
settle). The facts travel as this project's message, tokenmeter.v1.AdmissionFacts (protos/), whose
exact bytes the seal covers; a few plain copies ride along for Envoy's own readers (routes, access
log formatters), never for settlement.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import struct_pb2

from extproc.apis import ApiSchema, api_by_id
from extproc.protos import facts as codec
from extproc.protos.tokenmeter.v1 import admission_pb2 as pb
from extproc.records.codec import record_from_facts
from extproc.records.record import UsageRecord
from extproc.service.seal import SEAL_KEY, Seal
from extproc.settlement.outcome import Decision

MetadataValue = str | float | bool


class Admitted:
    """One admitted request, as far as its settlement needs it."""

    # Kept per in-flight request until it ends (extproc.service.inflight): no __dict__.
    __slots__ = ("api", "prompt_estimate", "record")

    def __init__(self, record: UsageRecord, *, api: ApiSchema, prompt_estimate: int) -> None:
        self.record = record
        self.api = api
        self.prompt_estimate = prompt_estimate

    def facts(self, *, usage_injected: bool = False) -> pb.AdmissionFacts:
        r = self.record
        facts = pb.AdmissionFacts(
            request_id=r.request_id, policy_version=r.policy_version, tenant=r.tenant or "",
            project=r.project or "", team=r.team or "", key_id=r.key_id or "", api=self.api.api,
            path=r.path or "", requested_model=r.model or "", stream=r.stream, pool=r.pool or "",
            reserved_tokens=r.reserved_tokens, prompt_estimate=self.prompt_estimate,
            decision=codec.decision_value(r.decision),  # type: ignore[arg-type]
            alerts=r.alerts, degraded=r.degraded, usage_injected=usage_injected,
        )
        if r.decided_by is not None:  # shadow: what enforce mode would have done
            facts.shadow_scope, facts.shadow_action = r.decided_by.scope, r.decided_by.action or ""
            facts.shadow_kind = r.decided_by.kind or ""
        facts.admitted_at.FromNanoseconds(int(r.time * 1e9))
        return facts

    def to_metadata(self, seal: Seal | None, *, usage_injected: bool = False) -> dict[str, MetadataValue]:
        facts = self.facts(usage_injected=usage_injected)
        fields: dict[str, MetadataValue] = dict(codec.facts_to_struct_fields(facts))
        if seal is not None:
            fields[SEAL_KEY] = seal.sign(codec.facts_bytes(facts))
        return fields

    @classmethod
    def from_metadata(cls, fields: Mapping[str, struct_pb2.Value], seal: Seal | None) -> Admitted | None:
        """The admission of an access log entry's metadata; None when there is none (a refusal, an
        unmetered request) or, with a seal, when the seal does not hold over the facts' bytes."""
        data = codec.facts_payload(fields)
        if data is None:
            return None
        if seal is not None:
            given = fields.get(SEAL_KEY)
            if given is None or not seal.verify(data, given.string_value):
                raise Unsealed
        facts = codec.parse_facts(data)
        if facts is None or not facts.request_id:
            return None
        return cls.from_facts(facts)

    @classmethod
    def from_facts(cls, f: pb.AdmissionFacts) -> Admitted | None:
        api = api_by_id(f.api)
        if api is None:  # an admission always names its API: not facts this processor wrote
            return None
        record = record_from_facts(f, Decision(codec.decision_label(f.decision)))
        return cls(record, api=api, prompt_estimate=f.prompt_estimate)


class Unsealed(Exception):
    """Admission facts whose seal does not hold: not settled."""
