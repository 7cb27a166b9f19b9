"""Cheap token estimates: for admission (before the model runs) and as a metering fallback.

The heuristic is ``ceil(utf8_bytes / 4)``: roughly right for English with BPE tokenizers, an
underestimate for code and some scripts, an overestimate for others. It is an *admission*
estimate, used to reserve capacity before the model server has counted anything, and to charge a
response whose usage never arrived (stream cut, malformed body). Usage reported by the model server
always wins over it. It costs O(n) with no tokenizer tables and cannot be made pathological.

All functions are total over untrusted JSON values: unexpected types count zero, never raise.
"""

from __future__ import annotations

import orjson

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role markers and separators of a chat template, per message
_MAX_DEPTH = 6  # nesting we follow into content parts (tool_result -> parts); deeper counts zero


def utf8_len(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes, without encoding pure-ASCII text."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def estimate_tokens_from_byte_count(nbytes: int) -> int:
    """``ceil(nbytes / 4)``; 0 for 0 bytes, at least 1 otherwise."""
    if nbytes <= 0:
        return 0
    return (nbytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def estimate_tokens_from_text(text: str) -> int:
    """``ceil(utf8_bytes / 4)``, at least 1 for non-empty text. An admission estimate only."""
    return estimate_tokens_from_byte_count(utf8_len(text))


def _json_len(value: object) -> int:
    try:
        return len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        return 0


def _part_bytes(part: object, depth: int) -> int:
    """Text bytes of one content part.

    Counted: ``text`` (OpenAI ``text``/``input_text``/``output_text``, Anthropic ``text``), Anthropic
    ``thinking``, ``tool_use.input`` (as JSON), ``tool_result.content`` (recursively). Not counted:
    images, audio, documents and files (their cost depends on the model; reported usage settles it).
    """
    if isinstance(part, str):
        return utf8_len(part)
    if not isinstance(part, dict) or depth > _MAX_DEPTH:
        return 0
    total = 0
    text = part.get("text")
    if isinstance(text, str):
        total += utf8_len(text)
    thinking = part.get("thinking")
    if isinstance(thinking, str):
        total += utf8_len(thinking)
    kind = part.get("type")
    if kind == "tool_use":
        total += _json_len(part.get("input"))
    elif kind == "tool_result":
        total += content_text_bytes(part.get("content"), depth + 1)
    return total


def content_text_bytes(content: object, depth: int = 0) -> int:
    """UTF-8 bytes of the text in a message ``content``: a string, or a list of parts."""
    if isinstance(content, str):
        return utf8_len(content)
    if isinstance(content, list):
        return sum(_part_bytes(part, depth + 1) for part in content)
    if isinstance(content, dict):
        return _part_bytes(content, depth + 1)
    return 0


def message_text_bytes(message: object) -> int:
    """UTF-8 bytes of the text in one chat message (OpenAI or Anthropic) or Responses API input item."""
    if not isinstance(message, dict):
        return 0
    total = content_text_bytes(message.get("content"))
    # OpenAI assistant tool calls (and the legacy function_call): the model reads them back.
    for key in ("tool_calls", "function_call"):
        value = message.get(key)
        if value:
            total += _json_len(value)
    # Reasoning text of an OpenAI-compatible assistant message. vLLM fills both ``reasoning`` and
    # its deprecated alias ``reasoning_content`` with the same text: count one of them.
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = message.get("reasoning")
    if isinstance(reasoning, str):
        total += utf8_len(reasoning)
    # Responses API items (function_call.arguments, function_call_output.output, reasoning.summary).
    for key in ("arguments", "output", "refusal"):
        value = message.get(key)
        if isinstance(value, str):
            total += utf8_len(value)
        elif isinstance(value, list):
            total += content_text_bytes(value)
    summary = message.get("summary")
    if isinstance(summary, list):
        total += content_text_bytes(summary)
    return total


def estimate_prompt_tokens(
    *,
    messages: object = None,
    system: object = None,
    tools: object = None,
    prompt: object = None,
) -> int:
    """Estimated prompt tokens of a request, from already-parsed JSON values.

    * ``messages``: chat messages (OpenAI or Anthropic), each counting its text content (string or
      list of parts; see `_part_bytes`) plus ``MESSAGE_OVERHEAD_TOKENS``.
    * ``system``: Anthropic ``system`` (string or text blocks) or Responses API ``instructions``.
    * ``tools``: tool definitions, counted by their JSON length.
    * ``prompt``: Completions ``prompt`` / Embeddings or Responses ``input``: a string, a list of
      strings, a list of token ids (counted exactly), a list of token-id lists, or a list of Responses
      input items (counted like messages).
    """
    nbytes = 0
    exact_tokens = 0
    overhead = 0
    if isinstance(messages, list):
        for message in messages:
            nbytes += message_text_bytes(message)
            overhead += MESSAGE_OVERHEAD_TOKENS
    if system is not None:
        system_bytes = content_text_bytes(system)
        if system_bytes:
            nbytes += system_bytes
            overhead += MESSAGE_OVERHEAD_TOKENS
    if tools:
        nbytes += _json_len(tools)
    if isinstance(prompt, str):
        nbytes += utf8_len(prompt)
    elif isinstance(prompt, list):
        for item in prompt:
            if isinstance(item, str):
                nbytes += utf8_len(item)
            elif type(item) is int:
                exact_tokens += 1
            elif isinstance(item, list):
                exact_tokens += len(item)  # a pre-tokenized prompt
            elif isinstance(item, dict):
                nbytes += message_text_bytes(item)
                overhead += MESSAGE_OVERHEAD_TOKENS
    return estimate_tokens_from_byte_count(nbytes) + exact_tokens + overhead
