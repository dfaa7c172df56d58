from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemeter.metering.apis import SHAPES, Shape
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import EventSplitter, split_events
from edgemeter.metering.stream_usage import inject, strip_event


def test_a_streamed_request_without_usage_is_asked_for_it() -> None:
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"\xc3\xa9"}]}'
    out = inject(body)
    assert out is not None
    obj = json.loads(out)
    assert obj["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in obj.items() if k != "stream_options"} == json.loads(body)
    assert out.endswith(body[1:])  # the client's bytes are kept, only prefixed


@pytest.mark.parametrize(
    "options",
    [{"include_usage": False}, {"include_obfuscation": False}, None, "junk"],
)
def test_existing_stream_options_are_kept_and_usage_turned_on(options: object) -> None:
    body = json.dumps({"model": "m", "stream": True, "stream_options": options}).encode()
    out = inject(body)
    assert out is not None
    got = json.loads(out)["stream_options"]
    assert got["include_usage"] is True
    if isinstance(options, dict):
        assert {k: v for k, v in got.items() if k != "include_usage"} == {
            k: v for k, v in options.items() if k != "include_usage"
        }


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        b'{"model":"m","stream":false}',
        b'{"model":"m"}',
        b'{"model":"m","stream":"true"}',
        b'{"stream":true,',
        b'[{"stream":true}]',
        b"",
        b'\xff"stream"',
    ],
)
def test_bodies_that_need_no_change_or_are_malformed_are_left_alone(body: bytes) -> None:
    assert inject(body) is None


@given(st.binary(max_size=200))
def test_inject_never_corrupts_a_body(body: bytes) -> None:
    out = inject(body)
    if out is not None:
        assert json.loads(out)["stream_options"]["include_usage"] is True


CHUNK = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE_ONLY = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1}}\n\n'
USAGE_WITH_CHOICES = (
    b'data: {"id":"c","choices":[{"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1}}\r\n\r\n'
)


def test_a_usage_only_event_is_dropped() -> None:
    assert strip_event(USAGE_ONLY) == b""


def test_only_the_usage_key_goes_where_the_event_carries_choices() -> None:
    out = strip_event(USAGE_WITH_CHOICES)
    assert out.endswith(b"\r\n\r\n")
    obj = json.loads(out.removeprefix(b"data: "))
    assert obj == {"id": "c", "choices": [{"delta": {}, "finish_reason": "stop"}]}


@pytest.mark.parametrize("event", [CHUNK, b"data: [DONE]\n\n", b": comment\n\n"])
def test_other_events_pass_byte_for_byte(event: bytes) -> None:
    assert strip_event(event) is event


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_are_split_whole_with_their_blank_line(newline: bytes) -> None:
    body = (CHUNK + USAGE_ONLY).replace(b"\n", newline)
    events, rest = split_events(body + b"data: par")
    assert b"".join(events) == body and len(events) == 2
    assert rest == b"data: par"


def test_a_trailing_cr_waits_for_its_lf() -> None:
    events, rest = split_events(b"data: x\r\n\r")
    assert events == [] and rest == b"data: x\r\n\r"


@pytest.mark.parametrize(
    "body",
    [
        # Lone surrogates cannot be UTF-8: they are written escaped, the JSON stays equal.
        b'{"stream":true,"stream_options":null,"messages":[{"content":"\\ud800 caf\xc3\xa9"}]}',
        b'  \n{"stream":true}',
    ],
)
def test_odd_but_valid_bodies_are_rewritten_into_equal_json(body: bytes) -> None:
    out = inject(body)
    assert out is not None
    out.decode("utf-8")
    expected = json.loads(body)
    expected["stream_options"] = {"include_usage": True}
    assert json.loads(out) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":true,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        # What Python's json reads but RFC 8259 JSON is not: a BOM, UTF-16 (whose bytes here
        # happen to spell "stream"), a lone surrogate written raw (CESU-8).
        b'\xef\xbb\xbf{"stream":true,"model":"m"}',
        '{"stream":true,"x":"\u7322\u7274\u6165\u226d"}'.encode("utf-16-le"),
        '{"stream":true,"x":"\ud800"}'.encode("utf-8", "surrogatepass"),
    ],
)
def test_bodies_only_pythons_json_reads_are_left_alone(body: bytes) -> None:
    assert b'"stream"' in body
    assert inject(body) is None


def test_stripping_a_chunk_with_a_lone_surrogate_keeps_it_escaped() -> None:
    raw = b'data: {"choices":[{"delta":{"content":"\\udc80"}}],"usage":{"prompt_tokens":1}}\n\n'
    obj = json.loads(strip_event(raw).removeprefix(b"data: "))
    assert obj == {"choices": [{"delta": {"content": "\udc80"}}]}


@given(
    body=st.binary(max_size=300)
    | st.lists(
        st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b":c", b"event: e", b"yy"]),
        max_size=40,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_the_splitter_gives_the_same_events_for_any_split(body: bytes, cuts: list[int]) -> None:
    whole, rest = split_events(body)
    assert b"".join(whole) + rest == body
    splitter = EventSplitter()
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    events = [ev for a, b in itertools.pairwise(points) for ev in splitter.feed(body[a:b])]
    assert events == whole
    assert splitter.pending == len(rest)
    assert splitter.take() == rest


@given(
    body=st.lists(
        st.sampled_from([b"data: x", b"data: {}", b"\n", b"\r", b"\r\n", b":c", b"event: e"]),
        max_size=40,
    ).map(b"".join)
)
def test_whole_events_in_a_chunk_split_as_byte_by_byte(body: bytes) -> None:
    """Chunks of one whole event take a shortcut past the line search: it must agree with
    feeding the same bytes one at a time."""
    pieces = [p for p in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)|(?<=\r\r)", body) if p]
    whole, byte_by_byte = EventSplitter(), EventSplitter()
    got = [ev for piece in pieces for ev in whole.feed(piece)]
    want = [ev for i in range(len(body)) for ev in byte_by_byte.feed(body[i : i + 1])]
    assert got == want
    assert whole.take() == byte_by_byte.take()


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.stream_options], ids=lambda s: s.api)
def test_shapes_whose_usage_is_stripped_say_which_events_name_a_usage_object(shape: Shape) -> None:
    # The stream callable strips only events whose shape set usage_named (FlowMeter.__call__).
    ex = Extraction(shape)
    for data, named in [
        (b'{"model":"m","choices":[{"delta":{"content":"x"}}],"usage":null}', False),
        (b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}', True),
        (b'{"choices":[],"usage": {"prompt_tokens":1,"completion_tokens":2}}', True),
        (b'{"choices":[{"delta":{"content":"\\"usage\\""}}]}', False),
        (b"[DONE]", False),
    ]:
        ex.data(data)
        assert ex.usage_named is named
        assert (strip_event(b"data: " + data + b"\n\n") != b"data: " + data + b"\n\n") is named
