"""A deterministic fake LLM server, OpenAI- and Anthropic-compatible, streaming SSE like vLLM.

It stands in for GPU model servers (one instance per pool) in tests, the demo and benchmarks. Every
number it produces is a pure function of the request, so a test can compare what a metering proxy
counted with what the server reported (``GET /fake/stats``).

Deterministic token rules
-------------------------
* ``prompt_tokens`` (Anthropic: ``input_tokens``) = the number of whitespace-separated words in all
  text content of the request, plus 3 per message. Text content is a message's ``content`` when it
  is a string, or the ``text`` of every ``{"type": "text", ...}`` part when it is a list; other parts
  (images, tool calls, ...) count nothing. Anthropic's top-level ``system`` (string or list of text
  blocks) counts like one more message. Example: one message ``"hello there"`` -> 2 + 3 = 5.
* ``completion_tokens`` (Anthropic: ``output_tokens``) = the requested maximum
  (OpenAI: ``max_completion_tokens``, else ``max_tokens``; Anthropic: ``max_tokens``), defaulting to
  16 when absent, clamped to ``[1, 4096]``.
* The reply text is ``completion_tokens`` words ``"tok0 tok1 ... tokN-1"``. Streams send one token
  per event (``"tok0"``, ``" tok1"``, ...), so the concatenated deltas equal the non-streaming text.
* ``finish_reason`` is ``"length"`` (Anthropic ``stop_reason`` ``"max_tokens"``) when the request
  set a maximum, else ``"stop"`` (``"end_turn"``).

Test hooks (request headers)
----------------------------
* ``x-fake-status: N`` (400..599): answer status N with an error JSON (OpenAI shape on
  ``/v1/chat/completions``, Anthropic shape on ``/v1/messages``; both carry ``error.message`` and
  ``error.type``). Nothing is counted.
* ``x-fake-empty-body: 1`` (with ``x-fake-status``): answer that status with no body at all.
* ``x-fake-cut-after: N`` (streaming only; ignored otherwise): close the connection abruptly after N
  token events, before the finish/usage events. Nothing is counted (``cut_streams`` is bumped).
* ``x-fake-content-type: T``: send JSON bodies with this Content-Type (servers differ: some add
  ``; charset=utf-8``).
* ``x-fake-chunk-delay-ms: N`` (streaming only): sleep N ms before each token event, overriding
  the server's ``--chunk-delay-ms`` for this request (slow streams for drain and memory tests).

Every response carries ``x-fake-pool``, ``x-fake-seen-headers`` (sorted, comma-separated, lowercased
names of the request's ``x-tokenmeter-*`` headers) and ``x-fake-seen-tenant`` (the request's
``x-tokenmeter-tenant`` or empty).

Stats count the usage of every request the server completed: non-streaming 200s, and streams that
ran to the end (whether or not the client asked for the usage chunk). Failed (hooked or malformed)
requests, cut streams and streams whose client went away are not counted. ``by_tenant`` is keyed by
``x-tokenmeter-tenant`` (empty string when absent).

Run: ``python -m extproc.fakes.model_server --pool h100 --port 8001 [--host 127.0.0.1]
[--chunk-delay-ms 0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web

log = logging.getLogger("tokenmeter.fake_model_server")

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 4096
TOKENS_PER_MESSAGE = 3
DEFAULT_MODEL = "fake-model"
TENANT_HEADER = "x-tokenmeter-tenant"
ATTRIBUTION_PREFIX = "x-tokenmeter-"

_WORDS: tuple[str, ...] = tuple(f"tok{i}" for i in range(MAX_TOKENS_CAP))
# Stream deltas: the first token bare, every later one with its leading space.
_DELTAS: tuple[str, ...] = (_WORDS[0], *(" " + w for w in _WORDS[1:]))

_JSON = "application/json"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
}


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


@dataclass
class _State:
    pool: str
    chunk_delay_s: float
    total: _Usage = field(default_factory=_Usage)
    by_tenant: dict[str, _Usage] = field(default_factory=dict)
    cut_streams: int = 0
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def record(self, tenant: str, prompt: int, completion: int) -> None:
        self.total.add(prompt, completion)
        usage = self.by_tenant.get(tenant)
        if usage is None:
            usage = self.by_tenant[tenant] = _Usage()
        usage.add(prompt, completion)

    def reset(self) -> None:
        self.total = _Usage()
        self.by_tenant = {}
        self.cut_streams = 0


STATE: web.AppKey[_State] = web.AppKey("fake_model_server_state", _State)


class _BadRequest(Exception):
    """A request the fake rejects with a 400."""


@dataclass(frozen=True)
class _Gen:
    """What the fake will answer for one request."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    capped: bool  # the request set a maximum (-> finish_reason "length")
    stream: bool
    include_usage: bool
    cut_after: int | None


