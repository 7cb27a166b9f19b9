# ruff: noqa
# mypy: disallow-any-generics=false
import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from extproc.protos.tokenmeter.v1 import admission_pb2 as _admission_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_SOURCE_UNSPECIFIED: _ClassVar[UsageSource]
    USAGE_SOURCE_NONE: _ClassVar[UsageSource]
    USAGE_SOURCE_REPORTED: _ClassVar[UsageSource]
    USAGE_SOURCE_ESTIMATED: _ClassVar[UsageSource]
USAGE_SOURCE_UNSPECIFIED: UsageSource
USAGE_SOURCE_NONE: UsageSource
USAGE_SOURCE_REPORTED: UsageSource
USAGE_SOURCE_ESTIMATED: UsageSource

class LimitRef(_message.Message):
    __slots__ = ("scope", "kind", "action")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    scope: str
    kind: str
    action: str
    def __init__(self, scope: _Optional[str] = ..., kind: _Optional[str] = ..., action: _Optional[str] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("admission", "ending", "status", "response_model", "duration", "time_to_first_token", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens", "usage_source", "cost", "currency", "price_version", "price_missing", "decided_by", "replica")
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_MISSING_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    admission: _admission_pb2.AdmissionFacts
    ending: _admission_pb2.Ending
    status: int
    response_model: str
    duration: _duration_pb2.Duration
    time_to_first_token: _duration_pb2.Duration
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    usage_source: UsageSource
    cost: str
    currency: str
    price_version: str
    price_missing: bool
    decided_by: LimitRef
    replica: str
    def __init__(self, admission: _Optional[_Union[_admission_pb2.AdmissionFacts, _Mapping]] = ..., ending: _Optional[_Union[_admission_pb2.Ending, str]] = ..., status: _Optional[int] = ..., response_model: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., usage_source: _Optional[_Union[UsageSource, str]] = ..., cost: _Optional[str] = ..., currency: _Optional[str] = ..., price_version: _Optional[str] = ..., price_missing: _Optional[bool] = ..., decided_by: _Optional[_Union[LimitRef, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...
