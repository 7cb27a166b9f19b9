"""One module per inference API: everything the gateway knows about one API's JSON, behind one
small interface (`ApiSchema`, in extproc.apis.base).

    openai_chat          POST /v1/chat/completions
    openai_completions   POST /v1/completions
    openai_embeddings    POST /v1/embeddings
    openai_responses     POST /v1/responses
    anthropic_messages   POST /v1/messages

Each module defines one `ApiSchema` singleton, ``API``; `ALL_APIS` lists them. Adding an API is
adding a module and listing it here: the request path routes to it (`api_for_path`), the response
meter and Envoy's usage metering rules (`envoy_usage_rules`, the USAGE_PATHS of
extproc.envoy.config) follow from it. AdmissionFacts.api carries `ApiSchema.api` (`api_by_id`
reads it back).
"""

from __future__ import annotations

from extproc.apis import anthropic_messages, openai_chat, openai_completions, openai_embeddings, openai_responses
from extproc.apis.base import (
    Api,
    ApiSchema,
    BadRequest,
    EnvoyRule,
    EnvoyValue,
    RequestInfo,
    StreamUsage,
    normalize_path,
)

__all__ = [
    "ALL_APIS",
    "Api",
    "ApiSchema",
    "BadRequest",
    "EnvoyRule",
    "EnvoyValue",
    "RequestInfo",
    "StreamUsage",
    "api_by_id",
    "api_for_path",
    "envoy_usage_rules",
    "normalize_path",
]

# The order is the order of `envoy_usage_rules` (Anthropic's before the Responses API's keeps the
# order in which rules that write the same key have always run).
ALL_APIS: tuple[ApiSchema, ...] = (
    openai_chat.API,
    openai_completions.API,
    openai_embeddings.API,
    anthropic_messages.API,
    openai_responses.API,
)

_BY_PATH: dict[str, ApiSchema] = {api.path: api for api in ALL_APIS}
_BY_ID: dict[int, ApiSchema] = {api.api: api for api in ALL_APIS}


def api_for_path(path: str) -> ApiSchema | None:
    """The API of a request path (any query string or odd spelling: see `normalize_path`); None for
    a path that is not a metered inference endpoint."""
    return _BY_PATH.get(normalize_path(path))


def api_by_id(api: int) -> ApiSchema | None:
    """The API of a tokenmeter.v1 ``Api`` value (AdmissionFacts.api); None for API_UNSPECIFIED or
    a value this version does not know."""
    return _BY_ID.get(api)


def envoy_usage_rules() -> list[EnvoyRule]:
    """Every API's `ApiSchema.envoy_usage_rules`, in `ALL_APIS` order, each rule once (where it
    first appears). Rules that write the same key keep their order within each API, which is all
    that "the last rule present wins" depends on (no document has two APIs' containers)."""
    seen: set[EnvoyRule] = set()
    out: list[EnvoyRule] = []
    for api in ALL_APIS:
        for rule in api.envoy_usage_rules():
            if rule not in seen:
                seen.add(rule)
                out.append(rule)
    return out
