"""OpenAI (legacy) Completions: ``POST /v1/completions``.

Request: ``prompt``, a string, a list of strings, token ids (counted exactly) or token-id lists
(the shared OpenAI request shape: extproc.apis._openai); ``n``/``best_of``. Like chat, a stream
reports its usage only with ``stream_options.include_usage``, which the proxy sets, and Envoy
takes the extra final chunk (``"choices": []``) back out.

Response: ``usage`` as in extproc.apis._openai. Output text: ``choices[].text``, in the body and
in every chunk.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.apis import _openai
from extproc.apis.base import Api
from extproc.metering.estimate import utf8_len

__all__ = ["API", "OpenAICompletions"]


class OpenAICompletions(_openai.OpenAIApi):
    __slots__ = ()

    api = Api.API_OPENAI_COMPLETIONS
    path = "/v1/completions"
    injects_usage = True

    def choice_text_bytes(self, choice: Mapping[str, object]) -> int:
        text = choice.get("text")  # the same in a body and in a chunk
        return utf8_len(text) if isinstance(text, str) else 0

    chunk_choice_text_bytes = choice_text_bytes


API = OpenAICompletions()
