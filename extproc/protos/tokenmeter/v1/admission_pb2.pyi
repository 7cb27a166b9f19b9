# ruff: noqa
# mypy: disallow-any-generics=false
import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Api(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_UNSPECIFIED: _ClassVar[Api]
    API_OPENAI_CHAT: _ClassVar[Api]
    API_OPENAI_COMPLETIONS: _ClassVar[Api]
    API_OPENAI_EMBEDDINGS: _ClassVar[Api]
    API_OPENAI_RESPONSES: _ClassVar[Api]
    API_ANTHROPIC_MESSAGES: _ClassVar[Api]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ADMITTED: _ClassVar[Decision]
    DECISION_ADMITTED_ALERT: _ClassVar[Decision]
    DECISION_ADMITTED_SHADOW: _ClassVar[Decision]
    DECISION_THROTTLED: _ClassVar[Decision]
    DECISION_BLOCKED: _ClassVar[Decision]
    DECISION_REFUSED_UNAUTHENTICATED: _ClassVar[Decision]
    DECISION_REFUSED_BAD_REQUEST: _ClassVar[Decision]
    DECISION_REFUSED_TOO_LARGE: _ClassVar[Decision]
    DECISION_REFUSED_UNSUPPORTED: _ClassVar[Decision]
    DECISION_REFUSED_BACKEND: _ClassVar[Decision]

class Ending(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDING_UNSPECIFIED: _ClassVar[Ending]
    ENDING_COMPLETED: _ClassVar[Ending]
    ENDING_REFUSED: _ClassVar[Ending]
    ENDING_INCOMPLETE: _ClassVar[Ending]
    ENDING_ABORTED: _ClassVar[Ending]
    ENDING_FAILED_UPSTREAM: _ClassVar[Ending]
    ENDING_REFUSED_BY_ENVOY: _ClassVar[Ending]
    ENDING_NOT_GOVERNED: _ClassVar[Ending]
API_UNSPECIFIED: Api
API_OPENAI_CHAT: Api
API_OPENAI_COMPLETIONS: Api
API_OPENAI_EMBEDDINGS: Api
API_OPENAI_RESPONSES: Api
API_ANTHROPIC_MESSAGES: Api
DECISION_UNSPECIFIED: Decision
DECISION_ADMITTED: Decision
DECISION_ADMITTED_ALERT: Decision
DECISION_ADMITTED_SHADOW: Decision
DECISION_THROTTLED: Decision
DECISION_BLOCKED: Decision
DECISION_REFUSED_UNAUTHENTICATED: Decision
DECISION_REFUSED_BAD_REQUEST: Decision
DECISION_REFUSED_TOO_LARGE: Decision
DECISION_REFUSED_UNSUPPORTED: Decision
DECISION_REFUSED_BACKEND: Decision
ENDING_UNSPECIFIED: Ending
ENDING_COMPLETED: Ending
ENDING_REFUSED: Ending
ENDING_INCOMPLETE: Ending
ENDING_ABORTED: Ending
ENDING_FAILED_UPSTREAM: Ending
ENDING_REFUSED_BY_ENVOY: Ending
ENDING_NOT_GOVERNED: Ending

class AdmissionFacts(_message.Message):
    __slots__ = ("request_id", "admitted_at", "policy_version", "tenant", "project", "team", "key_id", "api", "path", "requested_model", "stream", "pool", "reserved_tokens", "prompt_estimate", "decision", "max_output_tokens", "alerts", "degraded", "usage_injected", "shadow_scope", "shadow_action", "shadow_kind")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    USAGE_INJECTED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SCOPE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_KIND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    admitted_at: _timestamp_pb2.Timestamp
    policy_version: str
    tenant: str
    project: str
    team: str
    key_id: str
    api: Api
    path: str
    requested_model: str
    stream: bool
    pool: str
    reserved_tokens: int
    prompt_estimate: int
    decision: Decision
    max_output_tokens: int
    alerts: _containers.RepeatedScalarFieldContainer[str]
    degraded: bool
    usage_injected: bool
    shadow_scope: str
    shadow_action: str
    shadow_kind: str
    def __init__(self, request_id: _Optional[str] = ..., admitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy_version: _Optional[str] = ..., tenant: _Optional[str] = ..., project: _Optional[str] = ..., team: _Optional[str] = ..., key_id: _Optional[str] = ..., api: _Optional[_Union[Api, str]] = ..., path: _Optional[str] = ..., requested_model: _Optional[str] = ..., stream: _Optional[bool] = ..., pool: _Optional[str] = ..., reserved_tokens: _Optional[int] = ..., prompt_estimate: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., max_output_tokens: _Optional[int] = ..., alerts: _Optional[_Iterable[str]] = ..., degraded: _Optional[bool] = ..., usage_injected: _Optional[bool] = ..., shadow_scope: _Optional[str] = ..., shadow_action: _Optional[str] = ..., shadow_kind: _Optional[str] = ...) -> None: ...
