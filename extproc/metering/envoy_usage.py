"""Usage as Envoy counted it: the `tokenmeter.usage` dynamic-metadata namespace written by the
json_to_metadata and sse_to_metadata filters of the generated Envoy configuration.

The rules (JSON path -> key) are each API's `ApiSchema.envoy_usage_rules` (their union is
extproc.envoy.config.USAGE_PATHS), and the same API reads its keys back:
``api.usage_from_envoy(fields)``. What every API's rules write alike is read here.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["response_model"]


def response_model(fields: Mapping[str, object]) -> str | None:
    """The model the server named in its response (every API's rules write it as
    ``response_model``)."""
    value = fields.get("response_model")
    return value if isinstance(value, str) and value else None
