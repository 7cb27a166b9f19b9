"""SSEFramer: WHATWG event-stream framing over arbitrarily split network chunks."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.metering.sse import SSEEvent, SSEFramer


def frame(stream: bytes, *, max_event_bytes: int = 1024 * 1024) -> list[SSEEvent]:
    framer = SSEFramer(max_event_bytes)
    return framer.feed(stream) + framer.close()


def frame_split(chunks: list[bytes], *, max_event_bytes: int = 1024 * 1024) -> tuple[list[SSEEvent], int]:
    framer = SSEFramer(max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    events += framer.close()
    return events, framer.dropped_events


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# -- framing rules -----------------------------------------------------------------------------


def test_data_line_followed_by_blank_line_is_one_event() -> None:
    assert frame(b'data: {"a":1}\n\n') == [SSEEvent(None, b'{"a":1}')]


def test_event_is_returned_as_soon_as_its_blank_line_arrives() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: one\n") == []
    assert framer.feed(b"\n") == [SSEEvent(None, b"one")]


def test_multiple_data_lines_are_joined_with_newline() -> None:
    assert frame(b"data: first\ndata: second\ndata:\n\n") == [SSEEvent(None, b"first\nsecond\n")]


def test_event_field_names_the_event_and_resets_after_dispatch() -> None:
    stream = b"event: message_start\ndata: {}\n\ndata: [DONE]\n\n"
    assert frame(stream) == [SSEEvent("message_start", b"{}"), SSEEvent(None, b"[DONE]")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": keep-alive\nid: 7\nretry: 1000\nfoo: bar\ndata: x\n\n: ping\n\n"
    assert frame(stream) == [SSEEvent(None, b"x")]


def test_only_one_space_after_the_colon_is_removed() -> None:
    assert frame(b"data:no-space\n\ndata:  two\n\n") == [SSEEvent(None, b"no-space"), SSEEvent(None, b" two")]


def test_line_without_colon_is_a_field_with_empty_value() -> None:
    assert frame(b"data\n\n") == [SSEEvent(None, b"")]


def test_event_without_data_is_not_dispatched() -> None:
    assert frame(b"event: ping\n\nid: 3\n\n") == []


def test_crlf_and_cr_line_endings_are_accepted() -> None:
    stream = b"event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n"
    assert frame(stream) == [SSEEvent("a", b"1"), SSEEvent("b", b"2"), SSEEvent(None, b"3")]


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: x\r") == []
    assert framer.feed(b"\n\r") == [SSEEvent(None, b"x")]
    assert framer.feed(b"\ndata: y\r\n\r\n") == [SSEEvent(None, b"y")]


def test_multibyte_utf8_split_between_chunks_is_reassembled() -> None:
    payload = "data: héllo 😀\n\n".encode()
    cut = payload.index("😀".encode()) + 2
    framer = SSEFramer()
    assert framer.feed(payload[:cut]) == []
    events = framer.feed(payload[cut:])
    assert events == [SSEEvent(None, "héllo 😀".encode())]
    assert events[0].data.decode() == "héllo 😀"


def test_non_ascii_event_name_is_decoded() -> None:
    assert frame("event: café\ndata: x\n\n".encode()) == [SSEEvent("café", b"x")]


def test_leading_byte_order_mark_is_ignored() -> None:
    assert frame(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent(None, b"x")]


def test_close_flushes_a_final_event_without_blank_line() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\n\ndata: last") == [SSEEvent(None, b"a")]
    assert framer.close() == [SSEEvent(None, b"last")]


def test_close_flushes_a_terminated_line_without_blank_line() -> None:
    framer = SSEFramer()
    assert framer.feed(b"event: done\ndata: z\n") == []
    assert framer.close() == [SSEEvent("done", b"z")]


def test_close_without_pending_event_returns_nothing() -> None:
    framer = SSEFramer()
    framer.feed(b"data: a\n\n")
    assert framer.close() == []


def test_empty_chunks_are_harmless() -> None:
    framer = SSEFramer()
    assert framer.feed(b"") == []
    assert framer.feed(b"data: a\n") == []
    assert framer.feed(b"") == []
    assert framer.feed(b"\n") == [SSEEvent(None, b"a")]


def test_several_events_in_one_chunk() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(5))
    assert [e.data for e in frame(stream)] == [b"0", b"1", b"2", b"3", b"4"]


# -- memory bound ------------------------------------------------------------------------------


def test_oversized_event_is_dropped_and_counted_and_the_stream_continues() -> None:
    framer = SSEFramer(max_event_bytes=64)
    big = b"data: " + b"x" * 100 + b"\n\n"
    events = framer.feed(b"data: small\n\n" + big + b"data: after\n\n")
    assert events == [SSEEvent(None, b"small"), SSEEvent(None, b"after")]
    assert framer.dropped_events == 1


def test_oversized_multi_line_event_is_dropped_once() -> None:
    framer = SSEFramer(max_event_bytes=64)
    lines = b"".join(b"data: " + b"y" * 20 + b"\n" for _ in range(10))
    assert framer.feed(lines + b"\ndata: ok\n\n") == [SSEEvent(None, b"ok")]
    assert framer.dropped_events == 1


def test_unterminated_line_is_dropped_before_it_ends_without_buffering() -> None:
    framer = SSEFramer(max_event_bytes=1024)
    framer.feed(b"data: ")
    for _ in range(1000):  # 1 MiB of one line, never terminated
        assert framer.feed(b"z" * 1024) == []
    assert framer.dropped_events == 1
    assert framer.feed(b"\n\ndata: next\n\n") == [SSEEvent(None, b"next")]
    assert framer.dropped_events == 1


def test_event_is_dropped_mid_line_once_its_lines_so_far_exceed_the_limit() -> None:
    framer = SSEFramer(max_event_bytes=64)
    framer.feed(b"data: " + b"a" * 50 + b"\n")  # 56 bytes of this event so far
    assert framer.dropped_events == 0
    framer.feed(b"data: bbbb")  # 66 with the unterminated line: over, before it ends
    assert framer.dropped_events == 1


def test_oversized_final_event_is_not_flushed_by_close() -> None:
    framer = SSEFramer(max_event_bytes=16)
    framer.feed(b"data: " + b"q" * 40)
    assert framer.close() == []
    assert framer.dropped_events == 1


# -- properties --------------------------------------------------------------------------------

# Pieces chosen to hit every boundary: line endings (including a split \r\n), multi-byte UTF-8,
# field names, comments, a BOM and bytes that are not valid UTF-8 at all.
_PIECES = [
    b"data: ",
    b"data:",
    b"data",
    b"event: ",
    b"id: 1",
    b": comment",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"x",
    b"{}",
    "é".encode(),
    "😀".encode(),
    "中文".encode(),
    b"\xef\xbb\xbf",
    b"\xff",
    b":",
    b" ",
]


@st.composite
def streams_with_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = b"".join(draw(st.lists(st.sampled_from(_PIECES), max_size=60)))
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    return stream, cuts


@settings(max_examples=400)
@given(streams_with_cuts(), st.sampled_from([8, 32, 1024 * 1024]))
def test_any_split_of_a_stream_yields_the_same_events_as_feeding_it_whole(
    stream_cuts: tuple[bytes, list[int]], max_event_bytes: int
) -> None:
    stream, cuts = stream_cuts
    whole = frame_split([stream], max_event_bytes=max_event_bytes)
    assert frame_split(split_at(stream, cuts), max_event_bytes=max_event_bytes) == whole
    one_byte_chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert frame_split(one_byte_chunks, max_event_bytes=max_event_bytes) == whole


_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=12)


@st.composite
def well_formed_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent], list[int]]:
    """A stream of events with random line endings, and the events a correct parser must see."""
    events: list[SSEEvent] = []
    out: list[bytes] = []
    previous_ending = b"\n"
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(st.none() | _TEXT.filter(lambda s: s != "" and not s.startswith(" ")))
        data_lines = draw(st.lists(_TEXT, min_size=1, max_size=3))
        lines: list[bytes] = []
        if draw(st.booleans()):
            lines.append(b": keep-alive")
        if name is not None:
            lines.append(b"event: " + name.encode())
        lines += [b"data: " + line.encode() for line in data_lines]
        lines.append(b"")  # the blank line that dispatches
        for line in lines:
            endings = [b"\n", b"\r\n", b"\r"]
            if previous_ending == b"\r" and line == b"":
                endings = [b"\r\n", b"\r"]  # "\r" + "\n" would be one ending, not a blank line
            previous_ending = draw(st.sampled_from(endings))
            out.append(line + previous_ending)
        joined = "\n".join(data_lines).encode()
        events.append(SSEEvent(name, joined))
    stream = b"".join(out)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    return stream, events, cuts


@settings(max_examples=300)
@given(well_formed_streams())
def test_well_formed_events_survive_any_split(case: tuple[bytes, list[SSEEvent], list[int]]) -> None:
    stream, expected, cuts = case
    events, dropped = frame_split(split_at(stream, cuts))
    assert events == expected
    assert dropped == 0
