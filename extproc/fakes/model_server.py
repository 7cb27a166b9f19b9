"""A deterministic fake LLM server, OpenAI- and Anthropic-compatible, streaming SSE like vLLM.

It stands in for GPU model servers (one instance per pool) in tests, the demo and benchmarks. Every
number it produces is a pure function of the request, so a test can compare what a metering proxy
counted with what the server reported (``GET /fake/stats``, ``GET /fake/served``).

Endpoints
---------
* ``POST /v1/chat/completions`` (OpenAI chat), ``POST /v1/messages`` (Anthropic),
  ``POST /v1/completions`` (OpenAI legacy completions), ``POST /v1/responses`` (OpenAI Responses API),
  ``POST /v1/embeddings`` (OpenAI embeddings).
* ``GET /fake/stats``, ``GET /fake/served``, ``POST /fake/reset``, ``GET /healthz`` (control plane:
  never split, compressed or otherwise hooked).

Deterministic token rules
-------------------------
* ``prompt_tokens`` (Anthropic and Responses: ``input_tokens``) = the number of whitespace-separated
  words in all text content of the request, plus 3 per message / input item:

  - chat and Anthropic: 3 per entry of ``messages`` + the words of its ``content`` when it is a
    string, or of the ``text`` of every ``{"type": "text", ...}`` part when it is a list; other parts
    (images, tool calls, ...) count nothing. Anthropic's top-level ``system`` (string or list of text
    blocks) counts like one more message. Example: one message ``"hello there"`` -> 2 + 3 = 5.
  - Responses API: ``input`` as a string counts like one user message (words + 3); as a list, 3 per
    item + the words of its ``content`` (a string, or the ``text`` of its parts of type
    ``input_text``, ``output_text`` or ``text``); items without content (function call outputs, ...)
    count 3. A non-empty ``instructions`` string counts like one more message.
  - legacy completions ``prompt`` and embeddings ``input``: 3 per item + its words, where an item is
    the string, each string of a list of strings, the whole of a token array (``[1, 2, 3]``: 3 tokens)
    or each token array of a list of token arrays. ``"hello there"`` -> 5; ``["a", "b c"]`` -> 4 + 5.
* ``completion_tokens`` (Anthropic and Responses: ``output_tokens``) = the requested maximum
  (chat: ``max_completion_tokens``, else ``max_tokens``; Anthropic and legacy completions:
  ``max_tokens``; Responses: ``max_output_tokens``), defaulting to 16 when absent, clamped to
  ``[1, 4096]``. Embeddings have none (stats count 0 completion tokens for them).
* The reply text is ``completion_tokens`` words ``"tok0 tok1 ... tokN-1"``. Streams send one token
  per event (``"tok0"``, ``" tok1"``, ...), so the concatenated deltas equal the non-streaming text.
  Legacy completions answer one choice whatever the number of prompts.
* ``finish_reason`` is ``"length"`` (Anthropic ``stop_reason`` ``"max_tokens"``) when the request
  set a maximum, else ``"stop"`` (``"end_turn"``). The Responses API mirrors OpenAI: with
  ``max_output_tokens`` the response is ``status: "incomplete"`` with
  ``incomplete_details.reason: "max_output_tokens"`` and its stream ends with
  ``response.incomplete``; without it, ``status: "completed"`` and ``response.completed``. Either
  carries ``response.usage`` = ``{input_tokens, input_tokens_details: {cached_tokens: 0},
  output_tokens, output_tokens_details: {reasoning_tokens: 0}, total_tokens}``.
* Embeddings: one vector per input item, ``dimensions`` floats (default 1536, at most 4096),
  ``sin(item + 1 + 0.37 j) / 20``; ``encoding_format: "base64"`` sends them as base64 of little-endian
  float32 (as the OpenAI SDKs ask by default). ``usage`` is ``{prompt_tokens, total_tokens}``.

Stream formats
--------------
* chat: ``data:`` chunks (a role chunk, one per token, a finish chunk, then with
  ``stream_options.include_usage`` a usage chunk with ``choices: []``; every other chunk then has
  ``"usage": null``), then ``data: [DONE]``. Legacy completions: the same without the role chunk,
  ``choices[].text`` instead of ``delta``, and a final ``"text": ""`` chunk carrying the finish.
* Anthropic: ``message_start`` (usage ``input_tokens``, ``output_tokens: 1``),
  ``content_block_start``, ``ping``, one ``content_block_delta`` per token, ``content_block_stop``,
  ``message_delta`` (cumulative ``usage.output_tokens``), ``message_stop``.
* Responses: ``event:``/``data:`` pairs, each with ``sequence_number``: ``response.created``,
  ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``, one
  ``response.output_text.delta`` per token, ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``, then ``response.completed`` (or
  ``response.incomplete``) carrying the usage. No ``[DONE]``.

Test hooks (request headers)
----------------------------
Boolean hooks take ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``. An invalid
``x-fake-split``, ``x-fake-seed`` or boolean hook value is answered with a plain (never split or
compressed) 400, as an invalid ``x-fake-cut-after`` on a stream is; an invalid ``x-fake-status`` or
``x-fake-chunk-delay-ms`` is ignored (the latter falls back to the server's delay).

* ``x-fake-status: N`` (400..599): answer status N with an error JSON (Anthropic shape on
  ``/v1/messages``, OpenAI shape elsewhere; both carry ``error.message`` and ``error.type``).
  Nothing is counted.
* ``x-fake-empty-body: 1`` (with ``x-fake-status``): answer that status with no body at all.
* ``x-fake-cut-after: N`` (streaming only; ignored otherwise): close the connection abruptly after N
  token events, before the finish/usage events. Nothing is counted (``cut_streams`` is bumped).
* ``x-fake-close-after-done: 1`` (streaming only; ignored otherwise): write the whole stream,
  including the usage and the terminator (``data: [DONE]``, ``message_stop``, ``response.completed``),
  wait until the socket's write buffer is empty, then close the connection WITHOUT the terminating
  zero-length chunk of the chunked encoding. Counted as a completed stream.
* ``x-fake-no-usage: 1``: report no usage at all: no ``usage`` key anywhere in the body (JSON
  bodies, every stream chunk/event, Anthropic ``message_start``/``message_delta``, Responses
  objects) and no usage chunk even with ``stream_options.include_usage``. Still counted in stats.
* ``x-fake-split: MIN-MAX`` (or ``N`` = ``N-N``; ``off``/``0`` disables the server's ``--split``):
  write every response body of a model endpoint (streams, JSON bodies, error bodies) in pieces of
  random sizes in ``[MIN, MAX]`` bytes, 1 <= MIN <= MAX, each piece its own ``write`` (its own
  send on the socket: the server sets TCP_NODELAY). The body is cut as one byte string, so pieces
  end anywhere: inside an event, inside a multi-byte UTF-8 character, across two events. Before
  each chunk-delay sleep and at the end of the body the pending bytes are written, so no byte waits
  for a later event; such a last piece may be shorter than MIN. JSON bodies are then sent with a
  ``Content-Length``; streams stay chunked (one HTTP chunk per piece). The response echoes the seed
  it used in ``x-fake-seed``.
* ``x-fake-seed: N`` (integer): seed of the split's random sizes (reproducible pieces); without it
  a random seed is drawn per request (and echoed, so a failure can be replayed).
* ``x-fake-unicode: 1`` (``0`` disables the server's ``--unicode``): the reply words contain
  multi-byte UTF-8: word i is ``tök<i>`` (2-byte char), ``日本<i>`` (3-byte chars) or ``🙂<i>``
  (4 bytes) for i mod 3 = 0, 1, 2, e.g. ``"tök0 日本1 🙂2 tök3"``. Token counts are unchanged (still
  one word per token). Not implied by splitting: combine both to cut inside characters.
* ``x-fake-compress: 1`` (``0`` disables the server's ``--compress``): when the request's
  ``Accept-Encoding`` lists ``gzip`` (not with ``q=0``), JSON bodies of model endpoints (replies and
  errors) are gzip-compressed (``Content-Encoding: gzip``, ``Vary: Accept-Encoding``), as many
  servers behind nginx do. Streams are never compressed. With a split, the compressed bytes are cut.
  ``x-fake-compress: always``: compress JSON bodies whatever the request accepts (a misbehaving
  server, or a proxy in front of it that compresses regardless).
* ``x-fake-content-type: T``: send JSON bodies with this Content-Type (servers differ: some add
  ``; charset=utf-8``).
* ``x-fake-chunk-delay-ms: N`` (streaming only): sleep N ms before each token event, overriding
  the server's ``--chunk-delay-ms`` for this request (slow streams for drain and memory tests).

Without these hooks (and server flags) every body is byte-for-byte what earlier versions sent.

Every response carries ``x-fake-pool``, ``x-fake-seen-headers`` (sorted, comma-separated, lowercased
names of the request's ``x-tokenmeter-*`` headers) and ``x-fake-seen-tenant`` (the request's
``x-tokenmeter-tenant`` or empty).

Stats and the served log
------------------------
Stats count the usage of every request the server completed: non-streaming 200s, and streams that
ran to the end (whether or not the client asked for the usage chunk, or the usage was omitted by
``x-fake-no-usage``, or the connection was closed by ``x-fake-close-after-done``). Failed (hooked or
malformed) requests, cut streams and streams whose client went away are not counted. ``by_tenant``
is keyed by ``x-tokenmeter-tenant`` (empty string when absent).

``GET /fake/served`` lists one entry per request a model endpoint answered (the last 100,000, oldest
first), and ``--served-log PATH`` appends the same entry as a JSON line to PATH:
``{"id", "x_tokenmeter_request_id", "tenant", "path", "stream", "status", "prompt_tokens",
"completion_tokens", "completed", "usage_reported"}``. ``id`` is the response id (embeddings, which
have none in their body: ``embd-fake-<pool>-<n>``), null for errors; ``x_tokenmeter_request_id`` is
the request's ``x-tokenmeter-request-id`` header or null; ``tenant`` as in ``by_tenant``; ``stream``
whether the answer was an SSE stream; ``status`` the HTTP status; ``completed`` whether the request
was counted in stats (false for errors, cut streams and clients gone); ``prompt_tokens`` and
``completion_tokens`` what was generated (0 for errors; for a stream not completed, the token events
written before it ended); ``usage_reported`` false under ``x-fake-no-usage`` and for errors.
``POST /fake/reset`` clears the stats and the served list (the log file is append-only).

Run: ``python -m extproc.fakes.model_server --pool h100 --port 8001 [--host 127.0.0.1]
[--chunk-delay-ms 0] [--split MIN-MAX] [--unicode] [--compress] [--served-log PATH]``; the flags
set the server-wide defaults of the corresponding hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import itertools
import logging
import math
import random
import signal
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import uvloop
from aiohttp import web

log = logging.getLogger("tokenmeter.fake_model_server")

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 4096
TOKENS_PER_MESSAGE = 3
DEFAULT_MODEL = "fake-model"
DEFAULT_EMBEDDING_DIMENSIONS = 1536
MAX_EMBEDDING_DIMENSIONS = 4096
SERVED_KEEP = 100_000
TENANT_HEADER = "x-tokenmeter-tenant"
REQUEST_ID_HEADER = "x-tokenmeter-request-id"
ATTRIBUTION_PREFIX = "x-tokenmeter-"
FLUSH_TIMEOUT_S = 5.0

_WORDS: tuple[str, ...] = tuple(f"tok{i}" for i in range(MAX_TOKENS_CAP))
_UNICODE_STEMS = ("tök", "日本", "🙂")  # 2-, 3- and 4-byte UTF-8 characters
_UNICODE_WORDS: tuple[str, ...] = tuple(f"{_UNICODE_STEMS[i % 3]}{i}" for i in range(MAX_TOKENS_CAP))


def _deltas(words: tuple[str, ...]) -> tuple[str, ...]:
    """Stream deltas: the first token bare, every later one with its leading space."""
    return (words[0], *(" " + w for w in words[1:]))


_DELTAS = _deltas(_WORDS)
_UNICODE_DELTAS = _deltas(_UNICODE_WORDS)

_JSON = "application/json"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_CHAT_TEXT = frozenset({"text"})
_RESPONSES_TEXT = frozenset({"input_text", "output_text", "text"})

Split = tuple[int, int]


# --------------------------------------------------------------------------- state


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class _Served:
    """One answered request, as listed by ``/fake/served`` and the served log."""

    id: str | None
    x_tokenmeter_request_id: str | None
    tenant: str
    path: str
    stream: bool
    status: int
    prompt_tokens: int
    completion_tokens: int
    completed: bool
    usage_reported: bool


@dataclass
class _State:
    pool: str
    chunk_delay_s: float
    split: Split | None = None
    unicode: bool = False
    compress: bool = False
    served_log: Path | None = None
    total: _Usage = field(default_factory=_Usage)
    by_tenant: dict[str, _Usage] = field(default_factory=dict)
    cut_streams: int = 0
    served: deque[_Served] = field(default_factory=lambda: deque(maxlen=SERVED_KEEP))
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def record(self, tenant: str, prompt: int, completion: int) -> None:
        self.total.add(prompt, completion)
        usage = self.by_tenant.get(tenant)
        if usage is None:
            usage = self.by_tenant[tenant] = _Usage()
        usage.add(prompt, completion)

    def log_served(self, entry: _Served) -> None:
        self.served.append(entry)
        if self.served_log is not None:
            with self.served_log.open("ab") as f:
                f.write(orjson.dumps(entry) + b"\n")

    def reset(self) -> None:
        self.total = _Usage()
        self.by_tenant = {}
        self.cut_streams = 0
        self.served.clear()


STATE: web.AppKey[_State] = web.AppKey("fake_model_server_state", _State)


class _BadRequest(Exception):
    """A request the fake rejects with a 400."""


# --------------------------------------------------------------------------- hooks


@dataclass
class _Hooks:
    """The per-request behaviour switches (request headers over server defaults)."""

    split: Split | None
    seed: int
    unicode: bool
    compress: bool  # already requires the client to accept gzip
    close_after_done: bool
    no_usage: bool
    delay_s: float

    def rng(self) -> random.Random:
        return random.Random(self.seed)

    def headers(self) -> dict[str, str]:
        return {"x-fake-seed": str(self.seed)} if self.split is not None else {}


def parse_split(text: str) -> Split | None:
    """``MIN-MAX`` or ``N`` (1 <= MIN <= MAX) -> (MIN, MAX); ``off``/``0`` -> None; else ValueError."""
    value = text.strip().lower()
    if value in ("off", "0"):
        return None
    lo_s, sep, hi_s = value.partition("-")
    lo = int(lo_s)
    hi = int(hi_s) if sep else lo
    if not 1 <= lo <= hi:
        raise ValueError(f"split range must be MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.headers.get(name)
    if raw is None or (name == "x-fake-compress" and raw.strip().lower() == "always"):
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _BadRequest(f"{name} must be 1 or 0")


def _split_hook(request: web.Request, default: Split | None) -> Split | None:
    raw = request.headers.get("x-fake-split")
    if raw is None:
        return default
    try:
        return parse_split(raw)
    except ValueError:
        raise _BadRequest("x-fake-split must be MIN-MAX with 1 <= MIN <= MAX, N, or off") from None


def _seed_hook(request: web.Request) -> int:
    raw = request.headers.get("x-fake-seed")
    if raw is None:
        return random.getrandbits(32)
    try:
        return int(raw)
    except ValueError:
        raise _BadRequest("x-fake-seed must be an integer") from None


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() != "gzip":
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                if float(q[2:]) == 0:
                    continue
            except ValueError:
                continue
        return True
    return False


def _chunk_delay(request: web.Request, state: _State) -> float:
    raw = request.headers.get("x-fake-chunk-delay-ms")
    if raw is None:
        return state.chunk_delay_s
    try:
        return max(0.0, float(raw) / 1000.0)
    except ValueError:
        return state.chunk_delay_s


def _parse_hooks(request: web.Request, state: _State) -> _Hooks:
    always = request.headers.get("x-fake-compress", "").strip().lower() == "always"
    compress = always or _flag(request, "x-fake-compress", state.compress)  # always: not a _flag value
    return _Hooks(
        split=_split_hook(request, state.split),
        seed=_seed_hook(request),
        unicode=_flag(request, "x-fake-unicode", state.unicode),
        compress=compress and (always or _accepts_gzip(request.headers.get("Accept-Encoding", ""))),
        close_after_done=_flag(request, "x-fake-close-after-done", False),
        no_usage=_flag(request, "x-fake-no-usage", False),
        delay_s=_chunk_delay(request, state),
    )


def _forced_status(request: web.Request) -> int | None:
    raw = request.headers.get("x-fake-status")
    if raw is None:
        return None
    try:
        status = int(raw)
    except ValueError:
        return None
    return status if 400 <= status <= 599 else None


def _tenant(request: web.Request) -> str:
    return request.headers.get(TENANT_HEADER, "")


# --------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class _Gen:
    """What the fake will answer for one generation request."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    requested: int | None  # the request's maximum, if it set one (-> finish_reason "length")
    stream: bool
    include_usage: bool
    cut_after: int | None

    @property
    def capped(self) -> bool:
        return self.requested is not None


