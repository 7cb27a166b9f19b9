"""Request-body parsing for admission: validation, max tokens, prompt estimates, usage injection."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.apis import ALL_APIS, ApiSchema, BadRequest, RequestInfo, api_for_path
from extproc.apis.anthropic_messages import API as ANTHROPIC
from extproc.apis.openai_chat import API as CHAT
from extproc.apis.openai_completions import API as COMPLETIONS
from extproc.apis.openai_embeddings import API as EMBEDDINGS
from extproc.apis.openai_responses import API as RESPONSES
from extproc.metering.estimate import MESSAGE_OVERHEAD_TOKENS, estimate_prompt_tokens

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SECRET = "my-secret-prompt-text"


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def chat(**extra: Any) -> bytes:
    return body(model=MODEL, messages=[{"role": "user", "content": "x" * 40}], **extra)


def bad(raw: bytes, api: ApiSchema = CHAT) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        api.parse_request(raw)
    return info.value


def injected(api: ApiSchema, raw: bytes) -> bytes:
    out = api.inject_stream_usage(raw)
    assert out is not None
    return out


# -- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", COMPLETIONS),
        ("/v1/embeddings", EMBEDDINGS),
        ("/v1/responses", RESPONSES),
        ("/v1/messages", ANTHROPIC),
        ("/v1/chat/completions?api-version=2024-10-21", CHAT),
        ("/v1/messages?beta=true", ANTHROPIC),
        ("/v1/chat/completions/", CHAT),
        ("/v1/models", None),
        ("/v1/messages/count_tokens", None),
        ("/health", None),
        ("/", None),
        ("", None),
        ("/v1/chat/completionsX", None),
    ],
)
def test_api_for_path(path: str, api: ApiSchema | None) -> None:
    assert api_for_path(path) is api


# -- OpenAI ------------------------------------------------------------------------------------


def test_chat_request_is_parsed() -> None:
    info = CHAT.parse_request(chat(max_tokens=256))
    assert info == RequestInfo(
        api=CHAT,
        model=MODEL,
        stream=False,
        max_output_tokens=256,
        prompt_tokens_estimate=10 + MESSAGE_OVERHEAD_TOKENS,
        wants_usage_injection=False,
    )


def test_the_largest_output_bound_given_is_reserved() -> None:
    # Servers differ in which field wins; reserving the largest keeps the estimate an upper bound.
    assert CHAT.parse_request(chat(max_tokens=4096, max_completion_tokens=100)).max_output_tokens == 4096
    assert CHAT.parse_request(chat(max_tokens=10, max_completion_tokens=100)).max_output_tokens == 100


def test_a_zero_bound_does_not_hide_the_other_field() -> None:
    info = CHAT.parse_request(chat(max_tokens=100_000, max_completion_tokens=0))
    assert info.max_output_tokens == 100_000


def test_missing_max_tokens_is_none() -> None:
    assert CHAT.parse_request(chat()).max_output_tokens is None


def test_null_max_tokens_is_treated_as_absent() -> None:
    assert (
        CHAT.parse_request(chat(max_tokens=None, max_completion_tokens=None)).max_output_tokens
        is None
    )


def test_responses_api_max_output_tokens_and_instructions() -> None:
    raw = body(model="gpt-4.1", input="x" * 40, instructions="y" * 40, max_output_tokens=500, stream=True)
    info = RESPONSES.parse_request(raw)
    assert info.max_output_tokens == 500
    assert info.prompt_tokens_estimate == 20 + MESSAGE_OVERHEAD_TOKENS
    assert info.stream and not info.wants_usage_injection  # Responses streams always report usage


def test_responses_api_input_items_are_estimated_like_messages() -> None:
    raw = body(
        model="gpt-4.1",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "a" * 20},
            {"type": "function_call_output", "call_id": "c1", "output": "o" * 20},
        ],
    )
    assert RESPONSES.parse_request(raw).prompt_tokens_estimate == 20 + 3 * MESSAGE_OVERHEAD_TOKENS


def test_completions_prompt_is_accepted_and_estimated() -> None:
    info = COMPLETIONS.parse_request(body(model=MODEL, prompt="x" * 40, max_tokens=16))
    assert (info.prompt_tokens_estimate, info.max_output_tokens) == (10, 16)


def test_pre_tokenized_prompts_count_their_token_ids_exactly() -> None:
    assert COMPLETIONS.parse_request(body(model=MODEL, prompt=[1, 2, 3, 4, 5])).prompt_tokens_estimate == 5
    raw = body(model=MODEL, input=[[1, 2, 3], [4, 5]])
    assert EMBEDDINGS.parse_request(raw).prompt_tokens_estimate == 5


def test_embeddings_input_list_is_accepted_and_estimated() -> None:
    info = EMBEDDINGS.parse_request(body(model="BAAI/bge-m3", input=["x" * 40, "y" * 40]))
    assert info.prompt_tokens_estimate == 20
    assert not info.stream


def test_stream_without_include_usage_wants_usage_injection() -> None:
    assert CHAT.parse_request(chat(stream=True)).wants_usage_injection
    raw = chat(stream=True, stream_options={"include_usage": False})
    assert CHAT.parse_request(raw).wants_usage_injection
    raw = body(model=MODEL, prompt="hi", stream=True)
    assert COMPLETIONS.parse_request(raw).wants_usage_injection


def test_stream_with_include_usage_needs_no_injection() -> None:
    raw = chat(stream=True, stream_options={"include_usage": True})
    info = CHAT.parse_request(raw)
    assert info.stream and not info.wants_usage_injection


def test_non_streaming_request_needs_no_injection() -> None:
    assert not CHAT.parse_request(chat(stream=False)).wants_usage_injection
    assert not CHAT.parse_request(chat(stream=None)).stream


def test_n_and_best_of_give_the_number_of_completions() -> None:
    assert CHAT.parse_request(chat()).n == 1
    assert CHAT.parse_request(chat(n=4)).n == 4
    assert COMPLETIONS.parse_request(body(model=MODEL, prompt="p", n=2, best_of=5)).n == 5


# -- Anthropic ---------------------------------------------------------------------------------


def test_anthropic_request_with_system_tools_and_parts() -> None:
    tools = [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}]
    raw = body(
        model="claude-sonnet-4-5",
        max_tokens=1024,
        stream=True,
        system=[{"type": "text", "text": "s" * 40, "cache_control": {"type": "ephemeral"}}],
        tools=tools,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x" * 40},
                    {"type": "image", "source": {"data": "A" * 9000}},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"c": 1}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r" * 40}]},
        ],
    )
    info = ANTHROPIC.parse_request(raw)
    tool_bytes = len(orjson.dumps(tools)) + len(b'{"c":1}')
    expected = (120 + tool_bytes + 3) // 4 + 4 * MESSAGE_OVERHEAD_TOKENS  # images are not counted
    assert info == RequestInfo(
        api=ANTHROPIC,
        model="claude-sonnet-4-5",
        stream=True,
        max_output_tokens=1024,
        prompt_tokens_estimate=expected,
        wants_usage_injection=False,
    )


def test_anthropic_requires_messages() -> None:
    assert bad(body(model="claude", prompt="hi", max_tokens=5), ANTHROPIC).param == "messages"


def test_anthropic_system_must_be_text_or_blocks() -> None:
    raw = body(model="claude", system=5, messages=[{"role": "user", "content": "hi"}])
    assert bad(raw, ANTHROPIC).param == "system"


# -- rejections --------------------------------------------------------------------------------


def test_invalid_json_is_rejected_without_echoing_the_body() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "' + SECRET.encode() + b'"'
    error = bad(raw)
    assert error.message.startswith("request body is not valid JSON: ")
    assert SECRET not in error.message
    assert SECRET not in str(error)
    # the JSON error (whose .doc is the whole body) is not chained into tracebacks
    assert error.__cause__ is None and error.__suppress_context__


def test_empty_and_non_utf8_bodies_are_rejected() -> None:
    assert bad(b"").message.startswith("request body is not valid JSON")
    assert bad(b'{"model": "\xff"}').message.startswith("request body is not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
def test_top_level_must_be_an_object(raw: bytes) -> None:
    assert bad(raw).message == "request body must be a JSON object"


@pytest.mark.parametrize("model", [None, "", "   ", 5, ["m"], {"id": "m"}])
def test_model_must_be_a_non_empty_string(model: Any) -> None:
    fields: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        fields["model"] = model
    for api in ALL_APIS:
        assert bad(orjson.dumps(fields), api).param == "model"


@pytest.mark.parametrize("messages", ["hello", {"role": "user"}, [], ["hello"], [None], 3])
def test_messages_must_be_a_non_empty_list_of_objects(messages: Any) -> None:
    for api in ALL_APIS:
        assert bad(body(model=MODEL, messages=messages), api).param.startswith("messages")  # type: ignore[union-attr]


def test_openai_request_needs_messages_prompt_or_input() -> None:
    assert bad(body(model=MODEL, max_tokens=5)).param == "messages"


@pytest.mark.parametrize(
    ("key", "value"), [("prompt", 5), ("prompt", True), ("input", 5), ("input", {"a": 1})]
)
def test_prompt_and_input_must_be_text_or_lists(key: str, value: Any) -> None:
    assert bad(body(model=MODEL, **{key: value})).param == key


@pytest.mark.parametrize(
    ("api", "key"),
    [
        *((api, key) for api in ALL_APIS if api is not ANTHROPIC
          for key in ("max_tokens", "max_completion_tokens", "max_output_tokens")),
        (ANTHROPIC, "max_tokens"),
    ],
)
@pytest.mark.parametrize("value", [-1, 1.5, 100.0, "100", True, [100]])
def test_max_tokens_must_be_a_non_negative_integer(api: ApiSchema, key: str, value: Any) -> None:
    error = bad(chat(**{key: value}), api)
    assert error.param == key


def test_invalid_max_tokens_is_rejected_even_when_another_bound_is_preferred() -> None:
    assert bad(chat(max_completion_tokens=10, max_tokens=-5)).param == "max_tokens"


def test_huge_integer_max_tokens_is_rejected() -> None:
    assert (
        bad(
            b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":123456789012345678901234567890}'
        ).param
        == "max_tokens"
    )


@pytest.mark.parametrize("stream", ["true", 1, 0, [], {}])
def test_stream_must_be_a_boolean(stream: Any) -> None:
    for api in ALL_APIS:
        assert bad(chat(stream=stream), api).param == "stream"


def test_stream_options_must_be_an_object_with_boolean_include_usage() -> None:
    assert bad(chat(stream=True, stream_options="yes")).param == "stream_options"
    raw = chat(stream=True, stream_options={"include_usage": "yes"})
    assert bad(raw).param == "stream_options.include_usage"


@pytest.mark.parametrize(("key", "value"), [("n", 0), ("n", -2), ("n", 1.0), ("best_of", "3")])
def test_n_must_be_a_positive_integer(key: str, value: Any) -> None:
    assert bad(chat(**{key: value})).param == key


def test_bad_request_carries_message_and_param() -> None:
    error = BadRequest("request body is required", None)
    assert (error.message, error.param, str(error)) == (
        "request body is required",
        None,
        "request body is required",
    )


# -- usage injection ---------------------------------------------------------------------------


def test_inject_stream_usage_adds_the_option_and_keeps_the_rest_byte_for_byte() -> None:
    raw = (
        b'{"model": "m", "stream": true, "temperature": 0.70, "messages": [{"role": "user", "content": "x"}]}'
    )
    new = injected(CHAT, raw)
    assert new.endswith(raw[1:])
    parsed = orjson.loads(new)
    assert parsed["stream_options"] == {"include_usage": True}
    assert parsed["temperature"] == 0.7
    assert not CHAT.parse_request(new).wants_usage_injection


def test_inject_stream_usage_merges_into_existing_stream_options() -> None:
    raw = chat(stream=True, stream_options={"include_usage": False, "continuous_usage_stats": True})
    parsed = orjson.loads(injected(CHAT, raw))
    assert parsed["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert parsed["messages"] == orjson.loads(raw)["messages"]
    assert list(parsed) == list(orjson.loads(raw))  # field order kept


def test_inject_stream_usage_replaces_null_stream_options() -> None:
    parsed = orjson.loads(injected(CHAT, chat(stream=True, stream_options=None)))
    assert parsed["stream_options"] == {"include_usage": True}


def test_inject_stream_usage_ignores_a_nested_stream_options_key() -> None:
    raw = chat(stream=True, metadata={"stream_options": "not mine"})
    parsed = orjson.loads(injected(CHAT, raw))
    assert parsed["stream_options"] == {"include_usage": True}
    assert parsed["metadata"] == {"stream_options": "not mine"}


def test_inject_stream_usage_into_a_prompt_mentioning_stream_options() -> None:
    raw = body(
        model=MODEL, stream=True, messages=[{"role": "user", "content": 'set "stream_options" please'}]
    )
    parsed = orjson.loads(injected(CHAT, raw))
    assert parsed["stream_options"] == {"include_usage": True}
    assert parsed["messages"][0]["content"] == 'set "stream_options" please'


def test_inject_stream_usage_rejects_a_body_that_is_not_an_object() -> None:
    with pytest.raises(BadRequest):
        CHAT.inject_stream_usage(b"[1]")


# -- prompt estimate ---------------------------------------------------------------------------


def test_prompt_estimate_counts_text_parts_tool_calls_and_per_message_overhead() -> None:
    tool_calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "s" * 40},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "t" * 40},
                {"type": "image_url", "image_url": {"url": "data:" + "A" * 5000}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": tool_calls,
        },
        {"role": "tool", "tool_call_id": "c", "content": "r" * 40},
    ]
    tool_call_bytes = len(orjson.dumps(tool_calls))
    assert (
        estimate_prompt_tokens(messages=messages)
        == (120 + tool_call_bytes + 3) // 4 + 4 * MESSAGE_OVERHEAD_TOKENS
    )


def test_prompt_estimate_of_tools_is_their_json_length() -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    assert estimate_prompt_tokens(tools=tools) == (len(orjson.dumps(tools)) + 3) // 4


def test_prompt_estimate_counts_utf8_bytes() -> None:
    assert estimate_prompt_tokens(prompt="é" * 10) == 5  # 20 bytes


def test_prompt_estimate_survives_deeply_nested_content() -> None:
    content: Any = "x"
    for _ in range(500):
        content = [{"type": "tool_result", "content": content}]
    assert estimate_prompt_tokens(messages=[{"role": "user", "content": content}]) == MESSAGE_OVERHEAD_TOKENS


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "messages",
                    "content",
                    "type",
                    "text",
                    "prompt",
                    "input",
                    "stream",
                    "stream_options",
                    "include_usage",
                    "max_tokens",
                    "system",
                    "tools",
                    "n",
                    "tool_calls",
                    "arguments",
                    "output",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(_JSON, st.sampled_from(ALL_APIS))
def test_parse_request_never_fails_with_anything_but_bad_request(value: Any, api: ApiSchema) -> None:
    raw = json.dumps(value).encode()  # json: integers beyond 64 bits too
    try:
        info = api.parse_request(raw)
    except BadRequest as error:
        assert error.message
        return
    assert info.prompt_tokens_estimate >= 0
    assert info.api is api
    if info.wants_usage_injection:
        assert not api.parse_request(injected(api, raw)).wants_usage_injection


def test_path_spellings_a_server_would_route_alike_are_all_metered() -> None:
    for path in ("/v1//chat/completions", "/V1/chat/completions", "/v1/chat%2Fcompletions", "/v1/./chat/completions",
                 "/v1/chat/completions;x=1", "/v1/%63hat/completions", "/x/../v1/chat/completions/"):
        assert api_for_path(path) is CHAT, path
    assert api_for_path("/v1/models") is None

