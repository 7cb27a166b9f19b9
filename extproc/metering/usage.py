"""Token usage as reported by model servers, normalised to one shape.

Reported formats (see shared notes, "Usage formats"):

* OpenAI chat / completions: ``usage.prompt_tokens``, ``completion_tokens``, ``total_tokens``,
  ``prompt_tokens_details.cached_tokens`` (part of the prompt),
  ``completion_tokens_details.reasoning_tokens`` (part of the completion).
* OpenAI embeddings: ``usage.prompt_tokens`` and ``total_tokens`` only.
* OpenAI Responses API: ``usage`` (non-streaming body) or ``response.usage`` (``response.completed`` /
  ``response.incomplete`` / ``response.failed`` events) with ``input_tokens``,
  ``input_tokens_details.cached_tokens``, ``output_tokens``, ``output_tokens_details.reasoning_tokens``.
* Anthropic: ``usage.input_tokens``, ``output_tokens``, ``cache_creation_input_tokens``,
  ``cache_read_input_tokens``; the cache counts are *in addition to* ``input_tokens``.

Normalisation choice for Anthropic: ``prompt_tokens = input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``, i.e. every input token the model processed, exactly as OpenAI's
``prompt_tokens`` includes its cached part. Totals are then comparable across schemas and a rate
limit counts the same thing whichever API a caller uses; pricing that treats cache reads/writes
differently uses ``cached_tokens`` / ``cache_creation_tokens`` (both already inside ``prompt_tokens``).

The extractors are total over untrusted JSON: anything missing, null, negative or of the wrong type
yields ``None`` (no usage), never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Schema(StrEnum):
    """The API family of a request/response (decides the usage and stream formats)."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request.

    ``cached_tokens`` is part of ``prompt_tokens`` (OpenAI cached prompt tokens; Anthropic cache reads),
    ``cache_creation_tokens`` is part of ``prompt_tokens`` (Anthropic cache writes; 0 for OpenAI),
    ``reasoning_tokens`` is part of ``completion_tokens``. ``estimated`` is True when we counted the
    tokens ourselves instead of the model server reporting them.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def count(value: object) -> int | None:
    """A token count from JSON: a non-negative int (bool excluded), else None."""
    if type(value) is int and value >= 0:
        return value
    return None


def _detail(usage: Mapping[str, object], section: str, key: str) -> int:
    details = usage.get(section)
    if isinstance(details, dict):
        return count(details.get(key)) or 0
    return 0


def _usage_object(obj: Mapping[str, object], container: str) -> Mapping[str, object] | None:
    """``obj["usage"]``, else ``obj[container]["usage"]`` (a wrapped response or message)."""
    usage = obj.get("usage")
    if usage is None:
        inner = obj.get(container)
        if isinstance(inner, dict):
            usage = inner.get("usage")
    return usage if isinstance(usage, dict) else None


def openai_usage(usage: Mapping[str, object]) -> Usage | None:
    """Normalise one OpenAI-style ``usage`` object (Chat/Completions/Embeddings or Responses)."""
    if "input_tokens" in usage:  # Responses API
        prompt = count(usage.get("input_tokens"))
        completion = count(usage.get("output_tokens"))
        cached = _detail(usage, "input_tokens_details", "cached_tokens")
        reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
    else:
        prompt = count(usage.get("prompt_tokens"))
        completion = count(usage.get("completion_tokens"))
        if completion is None and usage.get("completion_tokens") is None:
            # Embeddings report only prompt_tokens and total_tokens.
            total = count(usage.get("total_tokens"))
            if prompt is not None and (total is None or total >= prompt):
                completion = 0 if total is None else total - prompt
        cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
        reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    if prompt is None or completion is None:
        return None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(cached, prompt),
        reasoning_tokens=min(reasoning, completion),
    )


def usage_from_openai(obj: Mapping[str, object]) -> Usage | None:
    """Usage of an OpenAI-style response body, stream chunk or Responses API event.

    Looks at ``obj["usage"]`` (chat/completions/embeddings bodies and chunks, Responses API bodies),
    then ``obj["response"]["usage"]`` (Responses API stream events). None when absent or null (as on
    every chunk but the last of an OpenAI stream with ``include_usage``) or malformed.
    """
    usage = _usage_object(obj, "response")
    return None if usage is None else openai_usage(usage)


def anthropic_counts(usage: Mapping[str, object]) -> dict[str, int]:
    """The valid Anthropic token fields present in one ``usage`` object (possibly partial, as in a
    ``message_delta``). Streams merge these: later fields override earlier ones."""
    out: dict[str, int] = {}
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = count(usage.get(key))
        if value is not None:
            out[key] = value
    return out


def anthropic_usage(counts: Mapping[str, int]) -> Usage | None:
    """A Usage from merged Anthropic counts; None unless both input and output tokens are known."""
    input_tokens = counts.get("input_tokens")
    output_tokens = counts.get("output_tokens")
    if input_tokens is None or output_tokens is None:
        return None
    cache_write = counts.get("cache_creation_input_tokens", 0)
    cache_read = counts.get("cache_read_input_tokens", 0)
    return Usage(
        prompt_tokens=input_tokens + cache_write + cache_read,
        completion_tokens=output_tokens,
        cached_tokens=cache_read,
        cache_creation_tokens=cache_write,
    )


def usage_from_anthropic(obj: Mapping[str, object]) -> Usage | None:
    """Usage of an Anthropic Messages body or a ``message_start`` event (``message.usage``).

    Requires ``input_tokens`` and ``output_tokens``; a lone ``message_delta`` usage (output only)
    gives None here; `ResponseMeter` merges it with the ``message_start`` counts.
    """
    usage = _usage_object(obj, "message")
    return None if usage is None else anthropic_usage(anthropic_counts(usage))