@dataclass(frozen=True)
class _EmbedRequest:
    model: str
    items: int
    prompt_tokens: int
    dimensions: int
    base64: bool


def _text_words(content: Any, text_types: frozenset[str] = _CHAT_TEXT) -> int:
    if isinstance(content, str):
        return len(content.split())
    words = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in text_types:
                text = part.get("text")
                if isinstance(text, str):
                    words += len(text.split())
    return words


def count_prompt_tokens(messages: list[Any], system: Any = None, *, text_types: frozenset[str] = _CHAT_TEXT) -> int:
    """Words of all text content + 3 per message (a non-empty ``system`` counts as a message)."""
    tokens = 0
    for message in messages:
        tokens += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            tokens += _text_words(message.get("content"), text_types)
    if system:
        tokens += TOKENS_PER_MESSAGE + _text_words(system, text_types)
    return tokens


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def item_token_counts(value: Any) -> list[int] | None:
    """Tokens of each item of a completions ``prompt`` / embeddings ``input`` (without the +3), or None.

    A string is one item of its words; a list of strings, one item per string; a token array one
    item of its length; a list of token arrays, one item per array.
    """
    if isinstance(value, str):
        return [len(value.split())]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return [len(v.split()) for v in value]
    if all(_is_token_id(v) for v in value):
        return [len(value)]
    if all(isinstance(v, list) and all(_is_token_id(t) for t in v) for v in value):
        return [len(v) for v in value]
    return None


