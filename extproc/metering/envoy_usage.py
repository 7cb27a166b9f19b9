"""Usage as Envoy counted it: the `tokenmeter.usage` dynamic-metadata namespace written by the
json_to_metadata and sse_to_metadata filters of envoy/envoy-native.yaml.

The keys mirror the JSON fields (extproc.devstack.envoy_config._USAGE_PATHS), so the same
normalisation as for bodies the processor parses itself applies (extproc.metering.usage).
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.metering.usage import Schema, Usage, anthropic_usage, openai_usage

EnvoyValue = float | str | bool | None


def _counts(fields: Mapping[str, EnvoyValue]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value >= 0 and float(value).is_integer():
            out[key] = int(value)
    return out


def usage_from_envoy(fields: Mapping[str, EnvoyValue], schema: Schema) -> Usage | None:
    """The reported usage, or None when the server reported none (or only part of it)."""
    n = _counts(fields)
    if schema is Schema.ANTHROPIC:
        return anthropic_usage(n)
    if "prompt_tokens" in n:
        usage: dict[str, object] = {
            "prompt_tokens": n["prompt_tokens"],
            "prompt_tokens_details": {"cached_tokens": n.get("cached_tokens", 0)},
            "completion_tokens_details": {"reasoning_tokens": n.get("reasoning_tokens", 0)},
        }
        for key in ("completion_tokens", "total_tokens"):
            if key in n:
                usage[key] = n[key]
        return openai_usage(usage)
    if "input_tokens" in n:  # Responses API
        return openai_usage({
            "input_tokens": n["input_tokens"],
            "output_tokens": n.get("output_tokens"),
            "input_tokens_details": {"cached_tokens": n.get("input_cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": n.get("output_reasoning_tokens", 0)},
        })
    return None


def response_model(fields: Mapping[str, EnvoyValue]) -> str | None:
    value = fields.get("response_model")
    return value if isinstance(value, str) and value else None