# --------------------------------------------------------------------------- request parsing


def _text_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    words = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    words += len(text.split())
    return words


def count_prompt_tokens(messages: list[Any], system: Any = None) -> int:
    """Words of all text content + 3 per message (a non-empty ``system`` counts as a message)."""
    tokens = 0
    for message in messages:
        tokens += TOKENS_PER_MESSAGE
        if isinstance(message, dict):
            tokens += _text_words(message.get("content"))
    if system:
        tokens += TOKENS_PER_MESSAGE + _text_words(system)
    return tokens


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


async def _parse(request: web.Request, *, anthropic: bool) -> _Gen:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest("'messages' must be a list")
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str):
        raise _BadRequest("'model' must be a string")

    if anthropic:
        requested = _opt_int(body, "max_tokens")
        prompt = count_prompt_tokens(messages, body.get("system"))
        include_usage = True
    else:
        requested = _opt_int(body, "max_completion_tokens")
        if requested is None:
            requested = _opt_int(body, "max_tokens")
        prompt = count_prompt_tokens(messages)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

    stream = body.get("stream") is True
    cut_after: int | None = None
    cut_raw = request.headers.get("x-fake-cut-after")
    if cut_raw is not None and stream:
        try:
            cut_after = int(cut_raw)
        except ValueError:
            raise _BadRequest("x-fake-cut-after must be an integer") from None
        if cut_after < 0:
            raise _BadRequest("x-fake-cut-after must be >= 0")

    return _Gen(
        model=model or DEFAULT_MODEL,
        prompt_tokens=prompt,
        completion_tokens=completion_tokens_for(requested),
        capped=requested is not None,
        stream=stream,
        include_usage=include_usage,
        cut_after=cut_after,
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


# --------------------------------------------------------------------------- responses


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


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


def _error(status: int, message: str, *, anthropic: bool) -> web.Response:
    err_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if anthropic:
        return _json({"type": "error", "error": {"type": err_type, "message": message}}, status)
    return _json({"error": {"message": message, "type": err_type, "param": None, "code": status}}, status)


def _sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_event(event: bytes, payload: Any) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _cut(request: web.Request, resp: web.StreamResponse, state: _State) -> web.StreamResponse:
    """Drop the connection mid-stream: buffered bytes go out, then FIN with no terminating chunk."""
    state.cut_streams += 1
    if request.transport is not None:
        request.transport.close()
    return resp


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    forced = _forced_status(request)
    if forced is not None:
        if request.headers.get("x-fake-empty-body"):
            return web.Response(status=forced)
        return _error(forced, f"fake upstream failure ({forced}) requested by x-fake-status", anthropic=False)
    try:
        gen = await _parse(request, anthropic=False)
    except _BadRequest as exc:
        return _error(400, str(exc), anthropic=False)

    n = gen.completion_tokens
    finish = "length" if gen.capped else "stop"
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": gen.prompt_tokens + n,
    }
    seq = next(state.ids)
    created = int(time.time())
    if not gen.stream:
        state.record(_tenant(request), gen.prompt_tokens, n)
        return _json(
            {
                "id": f"chatcmpl-fake-{state.pool}-{seq}",
                "object": "chat.completion",
                "created": created,
                "model": gen.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(_WORDS[:n])},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )

    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    base: dict[str, Any] = {
        "id": f"chatcmpl-fake-{state.pool}-{seq}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": gen.model,
    }
    if gen.include_usage:
        base["usage"] = None  # as OpenAI does on every chunk but the last when include_usage is set

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse_data({**base, "choices": [choice]})

    delay = _chunk_delay(request, state)
    try:
        await resp.write(chunk({"role": "assistant", "content": ""}))
        for i in range(n):
            if gen.cut_after is not None and i >= gen.cut_after:
                return _cut(request, resp, state)
            if delay > 0:
                await asyncio.sleep(delay)
            await resp.write(chunk({"content": _DELTAS[i]}))
        if gen.cut_after is not None:
            return _cut(request, resp, state)
        await resp.write(chunk({}, finish))
        if gen.include_usage:
            await resp.write(_sse_data({**base, "choices": [], "usage": usage}))
        state.record(_tenant(request), gen.prompt_tokens, n)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionError:
        pass  # client went away; nothing more to do
    return resp