def completion_tokens_for(requested: int | None) -> int:
    """The requested maximum (default 16), clamped to [1, 4096]."""
    n = DEFAULT_MAX_TOKENS if requested is None else requested
    return max(1, min(n, MAX_TOKENS_CAP))


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"'{key}' must be an integer")
    return value


async def _load_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str):
        raise _BadRequest("'model' must be a string")
    return model or DEFAULT_MODEL


def _cut_after(request: web.Request) -> int | None:
    raw = request.headers.get("x-fake-cut-after")
    if raw is None:
        return None
    try:
        cut_after = int(raw)
    except ValueError:
        raise _BadRequest("x-fake-cut-after must be an integer") from None
    if cut_after < 0:
        raise _BadRequest("x-fake-cut-after must be >= 0")
    return cut_after


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _gen(
    request: web.Request, body: dict[str, Any], *, prompt: int, requested: int | None, include_usage: bool
) -> _Gen:
    model = _model(body)
    stream = body.get("stream") is True
    return _Gen(
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion_tokens_for(requested),
        requested=requested,
        stream=stream,
        include_usage=include_usage,
        cut_after=_cut_after(request) if stream else None,
    )


def _messages_list(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest("'messages' must be a list")
    return messages


def _parse_chat(request: web.Request, body: dict[str, Any]) -> _Gen:
    messages = _messages_list(body)
    requested = _opt_int(body, "max_completion_tokens")
    if requested is None:
        requested = _opt_int(body, "max_tokens")
    return _gen(
        request, body, prompt=count_prompt_tokens(messages), requested=requested, include_usage=_include_usage(body)
    )


def _parse_anthropic(request: web.Request, body: dict[str, Any]) -> _Gen:
    messages = _messages_list(body)
    prompt = count_prompt_tokens(messages, body.get("system"))
    return _gen(request, body, prompt=prompt, requested=_opt_int(body, "max_tokens"), include_usage=True)


def _parse_completions(request: web.Request, body: dict[str, Any]) -> _Gen:
    counts = item_token_counts(body.get("prompt"))
    if counts is None:
        raise _BadRequest("'prompt' must be a string, a list of strings, a token array or a list of token arrays")
    prompt = sum(counts) + TOKENS_PER_MESSAGE * len(counts)
    return _gen(
        request, body, prompt=prompt, requested=_opt_int(body, "max_tokens"), include_usage=_include_usage(body)
    )


def _parse_responses(request: web.Request, body: dict[str, Any]) -> _Gen:
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        items: list[Any] = [{"role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        items = raw_input
    else:
        raise _BadRequest("'input' must be a string or a list")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _BadRequest("'instructions' must be a string")
    prompt = count_prompt_tokens(items, instructions, text_types=_RESPONSES_TEXT)
    return _gen(request, body, prompt=prompt, requested=_opt_int(body, "max_output_tokens"), include_usage=True)


def _parse_embeddings(body: dict[str, Any]) -> _EmbedRequest:
    counts = item_token_counts(body.get("input"))
    if counts is None:
        raise _BadRequest("'input' must be a string, a list of strings, a token array or a list of token arrays")
    dimensions = _opt_int(body, "dimensions")
    if dimensions is not None and dimensions < 1:
        raise _BadRequest("'dimensions' must be >= 1")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest("'encoding_format' must be 'float' or 'base64'")
    return _EmbedRequest(
        model=_model(body),
        items=len(counts),
        prompt_tokens=sum(counts) + TOKENS_PER_MESSAGE * len(counts),
        dimensions=min(dimensions or DEFAULT_EMBEDDING_DIMENSIONS, MAX_EMBEDDING_DIMENSIONS),
        base64=encoding == "base64",
    )


# --------------------------------------------------------------------------- body writing


class _BodyWriter:
    """Writes one response body: each part as it comes, or cut into pieces of random sizes.

    With a split, written parts are queued as one byte string and cut into pieces of
    ``rng.randint(MIN, MAX)`` bytes, each its own ``resp.write`` (one send: TCP_NODELAY is on), with
    a yield to the loop between pieces; ``flush`` writes what is queued (a possibly shorter piece).
    """

    def __init__(self, resp: web.StreamResponse, split: Split | None, rng: random.Random) -> None:
        self._resp = resp
        self._split = split
        self._rng = rng
        self._pending = bytearray()
        self._next = self._draw()

    def _draw(self) -> int:
        return self._rng.randint(*self._split) if self._split is not None else 0

    async def write(self, data: bytes) -> None:
        if self._split is None:
            await self._resp.write(data)
            return
        self._pending += data
        while len(self._pending) >= self._next:
            piece = bytes(self._pending[: self._next])
            del self._pending[: self._next]
            await self._send(piece)
            self._next = self._draw()

    async def flush(self) -> None:
        if self._pending:
            piece = bytes(self._pending)
            self._pending.clear()
            await self._send(piece)

    async def _send(self, piece: bytes) -> None:
        await self._resp.write(piece)  # aiohttp drains when its buffer passes 64 KiB
        await asyncio.sleep(0)


def _gzip_headers(body: bytes) -> tuple[bytes, dict[str, str]]:
    return gzip.compress(body, mtime=0), {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}


async def _send_json(request: web.Request, payload: Any, hooks: _Hooks | None, status: int = 200) -> web.StreamResponse:
    """A JSON body, compressed and/or split as the hooks say (plain ``web.Response`` otherwise)."""
    body = orjson.dumps(payload)
    headers: dict[str, str] = {}
    if hooks is not None and hooks.compress:
        body, headers = _gzip_headers(body)
    if hooks is None or hooks.split is None:
        return web.Response(body=body, status=status, content_type=_JSON, headers=headers)
    resp = web.StreamResponse(status=status, headers={**headers, **hooks.headers()})
    resp.content_type = _JSON
    resp.content_length = len(body)
    await resp.prepare(request)
    out = _BodyWriter(resp, hooks.split, hooks.rng())
    try:
        await out.write(body)
        await out.flush()
        await resp.write_eof()
    except ConnectionError:
        pass  # client went away
    return resp


def _sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_event(event: bytes, payload: Any) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _cut(request: web.Request, state: _State) -> None:
    """Drop the connection mid-stream: buffered bytes go out, then FIN with no terminating chunk."""
    state.cut_streams += 1
    if request.transport is not None:
        request.transport.close()


async def _close_without_eof(request: web.Request) -> None:
    """Wait until the socket took every written byte, then close it: no terminating chunk."""
    transport = request.transport
    if transport is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FLUSH_TIMEOUT_S
    # No event tells when the transport's buffer empties (drain only waits while it is paused): poll.
    while transport.get_write_buffer_size() > 0 and not transport.is_closing() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    transport.close()


# --------------------------------------------------------------------------- replies


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _error_payload(status: int, message: str, *, anthropic: bool) -> dict[str, Any]:
    err_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if anthropic:
        return {"type": "error", "error": {"type": err_type, "message": message}}
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


@dataclass(frozen=True)
class _Reply:
    """One generation being answered: its id, the request's numbers and the output switches."""

    id: str
    created: int
    gen: _Gen
    unicode: bool
    usage: bool  # report usage (False under x-fake-no-usage)

    @property
    def n(self) -> int:
        return self.gen.completion_tokens

    def text(self) -> str:
        return " ".join((_UNICODE_WORDS if self.unicode else _WORDS)[: self.n])

    def delta(self, i: int) -> str:
        return (_UNICODE_DELTAS if self.unicode else _DELTAS)[i]

    def openai_usage(self) -> dict[str, int]:
        p, n = self.gen.prompt_tokens, self.n
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def finish_reason(self) -> str:
        return "length" if self.gen.capped else "stop"


class _Events(Protocol):
    """A stream's events, built when written (``bench/upstream.py`` stamps send times in them)."""

    def head(self) -> list[bytes]: ...  # before the first token event

    def token(self, i: int) -> bytes: ...

    def tail(self) -> list[bytes]: ...  # finish + usage: the request counts once these are out

    def end(self) -> list[bytes]: ...  # the terminator


# -- OpenAI chat and legacy completions


def _chat_body(r: _Reply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.gen.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text()},
                "logprobs": None,
                "finish_reason": r.finish_reason(),
            }
        ],
    }
    if r.usage:
        body["usage"] = r.openai_usage()
    return body


