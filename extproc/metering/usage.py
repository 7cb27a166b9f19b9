"""Token usage as reported by model servers, normalised to one shape (`Usage`).

Each API's own format, and how it maps onto `Usage`, is in its module under extproc.apis. The
common rule: ``prompt_tokens`` is every input token the model processed (cached or not, cache
writes included) and ``completion_tokens`` every output token (reasoning included), so totals are
comparable across APIs and a rate limit counts the same thing whichever API a caller uses; the
finer kinds are parts of those two.

Readers of usage are total over untrusted JSON: anything missing, null, negative or of the wrong
type yields ``None`` (no usage), never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Usage", "count"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request.

    ``cached_tokens`` is part of ``prompt_tokens`` (cache reads: OpenAI cached prompt tokens,
    Anthropic ``cache_read_input_tokens``), ``cache_creation_tokens`` is part of ``prompt_tokens``
    (cache writes: Anthropic ``cache_creation_input_tokens``; 0 for OpenAI), ``reasoning_tokens`` is
    part of ``completion_tokens``. ``estimated`` is True when we counted the tokens ourselves
    instead of the model server reporting them.
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
