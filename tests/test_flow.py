from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemeter.metering.apis import classify
from edgemeter.metering.flow import FlowMeter
from edgemeter.metering.sse import EventSplitter, SSEDecoder, split_events
from tests.conftest import RECORDED
from tests.corpus import api_of, wire_body
from tests.flows import feed_stream, flow_meter

STREAMS = sorted(p.name for p in RECORDED.glob("*") if p.name.endswith((".sse", ".chunks.txt")))
ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


def meter_for(name: str, *, injected: bool = False) -> FlowMeter:
    api = api_of(name)
    path = {"anthropic.messages": "/v1/messages", "openai.responses": "/v1/responses"}.get(
        api, "/v1/chat/completions"
    )
    assert classify(path) is not None
    return flow_meter(api, path=path, injected=injected)


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def with_line_end(body: bytes, newline: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n").replace(b"\n", newline)


def reference(name: str, body: bytes) -> tuple[object, str | None, str | None]:
    m = meter_for(name)
    m.start_stream(200, "", strip=False)
    feed_stream(m, [body])
    ex = m.extraction
    return ex.usage, ex.model, ex.error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(STREAMS),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    cuts=st.lists(st.integers(min_value=0), max_size=60),
)
def test_any_split_line_end_and_encoding_gives_the_same_usage_and_bytes(
    name: str, newline: bytes, encoding: str, cuts: list[int]
) -> None:
    body = with_line_end(wire_body(RECORDED / name), newline)
    wire = ENCODINGS[encoding](body)
    m = meter_for(name)
    assert m.start_stream(200, encoding, strip=False) is False
    assert feed_stream(m, split(wire, cuts)) == wire
    ex = m.extraction
    assert (ex.usage, ex.model, ex.error) == reference(
        name, with_line_end(wire_body(RECORDED / name), b"\n")
    )


@pytest.mark.parametrize("name", STREAMS)
def test_every_byte_split_of_a_stream_keeps_its_usage(name: str) -> None:
    body = wire_body(RECORDED / name)
    m = meter_for(name)
    m.start_stream(200, "", strip=False)
    assert feed_stream(m, [body[i : i + 1] for i in range(len(body))]) == body
    assert (m.extraction.usage, m.extraction.model, m.extraction.error) == reference(name, body)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(
        [n for n in STREAMS if api_of(n) in ("openai.chat", "openai.completions")]
    ),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_stripping_is_independent_of_splits_and_keeps_the_usage(
    name: str, encoding: str, cuts: list[int]
) -> None:
    body = wire_body(RECORDED / name)
    whole = meter_for(name, injected=True)
    whole.start_stream(200, "", strip=True)
    expected = feed_stream(whole, [body])
    m = meter_for(name, injected=True)
    decoded = m.start_stream(200, encoding, strip=True)
    assert decoded is (encoding != "")
    assert feed_stream(m, split(ENCODINGS[encoding](body), cuts)) == expected
    assert m.extraction.usage == whole.extraction.usage == reference(name, body)[0]
    # Top-level usage is what include_usage adds; Groq's x_groq.usage comes regardless and stays.
    assert not any(isinstance(obj.get("usage"), dict) for obj in data_objects(expected))
    assert (m.stripped, m.trimmed) == (whole.stripped, whole.trimmed)


USAGE = b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}'