def _completions_body(r: _Reply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": r.id,
        "object": "text_completion",
        "created": r.created,
        "model": r.gen.model,
        "choices": [{"text": r.text(), "index": 0, "logprobs": None, "finish_reason": r.finish_reason()}],
    }
    if r.usage:
        body["usage"] = r.openai_usage()
    return body


class _OpenAIChunks:
    """Data-only SSE chunks ending in ``data: [DONE]``; the usage chunk only with include_usage."""

    object_name = "chat.completion.chunk"

    def __init__(self, r: _Reply) -> None:
        self._r = r
        self._usage_chunk = r.gen.include_usage and r.usage
        self._base: dict[str, Any] = {
            "id": r.id,
            "object": self.object_name,
            "created": r.created,
            "model": r.gen.model,
        }
        if self._usage_chunk:
            self._base["usage"] = None  # as OpenAI does on every chunk but the last when include_usage is set

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse_data({**self._base, "choices": choices, **extra})

    def _choice(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def head(self) -> list[bytes]:
        return [self._chunk([self._choice({"role": "assistant", "content": ""})])]

    def token(self, i: int) -> bytes:
        return self._chunk([self._choice({"content": self._r.delta(i)})])

    def finish(self) -> bytes:
        return self._chunk([self._choice({}, self._r.finish_reason())])

    def tail(self) -> list[bytes]:
        parts = [self.finish()]
        if self._usage_chunk:
            parts.append(self._chunk([], usage=self._r.openai_usage()))
        return parts

    def end(self) -> list[bytes]:
        return [b"data: [DONE]\n\n"]


class _CompletionChunks(_OpenAIChunks):
    """Legacy completions: ``choices[].text``, no role chunk, a last ``"text": ""`` chunk with the finish."""

    object_name = "text_completion"

    def _text_choice(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    def head(self) -> list[bytes]:
        return []

    def token(self, i: int) -> bytes:
        return self._chunk([self._text_choice(self._r.delta(i))])

    def finish(self) -> bytes:
        return self._chunk([self._text_choice("", self._r.finish_reason())])


# -- Anthropic


def _stop_reason(r: _Reply) -> str:
    return "max_tokens" if r.gen.capped else "end_turn"


def _with_usage(payload: dict[str, Any], r: _Reply, usage: dict[str, int]) -> dict[str, Any]:
    if r.usage:
        payload["usage"] = usage
    return payload


def _anthropic_body(r: _Reply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": r.id,
        "type": "message",
        "role": "assistant",
        "model": r.gen.model,
        "content": [{"type": "text", "text": r.text()}],
        "stop_reason": _stop_reason(r),
        "stop_sequence": None,
    }
    return _with_usage(body, r, {"input_tokens": r.gen.prompt_tokens, "output_tokens": r.n})


class _AnthropicEvents:
    def __init__(self, r: _Reply) -> None:
        self._r = r

    def head(self) -> list[bytes]:
        r = self._r
        message: dict[str, Any] = {
            "id": r.id,
            "type": "message",
            "role": "assistant",
            "model": r.gen.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        _with_usage(message, r, {"input_tokens": r.gen.prompt_tokens, "output_tokens": 1})
        return [
            _sse_event(b"message_start", {"type": "message_start", "message": message})
            + _sse_event(
                b"content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + _sse_event(b"ping", {"type": "ping"})
        ]

    def token(self, i: int) -> bytes:
        return _sse_event(
            b"content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": self._r.delta(i)}},
        )

    def tail(self) -> list[bytes]:
        r = self._r
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(r), "stop_sequence": None},
        }
        _with_usage(delta, r, {"output_tokens": r.n})
        return [
            _sse_event(b"content_block_stop", {"type": "content_block_stop", "index": 0})
            + _sse_event(b"message_delta", delta)
        ]

    def end(self) -> list[bytes]:
        return [_sse_event(b"message_stop", {"type": "message_stop"})]


