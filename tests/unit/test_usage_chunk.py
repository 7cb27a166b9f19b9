"""The usage chunk the proxy asked for on the client's behalf is taken back out of the stream."""

from __future__ import annotations

import orjson

from extproc.metering.usage_chunk import UsageChunkFilter


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "tok"}}], "usage": None})
LAST = sse({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None})
USAGE = sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
DONE = b"data: [DONE]\n\n"


def test_the_usage_event_is_dropped_and_everything_else_kept_in_order() -> None:
    f = UsageChunkFilter()
    assert f.filter(CHUNK) is None  # unchanged chunks are not rewritten
    assert f.filter(LAST + USAGE + DONE) == LAST + DONE
    assert f.filter(USAGE) == b""
    assert f.filter(DONE) is None


def test_spacing_and_crlf_framing_do_not_hide_it() -> None:
    spaced = b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}\r\n\r\n'
    assert UsageChunkFilter().filter(spaced + DONE) == DONE


def test_an_event_cut_across_chunks_is_passed_on_unchanged() -> None:
    f = UsageChunkFilter()
    head, tail = USAGE[:20], USAGE[20:]
    assert f.filter(CHUNK + head) is None
    assert f.filter(tail + DONE) is None  # its start went out already: nothing to take back


def test_chunks_with_content_or_a_usage_that_is_not_alone_are_kept() -> None:
    f = UsageChunkFilter()
    continuous = sse({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"completion_tokens": 1}})
    assert f.filter(continuous) is None  # vLLM continuous_usage_stats: a content chunk with usage
    assert f.filter(b'data: {"choices": [], "usage": null}\n\n') is None
    assert f.filter(b"data: not json \"choices\" \"usage\"\n\n") is None
