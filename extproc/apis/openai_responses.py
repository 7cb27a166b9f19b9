"""OpenAI Responses API: ``POST /v1/responses``.

Request: ``input`` (a string or a list of input items, estimated like messages), ``instructions``
(a system prompt), ``prompt`` (a dict: a stored prompt template), ``max_output_tokens``: the
shared OpenAI request shape (extproc.apis._openai). Its streams always report usage: nothing to
inject.

Response: ``usage`` on the body, ``response.usage`` on the terminal stream events
(``response.completed`` / ``response.incomplete`` / ``response.failed``; earlier events carry
``"usage": null``), with ``input_tokens``, ``input_tokens_details.cached_tokens`` (part of the
input), ``output_tokens``, ``output_tokens_details.reasoning_tokens`` (part of the output). The
model is ``model`` of the body, ``response.model`` of the events. Output text: the body's
``output`` items; in a stream, the ``delta`` of ``response.*.delta`` events (not the ``.done``
events, which repeat the whole text). Streamed events are named (``event: response.…``), so the
ones that can carry neither usage nor text are skipped without parsing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from extproc.apis import _openai
from extproc.apis.base import Api, EnvoyRule, envoy_count, loads_object
from extproc.metering.estimate import message_text_bytes, utf8_len
from extproc.metering.jsonscan import may_carry_usage
from extproc.metering.usage import Usage, count

__all__ = ["API", "OpenAIResponses", "responses_usage", "usage_object"]

_RULES: tuple[EnvoyRule, ...] = tuple(
    (container + path, key)
    for container in (("usage",), ("response", "usage"))
    for path, key in (
        (("input_tokens",), "input_tokens"),
        (("output_tokens",), "output_tokens"),
        (("input_tokens_details", "cached_tokens"), "input_cached_tokens"),
        (("output_tokens_details", "reasoning_tokens"), "output_reasoning_tokens"),
    )
)


def responses_usage(usage: Mapping[str, object]) -> Usage | None:
    """Normalise one Responses API ``usage`` object."""
    prompt = count(usage.get("input_tokens"))
    completion = count(usage.get("output_tokens"))
    if prompt is None or completion is None:
        return None
    cached = _openai.detail(usage, "input_tokens_details", "cached_tokens")
    reasoning = _openai.detail(usage, "output_tokens_details", "reasoning_tokens")
    return _openai.clamped_usage(prompt, completion, cached, reasoning)


def usage_object(obj: Mapping[str, object]) -> Mapping[str, object] | None:
    """``obj["usage"]`` (a body), else ``obj["response"]["usage"]`` (a stream event)."""
    usage = obj.get("usage")
    if usage is None:
        response = obj.get("response")
        if isinstance(response, dict):
            usage = response.get("usage")
    return usage if isinstance(usage, dict) else None


class _ResponsesStreamUsage(_openai.OpenAIStreamUsage):
    __slots__ = ()

    def feed(self, name: str | None, data: bytes) -> None:
        # Output text only in *.delta events, usage only in terminal events: skip the rest unparsed.
        if name is not None and name.startswith("response.") and not name.endswith(".delta"):
            if not may_carry_usage(data):
                return
        obj = loads_object(data)
        if obj is None:
            return
        response = obj.get("response")
        if self.model is None:
            model = obj.get("model")
            if model is None and isinstance(response, dict):
                model = response.get("model")
            if isinstance(model, str):
                self.model = model
        if obj.get("usage") is not None or response is not None:
            usage = usage_object(obj)
            reported = None if usage is None else responses_usage(usage)
            if reported is not None:
                self._usage = reported
        kind = obj.get("type")
        if isinstance(kind, str) and kind.endswith(".delta"):
            delta = obj.get("delta")
            if isinstance(delta, str) and delta:
                self.text_bytes += utf8_len(delta)
                self.text_pieces += 1


class OpenAIResponses(_openai.OpenAIApi):
    output_keys = ("max_output_tokens", "max_tokens", "max_completion_tokens")
    __slots__ = ()

    api = Api.API_OPENAI_RESPONSES
    path = "/v1/responses"

    def usage_from_json(self, obj: Mapping[str, object]) -> Usage | None:
        usage = usage_object(obj)
        return None if usage is None else responses_usage(usage)

    def output_text_bytes(self, obj: Mapping[str, object]) -> int:
        output = obj.get("output")
        return sum(message_text_bytes(item) for item in output) if isinstance(output, list) else 0

    def new_stream_usage(self) -> _openai.OpenAIStreamUsage:
        return _ResponsesStreamUsage()

    def envoy_usage_rules(self) -> Sequence[EnvoyRule]:
        return (*_RULES, _openai.MODEL_RULE)

    def usage_from_envoy(self, fields: Mapping[str, object]) -> Usage | None:
        prompt = envoy_count(fields.get("input_tokens"))
        completion = envoy_count(fields.get("output_tokens"))
        if prompt is None or completion is None:
            return None
        cached = envoy_count(fields.get("input_cached_tokens")) or 0
        reasoning = envoy_count(fields.get("output_reasoning_tokens")) or 0
        return _openai.clamped_usage(prompt, completion, cached, reasoning)


API = OpenAIResponses()