# -- OpenAI Responses API


def _responses_usage(r: _Reply) -> dict[str, Any]:
    p, n = r.gen.prompt_tokens, r.n
    return {
        "input_tokens": p,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + n,
    }


def _responses_status(r: _Reply) -> str:
    return "incomplete" if r.gen.capped else "completed"


def _message_id(r: _Reply) -> str:
    return "msg_" + r.id.removeprefix("resp_")


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _output_message(r: _Reply, *, done: bool) -> dict[str, Any]:
    return {
        "id": _message_id(r),
        "type": "message",
        "status": _responses_status(r) if done else "in_progress",
        "role": "assistant",
        "content": [_output_text(r.text())] if done else [],
    }


def _response_object(r: _Reply, *, done: bool) -> dict[str, Any]:
    """The Responses API object: in progress (no output yet) or done (output and usage)."""
    obj: dict[str, Any] = {
        "id": r.id,
        "object": "response",
        "created_at": r.created,
        "status": _responses_status(r) if done else "in_progress",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and r.gen.capped else None,
        "instructions": None,
        "max_output_tokens": r.gen.requested,
        "model": r.gen.model,
        "output": [_output_message(r, done=True)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
    }
    if r.usage:
        obj["usage"] = _responses_usage(r) if done else None
    obj["user"] = None
    obj["metadata"] = {}
    return obj


class _ResponsesEvents:
    def __init__(self, r: _Reply) -> None:
        self._r = r
        self._seq = itertools.count()
        self._item_id = _message_id(r)

    def _event(self, name: str, payload: dict[str, Any]) -> bytes:
        return _sse_event(name.encode(), {"type": name, "sequence_number": next(self._seq), **payload})

    def _part(self, name: str, **payload: Any) -> bytes:
        return self._event(name, {"item_id": self._item_id, "output_index": 0, "content_index": 0, **payload})

    def head(self) -> list[bytes]:
        r = self._r
        return [
            self._event("response.created", {"response": _response_object(r, done=False)}),
            self._event("response.in_progress", {"response": _response_object(r, done=False)}),
            self._event("response.output_item.added", {"output_index": 0, "item": _output_message(r, done=False)}),
            self._part("response.content_part.added", part=_output_text("")),
        ]

    def token(self, i: int) -> bytes:
        return self._part("response.output_text.delta", delta=self._r.delta(i), logprobs=[])

    def tail(self) -> list[bytes]:
        r = self._r
        text = r.text()
        final = "response.incomplete" if r.gen.capped else "response.completed"
        return [
            self._part("response.output_text.done", text=text, logprobs=[]),
            self._part("response.content_part.done", part=_output_text(text)),
            self._event("response.output_item.done", {"output_index": 0, "item": _output_message(r, done=True)}),
            self._event(final, {"response": _response_object(r, done=True)}),
        ]

    def end(self) -> list[bytes]:
        return []


# -- embeddings


def embedding_vector(index: int, dimensions: int) -> list[float]:
    """The deterministic vector of input item ``index``."""
    return [math.sin(index + 1 + 0.37 * j) / 20 for j in range(dimensions)]


def _embeddings_body(req: _EmbedRequest, *, usage: bool) -> dict[str, Any]:
    data = []
    for i in range(req.items):
        vector = embedding_vector(i, req.dimensions)
        encoded: Any = vector
        if req.base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    body: dict[str, Any] = {"object": "list", "data": data, "model": req.model}
    if usage:
        body["usage"] = {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens}
    return body


# --------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class _Api:
    """One generation endpoint: how to parse its request and shape its replies."""

    anthropic: bool  # error shape
    id_format: str  # .format(pool=..., seq=...)
    parse: Callable[[web.Request, dict[str, Any]], _Gen]
    body: Callable[[_Reply], dict[str, Any]]
    events: Callable[[_Reply], _Events]


_CHAT = _Api(False, "chatcmpl-fake-{pool}-{seq}", _parse_chat, _chat_body, _OpenAIChunks)
_COMPLETIONS = _Api(False, "cmpl-fake-{pool}-{seq}", _parse_completions, _completions_body, _CompletionChunks)
_ANTHROPIC = _Api(True, "msg_fake_{pool}_{seq}", _parse_anthropic, _anthropic_body, _AnthropicEvents)
_RESPONSES = _Api(
    False,
    "resp_fake_{pool}_{seq}",
    _parse_responses,
    lambda r: _response_object(r, done=True),
    _ResponsesEvents,
)


def _log_served(
    request: web.Request,
    *,
    id: str | None,
    stream: bool,
    status: int,
    prompt: int = 0,
    completion: int = 0,
    completed: bool = False,
    usage_reported: bool = False,
) -> None:
    request.app[STATE].log_served(
        _Served(
            id=id,
            x_tokenmeter_request_id=request.headers.get(REQUEST_ID_HEADER),
            tenant=_tenant(request),
            path=request.path,
            stream=stream,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            completed=completed,
            usage_reported=usage_reported,
        )
    )


async def _answer_error(
    request: web.Request, hooks: _Hooks | None, status: int, message: str, *, anthropic: bool, empty: bool = False
) -> web.StreamResponse:
    _log_served(request, id=None, stream=False, status=status)
    if empty:
        return web.Response(status=status)
    return await _send_json(request, _error_payload(status, message, anthropic=anthropic), hooks, status)


async def _start(request: web.Request, *, anthropic: bool) -> _Hooks | web.StreamResponse:
    """The request's hooks, or the error answer (a bad hook, or ``x-fake-status``)."""
    try:
        hooks = _parse_hooks(request, request.app[STATE])
    except _BadRequest as exc:
        return await _answer_error(request, None, 400, str(exc), anthropic=anthropic)
    forced = _forced_status(request)
    if forced is not None:
        message = f"fake upstream failure ({forced}) requested by x-fake-status"
        empty = bool(request.headers.get("x-fake-empty-body"))
        return await _answer_error(request, hooks, forced, message, anthropic=anthropic, empty=empty)
    return hooks


async def _stream(request: web.Request, hooks: _Hooks, reply: _Reply, events: _Events) -> web.StreamResponse:
    """Write a stream: head, token events (cut or delayed as hooked), tail (then counted), end."""
    state = request.app[STATE]
    gen = reply.gen
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **hooks.headers()})
    await resp.prepare(request)
    out = _BodyWriter(resp, hooks.split, hooks.rng())
    limit = reply.n if gen.cut_after is None else min(reply.n, gen.cut_after)
    sent = 0
    completed = False
    try:
        for part in events.head():
            await out.write(part)
        for i in range(limit):
            if hooks.delay_s > 0:
                await out.flush()
                await asyncio.sleep(hooks.delay_s)
            await out.write(events.token(i))
            sent += 1
        if gen.cut_after is not None:
            await out.flush()
            _cut(request, state)
            return resp
        for part in events.tail():
            await out.write(part)
        state.record(_tenant(request), gen.prompt_tokens, reply.n)
        completed = True
        for part in events.end():
            await out.write(part)
        await out.flush()
        if hooks.close_after_done:
            await _close_without_eof(request)
        else:
            await resp.write_eof()
    except ConnectionError:
        pass  # client went away; nothing more to do
    finally:
        _log_served(
            request,
            id=reply.id,
            stream=True,
            status=resp.status,
            prompt=gen.prompt_tokens,
            completion=reply.n if completed else sent,
            completed=completed,
            usage_reported=reply.usage,
        )
    return resp


