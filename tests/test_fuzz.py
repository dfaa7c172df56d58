"""Hypothesis suites over everything an upstream or a client controls: arbitrary bytes and
hostile JSON against the SSE framer, the usage extractors, the request rewriter, the envelope
and FlowMeter as mitmproxy's stream callable."""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from collections.abc import Callable
from typing import Any, TypeGuard

import brotli
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemeter.errors import InvalidUsage
from edgemeter.metering.apis.anthropic_messages import normalize_anthropic
from edgemeter.metering.apis.openai_chat import normalize_openai
from edgemeter.metering.apis.openai_responses import normalize_responses
from edgemeter.metering.envelope import MAX_RAW_BYTES, Facts, build, encode
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.flow import FlowMeter, Limits
from edgemeter.metering.prices import flat_price
from edgemeter.metering.sse import SSEDecoder, SSEEvent
from edgemeter.metering.stream_usage import inject, strip_event
from edgemeter.metering.usage import MAX_TOKENS, Usage, clean_name
from tests import flows
from tests.flows import assert_books_or_reconciles, feed_stream

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
APIS: list[str] = [
    "openai.chat",
    "openai.completions",
    "openai.embeddings",
    "openai.responses",
    "anthropic.messages",
]
ENCODE: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}

# -- strategies ---------------------------------------------------------------------------------

# Text with everything a hostile party can put in JSON: controls, bidi marks, lone surrogates.
nasty_text = st.text(
    st.characters(codec=None, exclude_categories=()), max_size=12
) | st.sampled_from(["", "gpt-4o-mini", "\x00", "\u202e", "\ud800", "m" * 300, " x "])
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 10_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 12.0, 1e3, 2.0**40, 2.0**40 + 1, -0.0]),
)
scalars = st.none() | st.booleans() | numbers | nasty_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)
COUNT_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "prompt_cache_hit_tokens",
]
DETAILS = {
    "prompt_tokens_details": ["cached_tokens", "cache_write_tokens"],
    "completion_tokens_details": ["reasoning_tokens"],
    "input_tokens_details": ["cached_tokens"],
    "output_tokens_details": ["reasoning_tokens", "thinking_tokens"],
}
count_values = st.one_of(st.integers(0, 2**30), scalars, json_values)
flat_usage = st.fixed_dictionaries({}, optional=dict.fromkeys(COUNT_KEYS, count_values))
usage_objects = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(COUNT_KEYS, count_values),
        **{
            key: st.fixed_dictionaries({}, optional=dict.fromkeys(keys, count_values)) | json_values
            for key, keys in DETAILS.items()
        },
        "iterations": st.lists(flat_usage | json_values, max_size=3) | json_values,
        "extra": json_values,
    },
)


def sse_like(max_size: int = 60) -> st.SearchStrategy[bytes]:
    """Bytes made of SSE's own tokens, usage and error fragments, and arbitrary bytes."""
    token = st.sampled_from(
        [b"data: ", b"data:", b"event: ", b":", b"\n", b"\r", b"\r\n", b"\n\n", b"{", b"}",
         b'"usage":{"prompt_tokens":5,"completion_tokens":2}', b'"usage":null', b'"model":"m"',
         b'"choices":[]', b'"error"', b"[DONE]", b'"type":"message_start"', b"\xc3", b"\xa9"]
    )  # fmt: skip
    return st.lists(token | st.binary(max_size=8), max_size=max_size).map(b"".join)


def event_data(api: str) -> st.SearchStrategy[bytes]:
    """One event's data: a hostile object of the API's shape, or garbage."""
    usage = usage_objects.map(lambda u: {"usage": u})
    openai = st.fixed_dictionaries(
        {"model": nasty_text | json_values, "id": nasty_text, "choices": json_values},
        optional={"usage": usage_objects, "x_groq": usage, "error": json_values},
    )
    anthropic = st.fixed_dictionaries(
        {"type": st.sampled_from(["message_start", "message_delta", "error", "ping"])},
        optional={
            "message": st.fixed_dictionaries(
                {}, optional={"model": nasty_text, "usage": usage_objects}
            ),
            "usage": usage_objects,
        },
    )
    responses = st.fixed_dictionaries(
        {"type": st.sampled_from(["response.completed", "response.failed", "response.created"])},
        optional={
            "response": st.fixed_dictionaries(
                {}, optional={"model": nasty_text, "usage": usage_objects}
            )
        },
    )
    shaped = {"anthropic.messages": anthropic, "openai.responses": responses}.get(api, openai)
    encoded = shaped.map(
        lambda obj: json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )
    return encoded | sse_like(20)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- the SSE framer ---------------------------------------------------------------------------