async def _messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    forced = _forced_status(request)
    if forced is not None:
        return _error(forced, f"fake upstream failure ({forced}) requested by x-fake-status", anthropic=True)
    try:
        gen = await _parse(request, anthropic=True)
    except _BadRequest as exc:
        return _error(400, str(exc), anthropic=True)

    n = gen.completion_tokens
    stop_reason = "max_tokens" if gen.capped else "end_turn"
    msg_id = f"msg_fake_{state.pool}_{next(state.ids)}"
    if not gen.stream:
        state.record(_tenant(request), gen.prompt_tokens, n)
        return _json(
            {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": gen.model,
                "content": [{"type": "text", "text": " ".join(_WORDS[:n])}],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": n},
            }
        )

    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    delay = _chunk_delay(request, state)
    try:
        await resp.write(
            _sse_event(
                b"message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": gen.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 1},
                    },
                },
            )
            + _sse_event(
                b"content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + _sse_event(b"ping", {"type": "ping"})
        )
        for i in range(n):
            if gen.cut_after is not None and i >= gen.cut_after:
                return _cut(request, resp, state)
            if delay > 0:
                await asyncio.sleep(delay)
            await resp.write(
                _sse_event(
                    b"content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": _DELTAS[i]},
                    },
                )
            )
        if gen.cut_after is not None:
            return _cut(request, resp, state)
        await resp.write(
            _sse_event(b"content_block_stop", {"type": "content_block_stop", "index": 0})
            + _sse_event(
                b"message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
            )
        )
        state.record(_tenant(request), gen.prompt_tokens, n)
        await resp.write(_sse_event(b"message_stop", {"type": "message_stop"}))
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


def _chunk_delay(request: web.Request, state: _State) -> float:
    raw = request.headers.get("x-fake-chunk-delay-ms")
    if raw is None:
        return state.chunk_delay_s
    try:
        return max(0.0, float(raw) / 1000.0)
    except ValueError:
        return state.chunk_delay_s


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


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"ok": True})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "pool": request.app[STATE].pool})


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.headers
    seen = sorted({k.lower() for k in headers if k.lower().startswith(ATTRIBUTION_PREFIX)})
    response.headers["x-fake-pool"] = request.app[STATE].pool
    response.headers["x-fake-seen-headers"] = ",".join(seen)
    response.headers["x-fake-seen-tenant"] = headers.get(TENANT_HEADER, "")
    forced_type = headers.get("x-fake-content-type")
    if forced_type and response.headers.get("content-type", "").startswith(_JSON):
        response.headers["content-type"] = forced_type  # e.g. llama.cpp's "application/json; charset=utf-8"


def build_app(pool: str, *, chunk_delay_s: float = 0.0) -> web.Application:
    """The fake server for one pool; ``chunk_delay_s`` is slept before each streamed token event."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = _State(pool=pool, chunk_delay_s=max(0.0, chunk_delay_s))
    app.on_response_prepare.append(_stamp_headers)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/fake/stats", _stats)
    app.router.add_post("/fake/reset", _reset)
    app.router.add_get("/healthz", _healthz)
    return app


# --------------------------------------------------------------------------- CLI


async def _serve(pool: str, host: str, port: int, chunk_delay_s: float) -> None:
    runner = web.AppRunner(build_app(pool, chunk_delay_s=chunk_delay_s), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info(
            "fake model server pool=%s listening on http://%s:%s (chunk delay %.1f ms)",
            pool,
            host,
            bound,
            chunk_delay_s * 1000,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.fakes.model_server",
        description="Deterministic OpenAI/Anthropic-compatible fake model server (one per pool).",
    )
    parser.add_argument("--pool", required=True, help="pool name, echoed in x-fake-pool")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="sleep before each token event")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.pool, args.host, args.port, args.chunk_delay_ms / 1000.0))


if __name__ == "__main__":
    main()
