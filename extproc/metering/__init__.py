"""Hot-path metering: request parsing, SSE framing, usage extraction and estimates. Pure, no I/O."""

from extproc.metering.estimate import estimate_prompt_tokens, estimate_tokens_from_text
from extproc.metering.meter import ResponseMeter
from extproc.metering.request import (
    BadRequest,
    RequestInfo,
    inject_stream_usage,
    parse_request,
    schema_for_path,
)
from extproc.metering.sse import SSEEvent, SSEFramer
from extproc.metering.usage import Schema, Usage, usage_from_anthropic, usage_from_openai

__all__ = [
    "BadRequest",
    "RequestInfo",
    "ResponseMeter",
    "SSEEvent",
    "SSEFramer",
    "Schema",
    "Usage",
    "estimate_prompt_tokens",
    "estimate_tokens_from_text",
    "inject_stream_usage",
    "parse_request",
    "schema_for_path",
    "usage_from_anthropic",
    "usage_from_openai",
]
