"""OpenAI Chat Completions: ``POST /v1/chat/completions``.

Request: ``messages`` (the shared OpenAI request shape: extproc.apis._openai). A stream reports its
usage only with ``stream_options.include_usage``: the proxy sets it for a client that did not, and
Envoy takes the extra final chunk (``"choices": []`` plus ``usage``: `is_usage_event`) back out.

Response: ``usage`` as in extproc.apis._openai, on the body and on stream chunks. Output text, for
the estimate when no usage comes: a body's ``choices[].message`` (content, tool calls, reasoning);
a chunk's ``choices[].delta``: ``content``, ``reasoning_content`` (else ``reasoning``: vLLM sends
both with the same text) and ``tool_calls[].function.arguments``.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.apis import _openai
from extproc.apis.base import Api
from extproc.metering.estimate import message_text_bytes, utf8_len

__all__ = ["API", "OpenAIChat", "delta_text_bytes"]


def delta_text_bytes(choice: Mapping[str, object]) -> int:
    """Output text bytes of one streamed chat choice (its ``delta``)."""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return 0
    nbytes = 0
    content = delta.get("content")
    if isinstance(content, str):
        nbytes += utf8_len(content)
    # vLLM sends `reasoning` and its deprecated alias `reasoning_content` with the same text.
    reasoning = delta.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = delta.get("reasoning")
    if isinstance(reasoning, str):
        nbytes += utf8_len(reasoning)
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                nbytes += utf8_len(arguments)
    return nbytes


class OpenAIChat(_openai.OpenAIApi):
    __slots__ = ()

    api = Api.API_OPENAI_CHAT
    path = "/v1/chat/completions"
    injects_usage = True

    def choice_text_bytes(self, choice: Mapping[str, object]) -> int:
        return message_text_bytes(choice.get("message"))

    def chunk_choice_text_bytes(self, choice: Mapping[str, object]) -> int:
        return delta_text_bytes(choice)


API = OpenAIChat()
