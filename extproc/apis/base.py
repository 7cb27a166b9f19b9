"""The interface every API module implements (`ApiSchema`), and the types it speaks in.

One `ApiSchema` per inference API (one path, one request and response format): everything the
gateway knows about that API's JSON is behind it, so the request parser, the response meter,
settlement and the Envoy configuration never branch on which API a request used.

    api = extproc.apis.api_for_path(path)          # once per request; None: not metered
    info = api.parse_request(body)                  # BadRequest -> 400
    body = api.inject_stream_usage(body) if info.wants_usage_injection else None
    meter = ResponseMeter(info.api, info.stream)    # drives api.new_stream_usage() / usage_from_json
    usage = api.usage_from_envoy(fields)            # Envoy's tokenmeter.usage, written by the
                                                    # rules of api.envoy_usage_rules()

Everything here is pure (no I/O) and total over untrusted JSON: readers return None or 0 for
anything malformed; only `ApiSchema.parse_request` raises, and only `BadRequest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from extproc.metering.usage import Usage
from extproc.protos.tokenmeter.v1.admission_pb2 import Api

__all__ = [
    "Api",
    "ApiSchema",
    "BadRequest",
    "EnvoyRule",
    "EnvoyValue",
    "RequestInfo",
    "StreamUsage",
    "envoy_count",
    "loads_object",
    "normalize_path",
]

# One value of Envoy's tokenmeter.usage dynamic metadata, as the access log brings it back.
EnvoyValue = float | str | bool | None

# (JSON path, metadata key): Envoy's json_to_metadata / sse_to_metadata write the value at the path
# (of a JSON body, or of any SSE event's JSON) into tokenmeter.usage under the key. The value is
# read as a NUMBER, except for the key "response_model" (a STRING). When several rules write one
# key, the last rule whose path is present in a JSON document wins, and a later event overrides
# an earlier one.
EnvoyRule = tuple[tuple[str, ...], str]


class BadRequest(Exception):
    """The request is malformed: answer 400 with an OpenAI-style ``invalid_request_error``.

    Messages never echo the body (prompts are not logged or returned): they name the parameter.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What admission needs to know about a request.

    ``api`` is the schema that parsed it (downstream code dispatches on it: the response meter,
    the usage reader). ``max_output_tokens`` is the client's own bound (None when absent); ``n``
    is how many completions the request asks for (1 unless the API has ``n``), so the most the
    response may add is ``n * max_output_tokens``. ``wants_usage_injection``: a stream whose usage
    the server reports only on request, and the client did not ask; the proxy should
    ``api.inject_stream_usage`` so that it does.
    """

    api: ApiSchema
    model: str
    stream: bool
    max_output_tokens: int | None
    prompt_tokens_estimate: int
    wants_usage_injection: bool
    n: int = 1


class StreamUsage(Protocol):
    """What one response stream of an API reported: its usage, its model and its output text.

    From `ApiSchema.new_stream_usage`; one per response, fed every SSE event in order. It holds
    the per-stream state an API needs (the latest usage for OpenAI, where the last report is
    cumulative; Anthropic's input counts from ``message_start`` merged with the cumulative
    ``message_delta`` counts). ``text_bytes``/``text_pieces``: UTF-8 bytes of output text seen,
    and how many non-empty pieces carried it (a streamed piece is at least one token), for the
    estimate when the server reports no usage.
    """

    model: str | None
    text_bytes: int
    text_pieces: int

    def feed(self, name: str | None, data: bytes) -> None:
        """One SSE event: its ``event:`` name (None if absent) and its data, a JSON object's bytes
        (the caller skips data that does not start with ``{``). Never raises."""
        ...

    def usage(self) -> Usage | None:
        """The usage the server reported so far, once it is complete; else None."""
        ...

    def estimate(self, prompt_estimate: int, completion_tokens: int) -> Usage:
        """The usage to charge when the stream ended without a complete report: the caller's
        prompt estimate and output estimate, corrected by whatever partial counts were reported."""
        ...


class ApiSchema(Protocol):
    """One inference API. Implementations are stateless singletons (see extproc.apis)."""

    @property
    def api(self) -> Api:
        """Its value of the tokenmeter.v1 ``Api`` enum (AdmissionFacts.api)."""
        ...

    @property
    def path(self) -> str:
        """Its request path, normalized (`normalize_path`)."""
        ...

    @property
    def output_keys(self) -> tuple[str, ...]:
        """The request fields that bound its output, the first being the one the gateway adds to a
        request that names none (empty: an API without output, e.g. embeddings)."""
        ...

    def parse_request(self, body: bytes) -> RequestInfo:
        """Validate a request body, bound its output and estimate its prompt; one JSON parse.
        Raises `BadRequest` (naming the parameter) on bad input."""
        ...

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        """``body`` changed so that the server reports the stream's usage; None when the API needs
        nothing (its streams always report usage). For a body `parse_request` accepted."""
        ...

    def usage_from_json(self, obj: Mapping[str, object]) -> Usage | None:
        """The usage of a non-streaming response body (also given ``{"usage": <object>}`` alone)."""
        ...

    def output_text_bytes(self, obj: Mapping[str, object]) -> int:
        """UTF-8 bytes of the generated text of a non-streaming response body (for the estimate)."""
        ...

    def new_stream_usage(self) -> StreamUsage:
        """A fresh accumulator for one streamed response."""
        ...

    def may_hold_usage_event(self, chunk: bytes) -> bool:
        """Cheap byte test: could ``chunk`` contain the event that `inject_stream_usage` made the
        server add? False for every chunk when the API injects nothing."""
        ...

    def is_usage_event(self, obj: Mapping[str, object]) -> bool:
        """Is this SSE event's JSON the usage-only event that `inject_stream_usage` made the server
        add (and the client did not ask for)? False for APIs without one. (Envoy takes that event
        back out of the stream: extproc/envoy/strip_usage.lua.)"""
        ...

    def envoy_usage_rules(self) -> Sequence[EnvoyRule]:
        """What Envoy's json_to_metadata / sse_to_metadata must read for this API, in order."""
        ...

    def usage_from_envoy(self, fields: Mapping[str, object]) -> Usage | None:
        """The usage in Envoy's tokenmeter.usage fields (written by `envoy_usage_rules`); None
        when the server reported none, or only part of it. Reads only the keys of its rules."""
        ...


# -- helpers shared by the API modules ------------------------------------------------------------


def normalize_path(path: str) -> str:
    """The path as a model server will route it: query, fragment and ``;params`` dropped,
    percent-escapes decoded, ``.`` segments and repeated or trailing slashes removed, lowercased.

    Matching on this (not on the raw ``:path``) keeps ``/v1//chat/completions``,
    ``/v1/%63hat/completions`` or ``/V1/chat/completions/`` from passing as unmetered paths.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    path = unquote(unquote(path))  # twice: a double-encoded escape is decoded by some servers too
    segments = [seg.split(";", 1)[0] for seg in path.split("/")]
    parts: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts:
                parts.pop()
            continue
        parts.append(seg)
    return "/" + "/".join(parts).lower()


def loads_object(data: bytes) -> dict[str, Any] | None:
    """One SSE event's JSON object; None for anything else (malformed, not an object)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def envoy_count(value: object) -> int | None:
    """A token count from Envoy metadata (a Struct number: a float): a non-negative integral
    number, else None."""
    if isinstance(value, float):
        return int(value) if value >= 0 and value.is_integer() else None  # NaN and inf: None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    return None
