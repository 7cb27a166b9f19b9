"""OpenAI Embeddings: ``POST /v1/embeddings``.

Request: ``input``, a string, a list of strings, token ids or token-id lists (vLLM also takes chat
``messages``: the shared OpenAI request shape, extproc.apis._openai). No output bound; never
streamed, so nothing to inject.

Response: ``usage.prompt_tokens`` and ``total_tokens`` (vLLM adds ``completion_tokens: 0``); no
output tokens and no output text. A batch body is megabytes of floats with ``usage`` at its end
(the meter recovers it from the tail without parsing the rest).
"""

from __future__ import annotations

from extproc.apis import _openai
from extproc.apis.base import Api

__all__ = ["API", "OpenAIEmbeddings"]


class OpenAIEmbeddings(_openai.OpenAIApi):
    output_keys = ()  # no output tokens
    __slots__ = ()

    api = Api.API_OPENAI_EMBEDDINGS
    path = "/v1/embeddings"


API = OpenAIEmbeddings()