async def _generate(request: web.Request, api: _Api) -> web.StreamResponse:
    """Answer one generation request of ``api`` (JSON or stream)."""
    state = request.app[STATE]
    started = await _start(request, anthropic=api.anthropic)
    if not isinstance(started, _Hooks):
        return started
    hooks = started
    try:
        gen = api.parse(request, await _load_json(request))
    except _BadRequest as exc:
        return await _answer_error(request, hooks, 400, str(exc), anthropic=api.anthropic)

    reply = _Reply(
        id=api.id_format.format(pool=state.pool, seq=next(state.ids)),
        created=int(time.time()),
        gen=gen,
        unicode=hooks.unicode,
        usage=not hooks.no_usage,
    )
    if gen.stream:
        return await _stream(request, hooks, reply, api.events(reply))
    state.record(_tenant(request), gen.prompt_tokens, reply.n)
    _log_served(
        request,
        id=reply.id,
        stream=False,
        status=200,
        prompt=gen.prompt_tokens,
        completion=reply.n,
        completed=True,
        usage_reported=reply.usage,
    )
    return await _send_json(request, api.body(reply), hooks)


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, _CHAT)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, _COMPLETIONS)


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _generate(request, _ANTHROPIC)


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _generate(request, _RESPONSES)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = await _start(request, anthropic=False)
    if not isinstance(started, _Hooks):
        return started
    hooks = started
    try:
        req = _parse_embeddings(await _load_json(request))
    except _BadRequest as exc:
        return await _answer_error(request, hooks, 400, str(exc), anthropic=False)

    emb_id = f"embd-fake-{state.pool}-{next(state.ids)}"
    state.record(_tenant(request), req.prompt_tokens, 0)
    _log_served(
        request,
        id=emb_id,
        stream=False,
        status=200,
        prompt=req.prompt_tokens,
        completed=True,
        usage_reported=not hooks.no_usage,
    )
    return await _send_json(request, _embeddings_body(req, usage=not hooks.no_usage), hooks)


