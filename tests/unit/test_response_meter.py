"""ResponseMeter: usage from streamed and buffered responses, and the estimate when it is missing."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import ApiSchema
from extproc.apis.anthropic_messages import API as ANTHROPIC
from extproc.apis.openai_chat import API as CHAT
from extproc.apis.openai_completions import API as COMPLETIONS
from extproc.apis.openai_embeddings import API as EMBEDDINGS
from extproc.apis.openai_responses import API as RESPONSES
from extproc.metering.estimate import estimate_tokens_from_text
from extproc.metering.meter import DEFAULT_MAX_JSON_BYTES, PARSE_BYTES, ResponseMeter
from extproc.metering.usage import Usage

VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CLAUDE = "claude-sonnet-4-5-20250929"
TOKENS = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
TEXT = "".join(TOKENS)


# -- payload builders (shaped like vLLM's OpenAI server and Anthropic's documented events) ---------


def sse(payload: Any, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


def vllm_chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-9f1c2b7e4a6d4c0e8b3a2f1d0c9e8b7a",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return sse(chunk)


def vllm_usage_chunk(prompt: int, completion: int) -> bytes:
    return sse(
        {
            "id": "chatcmpl-9f1c2b7e4a6d4c0e8b3a2f1d0c9e8b7a",
            "object": "chat.completion.chunk",
            "created": 1718000000,
            "model": VLLM_MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "completion_tokens": completion,
            },
        }
    )


def openai_stream(*, include_usage: bool, continuous: bool = False, prompt: int = 17) -> list[bytes]:
    def usage(n: int) -> dict[str, int] | None:
        return (
            {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
            if continuous
            else None
        )

    chunks = [vllm_chunk({"role": "assistant", "content": ""}, usage=usage(0))]
    chunks += [vllm_chunk({"content": tok}, usage=usage(i + 1)) for i, tok in enumerate(TOKENS)]
    chunks.append(vllm_chunk({"content": ""}, finish="stop", usage=usage(len(TOKENS))))
    if include_usage:
        chunks.append(vllm_usage_chunk(prompt, len(TOKENS)))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def anthropic_stream(*, output_tokens: list[int], cache_read: int = 0) -> list[bytes]:
    """The documented event sequence (Anthropic prints its JSON with spaces after colons)."""

    def spaced(event: str, payload: dict[str, Any]) -> bytes:
        return f"event: {event}\ndata: ".encode() + _spaced_json(payload) + b"\n\n"

    start_usage = {
        "input_tokens": 25,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
    }
    out = [
        spaced(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": CLAUDE,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**start_usage, "output_tokens": 1},
                },
            },
        ),
        spaced(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        spaced("ping", {"type": "ping"}),
    ]
    out += [
        spaced(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in TOKENS
    ]
    out.append(spaced("content_block_stop", {"type": "content_block_stop", "index": 0}))
    for n in output_tokens:
        out.append(
            spaced(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
            )
        )
    out.append(spaced("message_stop", {"type": "message_stop"}))
    return out


def _spaced_json(payload: Any) -> bytes:
    return json.dumps(payload).encode()  # {"a": 1}, as in Anthropic's documentation


def meter_of(chunks: list[bytes], api: ApiSchema = CHAT, *, streaming: bool = True, **kw: Any) -> ResponseMeter:
    meter = ResponseMeter(api, streaming, **kw)
    for chunk in chunks:
        meter.feed(chunk)
    return meter


def byte_chunks(chunks: list[bytes]) -> list[bytes]:
    stream = b"".join(chunks)
    return [stream[i : i + 1] for i in range(len(stream))]


# -- OpenAI streams ----------------------------------------------------------------------------


def test_openai_stream_takes_usage_from_final_chunk_with_empty_choices() -> None:
    meter = meter_of(openai_stream(include_usage=True))
    assert meter.saw_usage
    assert meter.finish(prompt_estimate=999) == Usage(17, len(TOKENS))
    assert meter.response_model == VLLM_MODEL


def test_openai_stream_with_continuous_usage_takes_the_latest_not_the_sum() -> None:
    meter = meter_of(openai_stream(include_usage=True, continuous=True))
    assert meter.finish(0) == Usage(17, len(TOKENS))


def test_openai_stream_cut_after_continuous_usage_reports_the_latest_seen() -> None:
    chunks = openai_stream(include_usage=False, continuous=True)[:5]  # role chunk + 4 tokens
    meter = meter_of(chunks)
    assert meter.saw_usage
    assert meter.finish(0) == Usage(17, 4)


def test_openai_stream_cut_before_usage_is_estimated_from_prompt_estimate_and_deltas() -> None:
    meter = meter_of(openai_stream(include_usage=True)[:-3])  # cut before finish, usage and [DONE]
    assert not meter.saw_usage
    usage = meter.finish(prompt_estimate=40)
    assert usage.estimated
    assert usage.prompt_tokens == 40
    # never fewer tokens than non-empty deltas (each carries at least one token)
    assert usage.completion_tokens == max(estimate_tokens_from_text(TEXT), len(TOKENS))


def test_openai_stream_without_include_usage_is_estimated() -> None:
    usage = meter_of(openai_stream(include_usage=False)).finish(30)
    assert usage == Usage(30, len(TOKENS), estimated=True)


def test_openai_stream_estimate_follows_text_length_when_deltas_are_long() -> None:
    long_delta = "word " * 200  # 1000 bytes in a single delta
    meter = meter_of([vllm_chunk({"content": long_delta}), b"data: [DONE]\n\n"])
    assert meter.finish(5) == Usage(5, 250, estimated=True)


def test_openai_stream_counts_reasoning_and_tool_call_arguments_for_the_estimate() -> None:
    chunks = [
        # vLLM fills `reasoning` and its alias `reasoning_content` with the same text: counted once
        vllm_chunk({"reasoning": "a" * 40, "reasoning_content": "a" * 40}),
        vllm_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        vllm_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}' + " " * 23}}]}),
    ]
    assert meter_of(chunks).finish(0).completion_tokens == 10 + 10


def test_openai_completions_stream_counts_text_choices() -> None:
    chunks = [
        sse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": VLLM_MODEL,
                "choices": [{"index": 0, "text": "x" * 16, "logprobs": None, "finish_reason": None}],
            }
        ),
        sse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": VLLM_MODEL,
                "choices": [],
                "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
            }
        ),
    ]
    assert meter_of(chunks, COMPLETIONS).finish(0) == Usage(3, 4)
    assert meter_of(chunks[:1], COMPLETIONS).finish(0) == Usage(0, 4, estimated=True)


def test_openai_stream_with_null_usage_on_every_chunk_uses_the_final_one() -> None:
    chunks = [
        c.replace(b'"choices"', b'"usage":null,"choices"', 1) for c in openai_stream(include_usage=False)
    ]
    chunks.insert(-1, vllm_usage_chunk(12, 9))
    assert meter_of(chunks).finish(0) == Usage(12, 9)


def test_openai_stream_split_into_single_bytes_gives_the_same_usage() -> None:
    assert meter_of(byte_chunks(openai_stream(include_usage=True))).finish(0) == Usage(17, len(TOKENS))
    cut = byte_chunks(openai_stream(include_usage=False))
    assert meter_of(cut).finish(3) == meter_of(openai_stream(include_usage=False)).finish(3)


def test_broken_sse_lines_and_malformed_events_are_ignored() -> None:
    chunks = openai_stream(include_usage=True)
    chunks[2:2] = [
        b"data: {not json at all\n\n",
        b"this line is not a field\n",
        b": keep-alive\n\n",
        b'data: {"choices": "not-a-list", "usage": {"prompt_tokens": "x"}}\n\n',
        b"data: [1, 2, 3]\n\n",
        b"data: \xff\xfe garbage\n\n",
        b"\n\n\n",
    ]
    meter = meter_of(chunks)
    assert meter.finish(0) == Usage(17, len(TOKENS))


def test_final_usage_event_without_trailing_blank_line_is_flushed_by_finish() -> None:
    chunks = openai_stream(include_usage=True)[:-1]  # drop [DONE]
    chunks[-1] = chunks[-1].rstrip(b"\n")
    assert meter_of(chunks).finish(0) == Usage(17, len(TOKENS))


def test_oversized_stream_event_is_dropped_and_falls_back_to_estimate() -> None:
    chunks = openai_stream(include_usage=False)
    chunks.insert(3, vllm_chunk({"content": "z" * 5000}))
    meter = meter_of(chunks, max_json_bytes=1024)
    assert meter.dropped_events == 1
    assert meter.finish(0) == Usage(0, len(TOKENS), estimated=True)


def test_responses_api_stream_takes_usage_from_response_completed() -> None:
    response = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1-2025-04-14",
        "status": "in_progress",
        "usage": None,
    }
    deltas = [
        sse(
            {
                "type": "response.output_text.delta",
                "sequence_number": i + 4,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": tok,
            },
            "response.output_text.delta",
        )
        for i, tok in enumerate(TOKENS)
    ]
    done_text = {
        "type": "response.output_text.done",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "text": TEXT,
    }
    completed = {
        **response,
        "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": TEXT}]}],
        "usage": {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 45,
        },
    }
    chunks = [
        sse({"type": "response.created", "sequence_number": 0, "response": response}, "response.created"),
        sse(
            {"type": "response.in_progress", "sequence_number": 1, "response": response},
            "response.in_progress",
        ),
        *deltas,
        sse(done_text, "response.output_text.done"),
        sse(
            {"type": "response.completed", "sequence_number": 20, "response": completed}, "response.completed"
        ),
    ]
    meter = meter_of(chunks, RESPONSES)
    assert meter.finish(0) == Usage(36, 9)
    assert meter.response_model == "gpt-4.1-2025-04-14"
    # cut before response.completed: estimated from the deltas only (not the .done full text)
    assert meter_of(chunks[:-1], RESPONSES).finish(7) == Usage(7, len(TOKENS), estimated=True)


# -- Anthropic streams -------------------------------------------------------------------------


def test_anthropic_stream_combines_message_start_input_with_message_delta_output() -> None:
    meter = meter_of(anthropic_stream(output_tokens=[15], cache_read=100), ANTHROPIC)
    assert meter.saw_usage
    assert meter.finish(0) == Usage(prompt_tokens=125, completion_tokens=15, cached_tokens=100)
    assert meter.response_model == CLAUDE


def test_anthropic_message_delta_output_tokens_are_cumulative_not_summed() -> None:
    meter = meter_of(anthropic_stream(output_tokens=[5, 12, 15]), ANTHROPIC)
    assert meter.finish(0) == Usage(25, 15)


def test_anthropic_message_delta_with_full_cumulative_usage_overrides_message_start() -> None:
    chunks = anthropic_stream(output_tokens=[])
    chunks.insert(
        -1,
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {
                    "input_tokens": 30,
                    "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 15,
                },
            },
            "message_delta",
        ),
    )
    assert meter_of(chunks, ANTHROPIC).finish(0) == Usage(35, 15, cache_creation_tokens=5)


def test_anthropic_stream_cut_after_message_start_keeps_reported_input_and_estimates_output() -> None:
    chunks = anthropic_stream(output_tokens=[15])[:-2]  # cut before message_delta
    meter = meter_of(chunks, ANTHROPIC)
    assert not meter.saw_usage
    usage = meter.finish(prompt_estimate=999)
    assert usage == Usage(25, max(estimate_tokens_from_text(TEXT), len(TOKENS)), estimated=True)


def test_anthropic_stream_cut_before_message_start_uses_the_prompt_estimate() -> None:
    assert meter_of([b'event: ping\ndata: {"type": "ping"}\n\n'], ANTHROPIC).finish(50) == Usage(
        50, 0, estimated=True
    )


def test_anthropic_stream_counts_thinking_and_tool_input_deltas_for_the_estimate() -> None:
    chunks = [
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "t" * 40},
            },
            "content_block_delta",
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'},
            },
            "content_block_delta",
        ),
    ]
    assert meter_of(chunks, ANTHROPIC).finish(0).completion_tokens == 10 + 6


def test_anthropic_error_event_mid_stream_falls_back_to_estimate() -> None:
    chunks = anthropic_stream(output_tokens=[15])[:5]
    chunks.append(
        sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")
    )
    usage = meter_of(chunks, ANTHROPIC).finish(0)
    assert usage.estimated and usage.prompt_tokens == 25


def test_anthropic_stream_split_into_single_bytes_gives_the_same_usage() -> None:
    chunks = anthropic_stream(output_tokens=[15], cache_read=7)
    assert meter_of(byte_chunks(chunks), ANTHROPIC).finish(0) == Usage(32, 15, cached_tokens=7)


# -- non-streaming -----------------------------------------------------------------------------


def openai_body(**extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-7e1b",
        "object": "chat.completion",
        "created": 1718000000,
        "model": VLLM_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 17,
            "total_tokens": 26,
            "completion_tokens": 9,
            "prompt_tokens_details": None,
        },
        "prompt_logprobs": None,
    }
    body.update(extra)
    return orjson.dumps(body)


def test_non_streaming_openai_body_split_across_chunks() -> None:
    body = openai_body()
    meter = meter_of([body[:50], body[50:51], body[51:]], streaming=False)
    assert meter.saw_usage
    assert meter.finish(0) == Usage(17, 9)
    assert meter.response_model == VLLM_MODEL


def test_non_streaming_anthropic_body() -> None:
    body = orjson.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": CLAUDE,
            "content": [{"type": "text", "text": "Hi!"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 20,
                "cache_read_input_tokens": 30,
                "output_tokens": 4,
            },
        }
    )
    assert meter_of([body], ANTHROPIC, streaming=False).finish(0) == Usage(
        60, 4, cached_tokens=30, cache_creation_tokens=20
    )


def test_non_streaming_body_without_usage_is_estimated_from_its_text() -> None:
    body = openai_body(usage=None)
    assert meter_of([body], streaming=False).finish(11) == Usage(
        11, estimate_tokens_from_text(TEXT), estimated=True
    )


def test_non_streaming_anthropic_body_without_usage_is_estimated_from_its_content_blocks() -> None:
    body = orjson.dumps({"type": "message", "model": CLAUDE, "content": [{"type": "text", "text": "x" * 40}]})
    assert meter_of([body], ANTHROPIC, streaming=False).finish(3) == Usage(3, 10, estimated=True)


def test_malformed_json_body_is_estimated() -> None:
    body = openai_body()[:-20]  # truncated
    meter = meter_of([body], streaming=False)
    assert not meter.saw_usage
    assert meter.finish(21) == Usage(21, 0, estimated=True)
    assert meter.response_model == VLLM_MODEL  # still found in the bytes


def test_empty_body_is_estimated() -> None:
    assert ResponseMeter(CHAT, streaming=False).finish(4) == Usage(4, 0, estimated=True)


def test_oversized_json_body_is_estimated_without_buffering_it() -> None:
    junk = b"[" + b"1234567," * (2 * 1024 * 1024) + b"0]"  # 16 MiB, no usage anywhere
    body = b'{"id":"x","model":"m","data":' + junk + b"}"
    tracemalloc.start()
    try:
        meter = ResponseMeter(CHAT, streaming=False, max_json_bytes=1024 * 1024)
        for i in range(0, len(body), 65536):
            meter.feed(body[i : i + 65536])
        usage = meter.finish(9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert usage == Usage(9, 0, estimated=True)
    assert meter.response_model == "m"
    assert peak < 3 * 1024 * 1024  # the 16 MiB body was never held


def test_oversized_json_body_still_yields_the_usage_at_its_end() -> None:
    embeddings = [{"object": "embedding", "index": i, "embedding": [0.0123456] * 256} for i in range(64)]
    body = orjson.dumps(
        {
            "object": "list",
            "data": embeddings,
            "model": "BAAI/bge-m3",
            "usage": {"prompt_tokens": 640, "total_tokens": 640},
        }
    )
    assert len(body) > 64 * 1024
    meter = meter_of(
        [body[i : i + 4096] for i in range(0, len(body), 4096)], EMBEDDINGS, streaming=False,
        max_json_bytes=32 * 1024,
    )
    assert meter.saw_usage
    assert meter.finish(0) == Usage(640, 0)


def test_large_body_takes_usage_from_its_tail_and_model_from_its_head() -> None:
    embeddings = [{"object": "embedding", "index": i, "embedding": [0.5] * 1024} for i in range(128)]
    body = orjson.dumps(
        {"model": "BAAI/bge-m3", "data": embeddings, "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    )
    assert PARSE_BYTES < len(body) < DEFAULT_MAX_JSON_BYTES
    meter = meter_of([body], EMBEDDINGS, streaming=False)
    assert meter.finish(0) == Usage(9, 0)
    assert meter.response_model == "BAAI/bge-m3"


def test_large_body_with_usage_away_from_its_end_is_parsed_whole() -> None:
    body = orjson.dumps(
        {"usage": {"prompt_tokens": 4, "completion_tokens": 2}, "model": "m", "data": ["p" * 1000] * 400}
    )
    assert len(body) > PARSE_BYTES
    assert meter_of([body], streaming=False).finish(0) == Usage(4, 2)


def test_oversized_anthropic_body_still_yields_the_usage_at_its_end() -> None:
    body = orjson.dumps(
        {
            "type": "message",
            "model": CLAUDE,
            "content": [
                {
                    "type": "tool_use",
                    "id": "t1",
                    "name": "f",
                    "input": {"usage": {"input_tokens": 1, "output_tokens": 1}},
                },
                {"type": "text", "text": "y" * 50_000},
            ],
            "usage": {"input_tokens": 7, "cache_read_input_tokens": 3, "output_tokens": 12_500},
        }
    )
    meter = meter_of([body], ANTHROPIC, streaming=False, max_json_bytes=1024)
    assert meter.finish(0) == Usage(10, 12_500, cached_tokens=3)


# -- lifecycle ---------------------------------------------------------------------------------


def test_finish_can_be_called_again_and_later_chunks_are_ignored() -> None:
    meter = meter_of(openai_stream(include_usage=False))
    first = meter.finish(5)
    meter.feed(vllm_usage_chunk(1, 1))
    assert meter.finish(5) == first
    assert first.estimated


def test_negative_prompt_estimate_is_clamped_to_zero() -> None:
    assert ResponseMeter(CHAT, streaming=True).finish(-3) == Usage(0, 0, estimated=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_any_chunking_of_a_stream_meters_the_same(cuts: list[int]) -> None:
    for api, chunks in (
        (CHAT, openai_stream(include_usage=True)),
        (CHAT, openai_stream(include_usage=False)),
        (ANTHROPIC, anthropic_stream(output_tokens=[3, 15])),
    ):
        stream = b"".join(chunks)
        points = sorted({min(c, len(stream)) for c in cuts})
        bounds = [0, *points, len(stream)]
        pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        assert meter_of(pieces, api).finish(1) == meter_of([stream], api).finish(1)
