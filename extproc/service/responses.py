"""Builders for ext_proc ProcessingResponse messages (Envoy's protos from xds-protos).

Never set ProcessingResponse.request_drain: in Envoy 1.40 field 11 is streamed_immediate_response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.service.metadata import NAMESPACE

MetadataValue = str | int | float | bool

HeaderPairs = Iterable[tuple[str, str]]


def _header_mutation(set_headers: HeaderPairs, remove: Iterable[str]) -> pb.HeaderMutation:
    mutation = pb.HeaderMutation()
    for name, value in set_headers:
        opt = mutation.set_headers.add()
        opt.header.key = name
        opt.header.raw_value = value.encode()
        opt.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    mutation.remove_headers.extend(remove)
    return mutation


def _common(
    set_headers: HeaderPairs,
    remove: Iterable[str],
    clear_route_cache: bool,
    body: bytes | None = None,
) -> pb.CommonResponse:
    common = pb.CommonResponse(
        header_mutation=_header_mutation(set_headers, remove), clear_route_cache=clear_route_cache
    )
    if body is not None:
        common.body_mutation.body = body
    return common


def _set_struct(fields: MutableMapping[str, struct_pb2.Value], values: Mapping[str, MetadataValue]) -> None:
    """Write values into a Struct's fields in place (about 3x cheaper than Struct.update, which
    type-checks each value in Python and builds a message per field to copy in)."""
    for name, value in values.items():
        if value is True or value is False:
            fields[name].bool_value = value
        elif isinstance(value, str):
            fields[name].string_value = value
        else:
            fields[name].number_value = value


def _with_metadata(
    resp: pb.ProcessingResponse, metadata: Mapping[str, MetadataValue] | None, namespace: str = NAMESPACE
) -> pb.ProcessingResponse:
    if metadata:
        _set_struct(resp.dynamic_metadata.fields[namespace].struct_value.fields, metadata)
    return resp


def request_headers(
    set_headers: HeaderPairs = (),
    remove: Iterable[str] = (),
    *,
    metadata: Mapping[str, MetadataValue] | None = None,
    clear_route_cache: bool = False,
    skip_request_body: bool = False,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=_common(set_headers, remove, clear_route_cache)
        )
    )
    if skip_request_body:
        resp.mode_override.request_body_mode = resp.mode_override.NONE
        resp.mode_override.response_body_mode = resp.mode_override.NONE
    return _with_metadata(resp, metadata)


def request_body(
    set_headers: HeaderPairs = (),
    remove: Iterable[str] = (),
    *,
    body: bytes | None = None,
    metadata: Mapping[str, MetadataValue] | None = None,
    clear_route_cache: bool = False,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=_common(set_headers, remove, clear_route_cache, body))
    )
    return _with_metadata(resp, metadata)


def response_headers(
    *,
    metadata: Mapping[str, MetadataValue] | None = None,
    skip_response_body: bool = False,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=_common((), (), False))
    )
    if skip_response_body:
        resp.mode_override.response_body_mode = resp.mode_override.NONE
    return _with_metadata(resp, metadata)


# An unmodified chunk: reused, never mutated, so the streaming path allocates nothing.
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def response_body(
    metadata: Mapping[str, MetadataValue] | None = None, *, body: bytes | None = None, namespace: str = NAMESPACE
) -> pb.ProcessingResponse:
    """The reply to a response body chunk; `body` replaces the chunk (STREAMED mode)."""
    if not metadata and body is None:
        return CONTINUE_RESPONSE_BODY
    resp = pb.ProcessingResponse(response_body=pb.BodyResponse())
    if body is not None:
        resp.response_body.response.body_mutation.body = body
    return _with_metadata(resp, metadata, namespace)


def immediate(
    status: int,
    body: bytes,
    *,
    headers: HeaderPairs = (),
    details: str,
    metadata: Mapping[str, MetadataValue] | None = None,
) -> pb.ProcessingResponse:
    all_headers = [("content-type", "application/json"), *headers]
    resp = pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_header_mutation(all_headers, ()),
            body=body,
            details=details,
        )
    )
    return _with_metadata(resp, metadata)
