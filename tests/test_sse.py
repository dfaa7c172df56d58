from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemeter.metering.sse import SSEDecoder, SSEEvent

BODY = (
    b": keep-alive comment\n"
    b"event: message_start\n"
    b'data: {"a":1}\n'
    b"\n"
    b'data: {"b":"\xc3\xa9t\xc3\xa9"}\n'
    b"id: 7\n"
    b"\n"
    b"data: line one\n"
    b"data: line two\n"
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)
EVENTS = [
    SSEEvent("message_start", b'{"a":1}'),
    SSEEvent("", b'{"b":"\xc3\xa9t\xc3\xa9"}'),
    SSEEvent("", b"line one\nline two"),
    SSEEvent("", b"[DONE]"),
]


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_are_the_same_for_every_line_end(newline: bytes) -> None:
    assert decode([BODY.replace(b"\n", newline)]) == EVENTS


@given(
    cuts=st.lists(st.integers(min_value=0), max_size=40),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_any_split_gives_the_same_events(cuts: list[int], newline: bytes) -> None:
    body = BODY.replace(b"\n", newline)
    assert decode(split_at(body, cuts)) == EVENTS


@given(
    body=st.lists(
        st.sampled_from(
            [
                b"data: x",
                b"data:y",
                b"data: " + b"z" * 30,
                b"\n",
                b"\r",
                b"\r\n",
                b":c",
                b"event: e",
            ]
        ),
        max_size=40,
    ).map(b"".join),
    limit=st.integers(min_value=4, max_value=60),
)
def test_whole_events_in_a_chunk_each_decode_as_byte_by_byte(body: bytes, limit: int) -> None:
    """Chunks of one whole event (how upstreams flush) take a shortcut: it must agree with the
    line by line path, which a 1-byte chunk always takes."""
    pieces = [p for p in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)|(?<=\r\r)", body) if p]
    whole, byte_by_byte = SSEDecoder(limit), SSEDecoder(limit)
    got = [ev for piece in pieces for ev in whole.feed(piece)]
    want = [ev for i in range(len(body)) for ev in byte_by_byte.feed(body[i : i + 1])]
    assert got == want
    assert whole.overflowed == byte_by_byte.overflowed
    assert whole.close() == byte_by_byte.close()


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\ndata: y\r\n\r\n"]) == [
        SSEEvent("", b"x"),
        SSEEvent("", b"y"),
    ]


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    assert decode([b'data: {"usage":1}']) == [SSEEvent("", b'{"usage":1}')]


def test_field_without_space_and_unknown_fields() -> None:
    assert decode([b"data:x\nretry: 10\nfoo\n\n"]) == [SSEEvent("", b"x")]


def test_an_event_larger_than_the_limit_stops_parsing() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    assert decoder.feed(b"data: " + b"x" * 100) == []
    assert decoder.overflowed
    assert decoder.feed(b"\n\ndata: small\n\n") == []
    assert decoder.close() == []


def test_memory_is_bounded_by_the_event_not_the_body() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    event = b"data: " + b"y" * 500 + b"\n\n"
    for _ in range(10_000):
        assert len(decoder.feed(event)) == 1
    assert not decoder.overflowed


@pytest.mark.parametrize(
    "line",
    [
        b"data: " + b"x" * 100,
        b"event: " + b"x" * 100,
        b": comment " + b"x" * 100,
        b"id: " + b"x" * 100,
    ],
)
@pytest.mark.parametrize("size", [1, 7, 4096])
def test_every_kind_of_line_counts_against_the_limit(line: bytes, size: int) -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    body = line + b"\n\ndata: after\n\n"
    events = [ev for i in range(0, len(body), size) for ev in decoder.feed(body[i : i + size])]
    assert events + decoder.close() == []
    assert decoder.overflowed


def test_many_small_lines_without_a_blank_line_overflow() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    for _ in range(200):
        assert decoder.feed(b"data: 0123456789\n") == []
    assert decoder.overflowed


def test_an_event_just_within_the_limit_is_kept() -> None:
    line = b"data: " + b"y" * 57  # 63 bytes, plus its line end: 64
    decoder = SSEDecoder(max_event_bytes=64)
    events = [ev for byte in range(len(line)) for ev in decoder.feed(line[byte : byte + 1])]
    assert events + decoder.feed(b"\n\n") == [SSEEvent("", b"y" * 57)]
    assert not decoder.overflowed


def test_a_long_line_in_one_byte_chunks_yields_its_event() -> None:
    payload = b"z" * 20_000
    decoder = SSEDecoder()
    body = b"data: " + payload + b"\r\n\r\n"
    events = [ev for i in range(len(body)) for ev in decoder.feed(body[i : i + 1])]
    assert events == [SSEEvent("", payload)]


@pytest.mark.parametrize(
    ("chunk", "event"),
    [
        (b'data: {"a":1}\n\n', ("", b'{"a":1}')),
        (b'data:{"a":1}\n\n', ("", b'{"a":1}')),
        (b"data:  two spaces\n\n", ("", b" two spaces")),
        (b"data:\n\n", ("", b"")),
        (b"data: [DONE]\n\n", ("", b"[DONE]")),
        (
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
            ("message_stop", b'{"type":"message_stop"}'),
        ),
        (b"event:\xc3\xa9\ndata:x\n\n", ("\xe9", b"x")),
        (b"event: \xff\ndata: x\n\n", ("\ufffd", b"x")),
        # Anything else takes the line by line path.
        (b"data: x\r\n\r\n", None),
        (b"data: x\n", None),
        (b"data: x\n\n\n", None),
        (b"data: a\ndata: b\n\n", None),
        (b"data: x\nevent: e\n\n", None),
        (b"event: e\n\n", None),
        (b"event: e\ndata\n\n", None),
        (b": comment\n\n", None),
        (b"id: 1\ndata: x\n\n", None),
        (b"\n\n", None),
    ],
)
def test_whole_takes_one_whole_event_as_feed_would_and_nothing_else(
    chunk: bytes, event: tuple[str, bytes] | None
) -> None:
    assert SSEDecoder().whole(chunk) == event
    if event is not None:
        assert SSEDecoder().feed(chunk) == [SSEEvent(*event)]


def test_whole_refuses_a_chunk_once_anything_is_held() -> None:
    event = b"data: x\n\n"
    for held in (b"data: unfinished", b"data: line\n", b"data: x\r"):
        decoder = SSEDecoder()
        decoder.feed(held)
        assert decoder.whole(event) is None
    small = SSEDecoder(max_event_bytes=8)
    assert small.whole(event) is None  # 9 bytes: the limit is feed's to enforce


@given(
    st.lists(
        st.sampled_from(
            [b"data:", b"data: ", b"event:", b"event: ", b"x", b" ", b"\n", b"\r", b":", b"\xff"]
        ),
        max_size=12,
    ).map(b"".join)
)
def test_whole_never_disagrees_with_feeding_byte_by_byte(chunk: bytes) -> None:
    """Whatever `whole` takes is one event that feed, one byte at a time, makes of it whole,
    with nothing left held."""
    event = SSEDecoder().whole(chunk)
    if event is None:
        return
    decoder = SSEDecoder()
    assert [ev for i in range(len(chunk)) for ev in decoder.feed(chunk[i : i + 1])] == [
        SSEEvent(*event)
    ]
    assert decoder.close() == []