@pytest.mark.parametrize(
    ("events", "counts"),
    [
        (
            [
                b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
                b'data: {"choices":[],' + USAGE + b"}\n\n",
                b"data: [DONE]\n\n",
            ],
            (1, 0),
        ),
        (
            [
                b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],' + USAGE + b"}\n\n",
                b"data: [DONE]\n\n",
            ],
            (0, 1),
        ),
        ([b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"], (0, 0)),
    ],
)
def test_what_stripping_takes_out_is_counted(events: list[bytes], counts: tuple[int, int]) -> None:
    """Dropped usage-only events and events that lost their usage key (the LLM usage view
    says so), whether chunks are whole events or not."""
    for chunks in (events, [b"".join(events)], [b"".join(events)[:9], b"".join(events)[9:]]):
        m = flow_meter(injected=True)
        m.start_stream(200, "", strip=True)
        feed_stream(m, chunks)
        assert (m.stripped, m.trimmed) == counts


def seen(m: FlowMeter) -> tuple[object, ...]:
    ex = m.extraction
    return (ex.usage, ex.model, ex.upstream_id, ex.error, ex.final, ex.events, ex.output_chars)


STRIPPABLE = [n for n in STREAMS if api_of(n) in ("openai.chat", "openai.completions")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name_strip=st.one_of(
        st.tuples(st.sampled_from(STREAMS), st.just(False)),
        st.tuples(st.sampled_from(STRIPPABLE), st.just(True)),
    ),
    merge=st.lists(st.booleans(), max_size=80),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
def test_chunks_of_whole_events_among_any_others_meter_and_pass_on_as_one_body(
    name_strip: tuple[str, bool], merge: list[bool], cuts: list[int]
) -> None:
    """Upstreams flush one event per chunk, which the callable takes without framing (see
    FlowMeter.__call__); among merged events and cuts anywhere it must agree with framing."""
    name, strip = name_strip
    body = wire_body(RECORDED / name)
    events, rest = split_events(body)
    ends = list(itertools.accumulate(len(e) for e in events))
    kept = [end for i, end in enumerate(ends) if not (merge[i] if i < len(merge) else False)]
    whole = meter_for(name, injected=strip)
    whole.start_stream(200, "", strip=strip)
    expected = feed_stream(whole, [body])
    m = meter_for(name, injected=strip)
    m.start_stream(200, "", strip=strip)
    assert feed_stream(m, split(body, kept + cuts)) == expected
    assert seen(m) == seen(whole)
    assert rest == b"" or not body.endswith(b"\n\n")


def test_chunks_of_whole_events_are_metered_without_framing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def framed(*args: object) -> None:
        raise AssertionError("framed")

    name = "openai-chat-stream-include-usage.chunks.txt"
    events = split_events(wire_body(RECORDED / name))[0]
    m = meter_for(name, injected=True)
    m.start_stream(200, "", strip=True)
    monkeypatch.setattr(SSEDecoder, "feed", framed)
    monkeypatch.setattr(EventSplitter, "feed", framed)
    sent = b"".join(
        out if isinstance(out, bytes) else b"".join(out) for out in (m(e) for e in events)
    )
    assert m.extraction.final and m.extraction.usage is not None
    assert b'"usage":{' not in sent and sent.endswith(b"data: [DONE]\n\n")


def data_objects(body: bytes) -> list[dict[str, object]]:
    objs = []
    for line in body.splitlines():
        if line.startswith(b"data:"):
            try:
                obj = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                objs.append(obj)
    return objs


def test_a_chunk_the_parser_chokes_on_still_reaches_the_client() -> None:
    m = meter_for("x")
    m.start_stream(200, "gzip", strip=False)
    junk = b"this is not gzip"
    assert m(junk) == junk
    assert m.broken
    assert m(b"more") == b"more"


def test_whole_events_skip_framing_again_once_a_split_event_is_complete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "openai-chat-stream-include-usage.chunks.txt"
    events = split_events(wire_body(RECORDED / name))[0]
    m = meter_for(name, injected=True)
    m.start_stream(200, "", strip=True)
    assert m.quick
    first = events[0]
    m(first[:7])
    assert not m.quick  # part of an event is held: the next chunk needs framing
    m(first[7:])
    assert m.quick and m.extraction.events == 1

    def framed(*args: object) -> None:
        raise AssertionError("framed")

    monkeypatch.setattr(SSEDecoder, "feed", framed)
    monkeypatch.setattr(EventSplitter, "feed", framed)
    for event in events[1:]:
        m(event)
    assert m.extraction.final and m.extraction.usage is not None