# -- control plane


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json(
        {
            "pool": state.pool,
            **state.total.as_dict(),
            "cut_streams": state.cut_streams,
            "by_tenant": {tenant: u.as_dict() for tenant, u in sorted(state.by_tenant.items())},
        }
    )


async def _served(request: web.Request) -> web.Response:
    return _json(list(request.app[STATE].served))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"ok": True})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "pool": request.app[STATE].pool})


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.headers
    # also the underscore spelling, which a CGI/WSGI-style server would fold into the same name
    seen = sorted({k.lower() for k in headers
                   if k.lower().replace("_", "-").startswith(ATTRIBUTION_PREFIX)})
    response.headers["x-fake-pool"] = request.app[STATE].pool
    response.headers["x-fake-seen-headers"] = ",".join(seen)
    response.headers["x-fake-seen-tenant"] = headers.get(TENANT_HEADER, "")
    forced_type = headers.get("x-fake-content-type")
    if forced_type and response.headers.get("content-type", "").startswith(_JSON):
        response.headers["content-type"] = forced_type  # e.g. llama.cpp's "application/json; charset=utf-8"


def build_app(
    pool: str,
    *,
    chunk_delay_s: float = 0.0,
    split: Split | None = None,
    unicode: bool = False,
    compress: bool = False,
    served_log: str | Path | None = None,
) -> web.Application:
    """The fake server for one pool; the keywords are the server-wide defaults of the hooks.

    ``chunk_delay_s`` is slept before each streamed token event; ``split``, ``unicode`` and
    ``compress`` are the defaults of ``x-fake-split``, ``x-fake-unicode`` and ``x-fake-compress``;
    ``served_log`` is a file the served entries are appended to.
    """
    if split is not None and not 1 <= split[0] <= split[1]:
        raise ValueError(f"split must satisfy 1 <= MIN <= MAX, got {split}")
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = _State(
        pool=pool,
        chunk_delay_s=max(0.0, chunk_delay_s),
        split=split,
        unicode=unicode,
        compress=compress,
        served_log=Path(served_log) if served_log is not None else None,
    )
    app.on_response_prepare.append(_stamp_headers)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/fake/stats", _stats)
    app.router.add_get("/fake/served", _served)
    app.router.add_post("/fake/reset", _reset)
    app.router.add_get("/healthz", _healthz)
    return app


