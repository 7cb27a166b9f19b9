"""Usage extraction from each API's bodies and stream events (`ApiSchema.usage_from_json`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from extproc.apis import ALL_APIS
from extproc.apis.anthropic_messages import API as ANTHROPIC
from extproc.apis.openai_chat import API as CHAT
from extproc.apis.openai_completions import API as COMPLETIONS
from extproc.apis.openai_embeddings import API as EMBEDDINGS
from extproc.apis.openai_responses import API as RESPONSES
from extproc.metering.estimate import estimate_tokens_from_text
from extproc.metering.usage import Usage

OPENAI_APIS = [api for api in ALL_APIS if api is not ANTHROPIC]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def test_total_tokens_is_prompt_plus_completion() -> None:
    assert (
        Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4, reasoning_tokens=2).total_tokens == 15
    )


def test_usage_is_immutable() -> None:
    usage = Usage(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.prompt_tokens = 3  # type: ignore[misc]


# -- OpenAI ------------------------------------------------------------------------------------


def test_openai_chat_completion_body_with_cached_and_reasoning_details() -> None:
    body = {
        "id": "chatcmpl-7e1b",
        "object": "chat.completion",
        "created": 1718000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
        },
    }
    assert CHAT.usage_from_json(body) == Usage(
        prompt_tokens=1200, completion_tokens=300, cached_tokens=1024, reasoning_tokens=256
    )


def test_openai_vllm_usage_with_null_details() -> None:
    body = {
        "usage": {
            "prompt_tokens": 17,
            "total_tokens": 27,
            "completion_tokens": 10,
            "prompt_tokens_details": None,
        }
    }
    assert CHAT.usage_from_json(body) == Usage(17, 10)


def test_openai_final_stream_chunk_with_empty_choices() -> None:
    chunk = {
        "id": "chatcmpl-7e1b",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 17, "total_tokens": 27, "completion_tokens": 10},
    }
    assert CHAT.usage_from_json(chunk) == Usage(17, 10)
    assert CHAT.is_usage_event(chunk)


def test_openai_chunk_with_null_usage_has_no_usage() -> None:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "Hi"}}],
        "usage": None,
    }
    assert CHAT.usage_from_json(chunk) is None
    assert not CHAT.is_usage_event(chunk)


def test_openai_chunk_without_usage_key_has_no_usage() -> None:
    assert CHAT.usage_from_json({"object": "chat.completion.chunk", "choices": []}) is None


def test_openai_legacy_completions_body() -> None:
    body = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": " world", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19},
    }
    assert COMPLETIONS.usage_from_json(body) == Usage(3, 16)


def test_openai_embeddings_usage_has_no_completion_tokens() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": "BAAI/bge-m3",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert EMBEDDINGS.usage_from_json(body) == Usage(8, 0)


def test_openai_responses_api_body_usage() -> None:
    body = {
        "id": "resp_67ccd2bed1ec8190",
        "object": "response",
        "status": "completed",
        "model": "gpt-4.1-2025-04-14",
        "output": [],
        "usage": {
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 20},
            "total_tokens": 380,
        },
    }
    assert RESPONSES.usage_from_json(body) == Usage(328, 52, cached_tokens=128, reasoning_tokens=20)


@pytest.mark.parametrize("event_type", ["response.completed", "response.incomplete", "response.failed"])
def test_openai_responses_api_terminal_event_usage(event_type: str) -> None:
    event = {
        "type": event_type,
        "sequence_number": 12,
        "response": {
            "id": "resp_1",
            "object": "response",
            "model": "gpt-4.1",
            "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123},
        },
    }
    assert RESPONSES.usage_from_json(event) == Usage(36, 87)


def test_openai_responses_api_created_event_with_null_usage_has_no_usage() -> None:
    event = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "usage": None}}
    assert RESPONSES.usage_from_json(event) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": "12", "completion_tokens": 3},
        {"prompt_tokens": 12.0, "completion_tokens": 3},
        {"prompt_tokens": True, "completion_tokens": 3},
        {"completion_tokens": 3},
        {"prompt_tokens": 12, "completion_tokens": -3},
        {"input_tokens": 12},
        {"prompt_tokens": 12, "total_tokens": 5},
    ],
)
def test_openai_malformed_usage_gives_none(usage: dict[str, Any]) -> None:
    for api in OPENAI_APIS:
        assert api.usage_from_json({"usage": usage}) is None, api


def test_openai_usage_that_is_not_an_object_gives_none() -> None:
    for api in ALL_APIS:
        assert api.usage_from_json({"usage": [1, 2]}) is None, api
        assert api.usage_from_json({"usage": 12}) is None, api


def test_openai_details_larger_than_their_totals_are_clamped() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 9},
    }
    assert CHAT.usage_from_json({"usage": usage}) == Usage(10, 5, cached_tokens=10, reasoning_tokens=5)
    responses = {
        "input_tokens": 10,
        "output_tokens": 5,
        "input_tokens_details": {"cached_tokens": 50},
        "output_tokens_details": {"reasoning_tokens": 9},
    }
    assert RESPONSES.usage_from_json({"usage": responses}) == Usage(10, 5, cached_tokens=10, reasoning_tokens=5)


def test_each_openai_api_reads_its_own_usage_shape_only() -> None:
    chat = {"usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}}
    embeddings = {"usage": {"prompt_tokens": 8, "total_tokens": 8}}
    responses_body = {"usage": {"input_tokens": 36, "output_tokens": 87}}
    responses_event = {"type": "response.completed", "response": responses_body}
    assert CHAT.usage_from_json(chat) == COMPLETIONS.usage_from_json(chat) == Usage(3, 16)
    assert EMBEDDINGS.usage_from_json(embeddings) == Usage(8, 0)
    assert RESPONSES.usage_from_json(responses_body) == RESPONSES.usage_from_json(responses_event) == Usage(36, 87)
    # no API reads another's format (the request's path says which API answers)
    assert RESPONSES.usage_from_json(chat) is None
    for api in (CHAT, COMPLETIONS, EMBEDDINGS):
        assert api.usage_from_json(responses_body) is None, api
        assert api.usage_from_json(responses_event) is None, api


# -- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_message_body_counts_cache_tokens_in_the_prompt() -> None:
    body = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "cache_creation_input_tokens": 200,
            "cache_read_input_tokens": 1000,
            "output_tokens": 12,
            "service_tier": "standard",
        },
    }
    assert ANTHROPIC.usage_from_json(body) == Usage(
        prompt_tokens=1250, completion_tokens=12, cached_tokens=1000, cache_creation_tokens=200
    )


def test_anthropic_message_without_cache_fields() -> None:
    assert ANTHROPIC.usage_from_json({"usage": {"input_tokens": 25, "output_tokens": 15}}) == Usage(25, 15)


def test_anthropic_null_cache_fields_count_zero() -> None:
    usage = {"input_tokens": 25, "output_tokens": 15, "cache_creation_input_tokens": None}
    assert ANTHROPIC.usage_from_json({"usage": usage}) == Usage(25, 15)


def test_anthropic_message_start_event_usage() -> None:
    event = {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    }
    assert ANTHROPIC.usage_from_json(event) == Usage(25, 1)


def test_anthropic_message_delta_alone_is_not_a_complete_usage() -> None:
    event = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}}
    assert ANTHROPIC.usage_from_json(event) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -5, "output_tokens": 1},
        {"input_tokens": "5", "output_tokens": 1},
        {"output_tokens": 1},
    ],
)
def test_anthropic_malformed_usage_gives_none(usage: dict[str, Any]) -> None:
    assert ANTHROPIC.usage_from_json({"usage": usage}) is None


def test_anthropic_body_without_usage_gives_none() -> None:
    assert ANTHROPIC.usage_from_json({"type": "error", "error": {"type": "overloaded_error"}}) is None


# -- text estimate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("é", 1), ("😀", 1), ("😀😀", 2), ("x" * 4000, 1000)],
)
def test_text_estimate_is_utf8_bytes_over_four_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens_from_text(text) == tokens


def test_text_estimate_tolerates_lone_surrogates() -> None:
    assert estimate_tokens_from_text("\ud800") == 1