def frame(chunks: list[bytes], max_event: int) -> tuple[list[SSEEvent], bool]:
    decoder = SSEDecoder(max_event)
    events = [ev for chunk in chunks for ev in decoder.feed(chunk)]
    return events + decoder.close(), decoder.overflowed


@FUZZ
@given(
    body=sse_like() | st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    max_event=st.sampled_from([8, 64, 1024]),
)
def test_framing_is_the_same_for_any_split_and_never_exceeds_the_limit(
    body: bytes, cuts: list[int], max_event: int
) -> None:
    events, overflowed = frame(splits(body, cuts), max_event)
    assert (events, overflowed) == frame([body], max_event)
    for ev in events:
        assert len(ev.data) + len(ev.event) <= max_event


# -- every usage extractor ---------------------------------------------------------------------


def is_count(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (not isinstance(value, float) or value.is_integer()) and 0 <= value <= MAX_TOKENS


def counts_in(usage: dict[str, Any]) -> list[object]:
    """Every value normalisation reads as a count, wherever it sits."""
    values: list[object] = [usage[k] for k in COUNT_KEYS if usage.get(k) is not None]
    for key, keys in DETAILS.items():
        if isinstance(detail := usage.get(key), dict):
            values += [detail[k] for k in keys if detail.get(k) is not None]
    if isinstance(its := usage.get("iterations"), list):
        for part in its:
            if isinstance(part, dict):
                values += [part[k] for k in COUNT_KEYS if part.get(k) is not None]
    return values


def assert_validated(u: Usage) -> None:
    fields = (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens)
    for value in (*fields, u.reasoning_tokens):
        assert type(value) is int and 0 <= value <= MAX_TOKENS
    assert u.cached_input_tokens <= u.input_tokens and u.cache_write_tokens <= u.input_tokens
    assert u.reasoning_tokens <= u.output_tokens


NORMALIZE: list[Callable[[dict[str, Any]], Usage]] = [
    normalize_openai,
    lambda u: normalize_openai(u, anthropic_counts=True),
    normalize_responses,
    normalize_anthropic,
]


@FUZZ
@given(usage=usage_objects, which=st.sampled_from(range(len(NORMALIZE))))
def test_normalising_hostile_usage_gives_validated_counts_or_invalid_usage(
    usage: dict[str, Any], which: int
) -> None:
    small = all(is_count(v) and v < 2**30 for v in counts_in(usage))
    try:
        u = NORMALIZE[which](usage)
    except InvalidUsage:
        # Only what is not a count, or a sum past the cap, is refused.
        assert not small
        return
    assert_validated(u)


@FUZZ
@given(
    api=st.sampled_from(APIS),
    data=st.data(),
)
def test_extraction_of_hostile_events_and_bodies_keeps_only_validated_values(
    api: str, data: st.DataObject
) -> None:
    ex = Extraction(api)
    for payload in data.draw(st.lists(event_data(api), max_size=5)):
        ex.event(SSEEvent(data.draw(st.sampled_from(["", "message_delta", "error"])), payload))
    ex.body(data.draw(event_data(api)))
    ex.tail(data.draw(event_data(api)))
    assert ex.model is None or clean_name(ex.model) == ex.model
    assert ex.upstream_id is None or clean_name(ex.upstream_id) == ex.upstream_id
    if ex.usage is not None:
        assert_validated(ex.usage)


# -- the request rewriter ----------------------------------------------------------------------


def canonical(obj: object) -> str:
    # NaN-aware equality: the same JSON text, keys sorted.
    return json.dumps(obj, sort_keys=True)


request_bodies = st.dictionaries(
    st.sampled_from(["model", "messages", "stream", "stream_options", "n", "x"]) | nasty_text,
    json_values,
    max_size=6,
).map(lambda d: {**d, "stream": True} if d.get("stream") is not False else d)


@FUZZ
@given(
    obj=request_bodies,
    ascii_only=st.booleans(),
    spaces=st.sampled_from(["", " ", "\n\t "]),
)
def test_injection_gives_the_same_json_plus_include_usage(
    obj: dict[str, Any], ascii_only: bool, spaces: str
) -> None:
    text = spaces + json.dumps(obj, ensure_ascii=ascii_only) + spaces
    # Lone surrogates written raw are not UTF-8: such a body is not JSON and must stay as it is.
    body = text.encode("utf-8", "surrogatepass")
    out = inject(body)
    try:
        parsed = json.loads(body.decode("utf-8"))
    except ValueError:
        assert out is None
        return
    options = parsed.get("stream_options")
    if parsed.get("stream") is not True or (
        isinstance(options, dict) and options.get("include_usage") is True
    ):
        assert out is None
        return
    assert out is not None
    expected = {
        **parsed,
        "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
    }
    assert canonical(json.loads(out.decode("utf-8"))) == canonical(expected)


@FUZZ
@given(body=st.binary(max_size=300) | sse_like())
def test_injection_never_rewrites_what_is_not_a_json_object(body: bytes) -> None:
    out = inject(body)
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        assert out is None
        return
    if out is not None:
        assert isinstance(parsed, dict) and parsed.get("stream") is True
        assert json.loads(out)["stream_options"]["include_usage"] is True


@FUZZ
@given(obj=request_bodies, garbage=st.sampled_from([b",", b"}", b"x", b"\xff", b"{", b"]"]))
def test_injection_leaves_invalid_json_untouched(obj: dict[str, Any], garbage: bytes) -> None:
    body = json.dumps(obj).encode() + garbage
    assert inject(body) is None


@FUZZ
@given(raw=sse_like() | st.binary(max_size=200))
def test_stripping_an_event_never_raises_and_keeps_any_event_without_usage(raw: bytes) -> None:
    out = strip_event(raw)
    if b'"usage"' not in raw:
        assert out is raw


# -- the envelope builder ----------------------------------------------------------------------


def strict(data: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in an envelope")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


@FUZZ
@given(
    strings=st.lists(nasty_text, min_size=6, max_size=6),
    counts=st.lists(st.integers(0, MAX_TOKENS), min_size=2, max_size=2),
    raw=st.dictionaries(nasty_text, json_values, max_size=5),
    times=st.lists(st.floats(0, 4e9), min_size=3, max_size=3),
)
def test_the_envelope_is_always_strict_utf8_json_with_validated_names(
    strings: list[str], counts: list[int], raw: dict[str, Any], times: list[float]
) -> None:
    model, tenant, customer, client_id, upstream_id, path = strings
    facts = Facts(
        request_id="0193a6f0-0000-7000-8000-000000000001",
        api="openai.chat",
        path=path,
        stream=True,
        status_code=200,
        model=model,
        tenant_id=tenant,
        customer_id=customer,
        started_at=times[0],
        completed_at=times[1],
        first_byte_at=times[2],
        outcome="complete",
        usage_source="reported",
        currency="OMR",
        client_request_id=client_id,
        upstream_id=upstream_id,
    )
    usage = Usage(counts[0], 0, 0, counts[1], 0, raw)
    built = build(facts, usage, flat_price(usage, 156))
    data = encode(built)
    # Whatever the names and counts, billing books it or it is marked for reconciliation.
    assert_books_or_reconciles(built, data)
    env = strict(data)
    meta = env["metadata"]
    assert meta["model"] == (clean_name(model) or "unknown")
    assert env["reason"] == "usage:newapi:" + meta["model"].lower()
    assert meta["upstream_id"] in ("", upstream_id)
    assert meta["tokens_used"] == sum(counts)
    assert len(json.dumps(meta["usage_raw"])) <= MAX_RAW_BYTES


# -- FlowMeter as the stream callable ----------------------------------------------------------


def flow_meter(api: str, *, injected: bool = False) -> FlowMeter:
    return flows.flow_meter(
        api,
        path="/v1/x",
        limits=Limits(max_body_bytes=64 * 1024, max_event_bytes=256),
        injected=injected,
        request_body=b'{"model":"asked","messages":[{"role":"user","content":"hi"}]}',
        tenant="t",
        customer="c",
    )


def finish_checked(m: FlowMeter, aborted: bool) -> None:
    result = m.finish(
        aborted=aborted, now=1.0, currency="OMR", price_of=lambda u, _: flat_price(u, 156)
    )
    if result.envelope is None:
        assert result.reason
        return
    assert result.data == encode(result.envelope)
    assert_books_or_reconciles(result.envelope, result.data)
    meta = strict(result.data)["metadata"]
    for key in ("input_tokens", "output_tokens", "tokens_used"):
        assert type(meta[key]) is int and 0 <= meta[key] <= 2 * MAX_TOKENS
    assert clean_name(meta["model"]) == meta["model"]


@FUZZ
@given(
    api=st.sampled_from(APIS),
    encoding=st.sampled_from(sorted(ENCODE)),
    body=sse_like() | st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    aborted=st.booleans(),
)
def test_any_bytes_reach_the_client_exactly_as_they_came(
    api: str, encoding: str, body: bytes, cuts: list[int], aborted: bool
) -> None:
    m = flow_meter(api)
    assert m.start_stream(200, encoding, strip=False) is False
    assert feed_stream(m, splits(body, cuts)) == body  # as declared, the bytes are not even encoded
    finish_checked(m, aborted)


@FUZZ
@given(
    api=st.sampled_from(APIS),
    encoding=st.sampled_from(sorted(ENCODE)),
    body=sse_like(),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_validly_encoded_streams_reach_the_client_exactly_as_they_came(
    api: str, encoding: str, body: bytes, cuts: list[int]
) -> None:
    wire = ENCODE[encoding](body)
    m = flow_meter(api)
    m.start_stream(200, encoding, strip=False)
    assert feed_stream(m, splits(wire, cuts)) == wire
    finish_checked(m, aborted=False)


@FUZZ
@given(
    encoding=st.sampled_from(sorted(ENCODE)),
    body=sse_like(),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    valid=st.booleans(),
)
def test_stripping_arbitrary_streams_never_raises(
    encoding: str, body: bytes, cuts: list[int], valid: bool
) -> None:
    wire = ENCODE[encoding](body) if valid else body
    m = flow_meter("openai.chat", injected=True)
    decoded = m.start_stream(200, encoding, strip=True)
    sent = feed_stream(m, splits(wire, cuts))
    if not decoded and b'"usage"' not in body:
        # Nothing to strip: the client gets the upstream's bytes, byte for byte.
        assert sent == wire
    if decoded and valid and b'"usage"' not in body:
        assert sent == body
    finish_checked(m, aborted=False)


@FUZZ
@given(
    api=st.sampled_from(APIS),
    encoding=st.sampled_from([*sorted(ENCODE), "gzip, br", "compress"]),
    data=st.data(),
    valid=st.booleans(),
)
def test_any_non_streamed_body_is_metered_without_raising(
    api: str, encoding: str, data: st.DataObject, valid: bool
) -> None:
    body = data.draw(event_data(api) | st.binary(max_size=200))
    raw = ENCODE[encoding](body) if valid and encoding in ENCODE else body
    m = flow_meter(api)
    m.body(200, raw, encoding, 0.5)
    finish_checked(m, aborted=False)


def test_a_nan_in_usage_raw_becomes_null_not_invalid_json() -> None:
    # The one float json.loads lets through that strict JSON forbids.
    m = flow_meter("openai.chat")
    m.body(200, b'{"model":"m","usage":{"prompt_tokens":1,"queue_time":NaN}}', "", 0.5)
    result = m.finish(
        aborted=False, now=1.0, currency="OMR", price_of=lambda u, _: flat_price(u, 156)
    )
    assert result.envelope is not None
    raw = strict(encode(result.envelope))["metadata"]["usage_raw"]
    assert raw == {"prompt_tokens": 1, "queue_time": None}