# --------------------------------------------------------------------------- CLI


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0][1] if runner.addresses else port
        state = app[STATE]
        log.info(
            "fake model server pool=%s listening on http://%s:%s (chunk delay %.1f ms, split %s, unicode %s, "
            "compress %s, served log %s)",
            state.pool,
            host,
            bound,
            state.chunk_delay_s * 1000,
            "off" if state.split is None else f"{state.split[0]}-{state.split[1]}",
            state.unicode,
            state.compress,
            state.served_log,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def _split_arg(text: str) -> Split | None:
    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.fakes.model_server",
        description="Deterministic OpenAI/Anthropic-compatible fake model server (one per pool).",
    )
    parser.add_argument("--pool", required=True, help="pool name, echoed in x-fake-pool")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="sleep before each token event")
    parser.add_argument(
        "--split", type=_split_arg, default=None, metavar="MIN-MAX", help="default of x-fake-split (random writes)"
    )
    parser.add_argument("--unicode", action="store_true", help="default of x-fake-unicode (multi-byte words)")
    parser.add_argument("--compress", action="store_true", help="default of x-fake-compress (gzip JSON bodies)")
    parser.add_argument("--served-log", default=None, metavar="PATH", help="append one JSON line per answered request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    app = build_app(
        args.pool,
        chunk_delay_s=args.chunk_delay_ms / 1000.0,
        split=args.split,
        unicode=args.unicode,
        compress=args.compress,
        served_log=args.served_log,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
