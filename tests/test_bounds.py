"""Issue 7, items 4 and 5 end to end: bounded bodies, events, decompression and memory over many
streams, and untrusted numbers and names, through FlowMeter and through the addon's hooks."""

from __future__ import annotations

import functools
import gc
import gzip
import json
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import exceptions, http, websocket
from mitmproxy.test import taddons, tflow, tutils
from wsproto.frame_protocol import Opcode

from edgemeter.addon import Meter
from edgemeter.metering.decoding import MAX_RATIO, SLACK
from edgemeter.metering.flow import FlowMeter, Limits, Result
from edgemeter.metering.prices import flat_price
from tests import flows
from tests.flows import feed_stream, make_flow, run_flow, spooled, upgraded

KIB = 1024
MIB = 1024 * KIB
SMALL = Limits(max_body_bytes=1 * MIB, max_event_bytes=1 * KIB)


def flow_meter(
    api: str = "openai.chat", *, limits: Limits = SMALL, injected: bool = False
) -> FlowMeter:
    return flows.flow_meter(
        api,
        path={"anthropic.messages": "/v1/messages"}.get(api, "/v1/chat/completions"),
        limits=limits,
        injected=injected,
        request_body=b'{"model":"asked","messages":[{"role":"user","content":"hello there"}]}',
        tenant="t",
        customer="c",
    )


def finish(m: FlowMeter, aborted: bool = False) -> Result:
    return m.finish(
        aborted=aborted, now=1.0, currency="OMR", price_of=lambda u, _: flat_price(u, 156)
    )


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CONTENT = sse({"id": "c1", "model": "gpt-x", "choices": [{"delta": {"content": "Hello world"}}]})
USAGE_ONLY = sse(
    {
        "id": "c1",
        "model": "gpt-x",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
)
BIG = sse({"id": "c1", "choices": [{"delta": {"content": "x" * 2000}}]})  # over 1 KiB
DONE = b"data: [DONE]\n\n"


# -- one SSE event over meter_max_event_kb ----------------------------------------------------------


@pytest.mark.parametrize("encoding", ["", "gzip"])
@pytest.mark.parametrize("size", [7, 4096])
def test_an_oversize_event_stops_parsing_and_every_byte_still_flows(
    encoding: str, size: int
) -> None:
    body = CONTENT + BIG + USAGE_ONLY + DONE
    wire = gzip.compress(body) if encoding else body
    m = flow_meter()
    m.start_stream(200, encoding, strip=False)
    assert feed_stream(m, pieces(wire, size)) == wire
    assert m.stopped == "oversize_event"
    result = finish(m)
    assert result.reason == "oversize_event" and result.envelope is not None
    # The usage after the oversize event was never read: billed on what was seen.
    meta = result.envelope["metadata"]
    assert meta["usage_source"] == "estimated" and meta["output_tokens"] >= 3


def test_usage_seen_before_an_oversize_event_is_billed_as_reported() -> None:
    m = flow_meter()
    m.start_stream(200, "", strip=False)
    feed_stream(m, [USAGE_ONLY, BIG, DONE])
    result = finish(m)
    assert result.envelope is not None and result.reason == "oversize_event"
    meta = result.envelope["metadata"]
    assert (meta["usage_source"], meta["input_tokens"], meta["output_tokens"]) == ("reported", 9, 3)


@pytest.mark.parametrize("size", [5, 300, 100_000])
def test_stripping_stops_at_an_oversize_event_and_the_rest_passes_as_it_came(size: int) -> None:
    # The first usage event is the meter's own and is stripped; after the oversize event
    # nothing is parsed or held, so the second reaches the client as the upstream sent it.
    body = CONTENT + USAGE_ONLY + BIG + CONTENT + USAGE_ONLY + DONE
    m = flow_meter(injected=True)
    assert m.start_stream(200, "", strip=True) is False
    assert feed_stream(m, pieces(body, size)) == CONTENT + BIG + CONTENT + USAGE_ONLY + DONE
    assert m.stopped == "oversize_event"
    result = finish(m)
    assert result.envelope is not None and result.reason == "oversize_event"
    assert result.envelope["metadata"]["input_tokens"] == 9


def test_an_endless_event_is_not_held_while_stripping() -> None:
    m = flow_meter(injected=True)
    m.start_stream(200, "", strip=True)
    line = b"data: " + b"y" * 10_000  # no line end, ever
    sent = b""
    for chunk in pieces(line, 100):
        out = m(chunk)
        sent += out if isinstance(out, bytes) else b"".join(out)
    # Held only up to the limit, then passed on as it comes: all of it before the end.
    assert sent == line
    assert m.stopped == "oversize_event"
    assert m.splitter is not None and m.splitter.pending == 0
    assert feed_stream(m, []) == b""


# -- compression bombs ----------------------------------------------------------------------


@functools.cache
def sse_bomb() -> bytes:
    """64 MiB of small valid events, gzip-compressed to about 100 KB."""
    event = b"data: " + b"x" * 1000 + b"\n\n"
    block = event * 1000
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(c.compress(block) for _ in range(64 * MIB // len(block))), c.flush()])


def traced(fn: Any) -> tuple[Any, int]:
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("size", [16 * KIB, 1 * MIB])
def test_a_streamed_bomb_stops_parsing_and_reaches_the_client_as_it_came(size: int) -> None:
    wire = sse_bomb()
    chunks = pieces(wire, size)
    m = flow_meter()
    m.start_stream(200, "gzip", strip=False)
    sent, peak = traced(lambda: feed_stream(m, chunks))
    print(f"streamed bomb, {size} B chunks: peak {peak / MIB:.1f} MiB")
    assert sent == wire
    assert m.stopped == "decompression_limit"
    assert peak < 4 * MIB
    result = finish(m)
    assert result.reason == "decompression_limit" and result.envelope is not None


def test_a_bomb_decoded_for_the_client_ends_at_the_bound() -> None:
    wire = sse_bomb()
    m = flow_meter(injected=True)
    assert m.start_stream(200, "gzip", strip=True) is True
    outs, peak = traced(lambda: [m(chunk) for chunk in [*pieces(wire, 16 * KIB), b""]])
    sent = b"".join(b"".join(out) for out in outs)
    print(f"decoded bomb: {len(sent)} B sent, peak {peak / MIB:.1f} MiB")
    assert m.truncated and m.stopped == "decompression_limit"
    # What was sent is the upstream's own decoded events, up to the bound and no further.
    assert 0 < len(sent) <= len(wire) * MAX_RATIO + SLACK
    assert sent == gzip.decompress(wire)[: len(sent)]
    assert peak < 8 * MIB


def test_a_non_streamed_bomb_is_not_parsed_and_costs_bounded_memory() -> None:
    m = flow_meter()
    _, peak = traced(lambda: m.body(200, sse_bomb(), "gzip", 0.5))
    print(f"non-streamed bomb: peak {peak / MIB:.1f} MiB")
    assert m.stopped == "decompression_limit"
    assert peak < SMALL.max_body_bytes + 4 * MIB
    result = finish(m)
    assert result.reason == "decompression_limit" and result.envelope is not None
    assert result.envelope["metadata"]["usage_source"] == "estimated"


# -- non-streamed bodies over meter_max_body_mb ------------------------------------------------


def embeddings(n: int) -> bytes:
    vector = ",".join(["0.0123"] * 100)
    data = ",".join(
        f'{{"object":"embedding","index":{i},"embedding":[{vector}]}}' for i in range(n)
    )
    usage = f'"usage":{{"prompt_tokens":{n},"total_tokens":{n}}}'
    return f'{{"object":"list","data":[{data}],"model":"text-embedding-3-small",{usage}}}'.encode()


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_an_oversize_body_is_billed_from_the_usage_at_its_end(encoding: str) -> None:
    body = embeddings(3000)  # about 2.3 MiB
    assert len(body) > SMALL.max_body_bytes
    raw = gzip.compress(body) if encoding else body
    m = flow_meter("openai.embeddings")
    _, peak = traced(lambda: m.body(200, raw, encoding, 0.5))
    assert m.stopped == "oversize"
    # The identity body was never copied, let alone parsed; the encoded one was decoded up to
    # the limit, then only its tail was kept.
    assert peak < (SMALL.max_body_bytes + MIB if encoding else 512 * KIB)
    result = finish(m)
    assert result.reason == "oversize" and result.envelope is not None
    meta = result.envelope["metadata"]
    assert (meta["usage_source"], meta["input_tokens"], meta["output_tokens"]) == (
        "reported",
        3000,
        0,
    )


def test_an_oversize_body_without_usage_at_its_end_is_billed_on_the_estimate() -> None:
    m = flow_meter()
    m.body(200, b'{"choices":[{"message":{"content":"' + b"z" * (2 * MIB) + b'"}}]}', "", 0.5)
    result = finish(m)
    assert result.reason == "oversize" and result.envelope is not None
    assert result.envelope["metadata"]["usage_source"] == "estimated"


# -- memory over hundreds of concurrent streams -----------------------------------------------

STREAMS = 200
EVENTS = b"".join(
    sse(
        {"id": "c", "model": "m", "choices": [{"delta": {"content": f"token {i} "}}], "usage": None}
    )
    for i in range(4)
)
# Cut mid-event, so every stream holds a partial event between calls.
CUTS = [EVENTS[:50], EVENTS[50:170], EVENTS[170:]]


def rounds_of(encoding: str, rounds: int) -> list[list[bytes]]:
    if not encoding:
        return [CUTS] * rounds
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    # A streaming server flushes per write: each write decodes on its own.
    return [[c.compress(cut) + c.flush(zlib.Z_SYNC_FLUSH) for cut in CUTS] for _ in range(rounds)]


def peak_growth(encoding: str, strip: bool, rounds: int) -> int:
    wire = rounds_of(encoding, rounds)
    meters = [flow_meter(limits=Limits(), injected=strip) for _ in range(STREAMS)]
    for m in meters:
        m.start_stream(200, encoding, strip=strip)

    def run() -> None:
        for chunks in wire:
            for m in meters:
                for chunk in chunks:
                    m(chunk)

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("encoding", "strip"), [("", False), ("gzip", True)])
def test_memory_of_many_streams_does_not_grow_with_their_length(encoding: str, strip: bool) -> None:
    short = peak_growth(encoding, strip, 3)
    long = peak_growth(encoding, strip, 30)
    print(
        f"{STREAMS} streams, {encoding or 'identity'}, strip={strip}: peak growth "
        f"{short / STREAMS / KIB:.1f} KiB/stream at 12 events, {long / STREAMS / KIB:.1f} at 120"
    )
    assert long < 1.5 * short + 64 * KIB
    assert long / STREAMS < 64 * KIB


# -- through the addon's hooks -------------------------------------------------------------


@pytest.mark.parametrize("option", ["meter_max_body_mb", "meter_max_event_kb"])
@pytest.mark.parametrize("value", [0, -1])
def test_limits_must_be_positive(meter: tuple[Meter, Any], option: str, value: int) -> None:
    addon, tctx = meter
    with pytest.raises(exceptions.OptionsError, match=option):
        tctx.configure(addon, **{option: value})


async def test_a_long_websocket_session_keeps_a_bounded_history(meter: tuple[Meter, Any]) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_websocket_keep=50)
    flow = upgraded(addon)
    assert flow.websocket is not None
    # An hour of Realtime audio is ~36,000 appends; mitmproxy alone would keep them all.
    append = json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 1024}).encode()
    longest = 0
    for _ in range(1000):
        message = websocket.WebSocketMessage(Opcode.TEXT, True, append)
        flow.websocket.messages.append(message)
        assert addon.websocket_message(flow) is None
        assert flow.websocket.messages[-1] is message  # what mitmproxy sends on is still there
        longest = max(longest, len(flow.websocket.messages))
    assert longest == 100 and len(flow.websocket.messages) >= 50
    usage = {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20}
    done = {
        "type": "response.done",
        "response": {"id": "r1", "status": "completed", "usage": usage},
    }
    flow.websocket.messages.append(
        websocket.WebSocketMessage(Opcode.TEXT, False, json.dumps(done).encode())
    )
    # Journaled before mitmproxy passes the event on: nothing for it to await.
    assert addon.websocket_message(flow) is None
    [env] = spooled(addon)
    assert (env["metadata"]["upstream_id"], env["metadata"]["tokens_used"]) == ("r1", 30)


def test_a_websocket_flow_read_from_a_file_keeps_its_whole_history(
    meter: tuple[Meter, Any],
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_websocket_keep=10)
    flow = tflow.twebsocketflow()
    flow.live = False  # as mitmweb's Open and -r replay a saved session's messages
    assert flow.websocket is not None
    for _ in range(500):
        flow.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, True, b"{}"))
        assert addon.websocket_message(flow) is None
    assert len(flow.websocket.messages) >= 500


def test_with_keep_0_every_websocket_message_is_kept(meter: tuple[Meter, Any]) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_websocket_keep=0)
    flow = tflow.twebsocketflow()  # not a metered session: bounded all the same, unless 0
    assert flow.websocket is not None
    for _ in range(300):
        flow.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, True, b"{}"))
        assert addon.websocket_message(flow) is None
    assert len(flow.websocket.messages) >= 300
    with pytest.raises(exceptions.OptionsError, match="meter_websocket_keep"):
        tctx.configure(addon, meter_websocket_keep=-1)


@pytest.fixture
def small_meter(meter: tuple[Meter, taddons.context]) -> Iterator[Meter]:
    addon, tctx = meter
    tctx.configure(addon, meter_max_body_mb=1, meter_max_event_kb=1)
    yield addon


async def test_an_oversize_answer_passes_untouched_and_is_counted(small_meter: Meter) -> None:
    body = embeddings(3000)
    flow = make_flow("/v1/embeddings")
    sent = await run_flow(small_meter, flow, 200, body, stream=False)
    assert sent == body and flow.response is not None and flow.response.raw_content == body
    assert small_meter.stats.anomalies == {"oversize": 1}
    [env] = spooled(small_meter)
    assert env["metadata"]["input_tokens"] == 3000


async def test_an_oversize_event_is_counted_and_the_client_gets_every_byte(
    small_meter: Meter,
) -> None:
    flow = make_flow()
    flow.request.content = b'{"model":"m","stream":true,"messages":[]}'
    body = CONTENT + BIG + USAGE_ONLY + DONE
    sent = await run_flow(small_meter, flow, 200, body, stream=True)
    assert sent == body
    assert small_meter.stats.anomalies == {"oversize_event": 1}
    assert len(spooled(small_meter)) == 1


async def test_a_bomb_answer_reaches_the_client_as_it_came(small_meter: Meter) -> None:
    wire = sse_bomb()
    flow = make_flow()
    small_meter.requestheaders(flow)
    small_meter.request(flow)
    flow.response = tutils.tresp(
        headers=http.Headers(content_type="application/json", content_encoding="gzip")
    )
    flow.response.raw_content = wire
    small_meter.responseheaders(flow)

    async def respond() -> None:
        pending = small_meter.response(flow)
        if pending is not None:  # else committed before the hook returned (nothing in flight)
            await pending

    gc.collect()
    tracemalloc.start()
    try:
        await respond()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert flow.response.raw_content is wire
    assert small_meter.stats.anomalies == {"decompression_limit": 1}
    assert peak < 8 * MIB


def test_a_bomb_request_is_neither_decoded_nor_rewritten(small_meter: Meter) -> None:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"'
    wire = c.compress(head) + b"".join(c.compress(b" " * MIB) for _ in range(64)) + c.flush()
    flow = make_flow()
    flow.request.headers["content-encoding"] = "gzip"
    flow.request.raw_content = wire
    small_meter.requestheaders(flow)
    _, peak = traced(lambda: small_meter.request(flow))
    assert flow.request.raw_content is wire
    assert small_meter.flows[flow.id].request_body == b""
    assert peak < 4 * MIB


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": 1},
        {"prompt_tokens": 1.5},
        {"prompt_tokens": "12"},
        {"prompt_tokens": 10**13},
        {"completion_tokens": True},
    ],
)
async def test_invalid_usage_is_counted_and_billed_on_the_estimate(
    meter: tuple[Meter, Any], usage: dict[str, Any]
) -> None:
    addon, _ = meter
    body = json.dumps({"model": "gpt-x", "choices": [], "usage": usage}).encode()
    await run_flow(addon, make_flow(), 200, body, stream=False)
    assert addon.stats.anomalies == {"invalid_usage": 1}
    [env] = spooled(addon)
    meta = env["metadata"]
    assert meta["usage_source"] == "estimated"
    assert meta["usage_raw"] == {}
    assert all(
        type(meta[k]) is int and 0 <= meta[k] < 10**6 for k in ("input_tokens", "output_tokens")
    )


async def test_nan_counts_from_the_upstream_never_reach_the_envelope(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    body = b'{"model":"gpt-x","usage":{"prompt_tokens":NaN,"completion_tokens":Infinity}}'
    await run_flow(addon, make_flow(), 200, body, stream=False)
    assert addon.stats.anomalies == {"invalid_usage": 1}
    [env] = spooled(addon)
    assert env["metadata"]["usage_source"] == "estimated"


@pytest.mark.parametrize(
    ("reported", "requested", "model"),
    [
        ("gpt-4o\u0000\u001b[2J", "requested-model", "requested-model"),
        ("m" * 1_000_000, "requested-model", "requested-model"),
        (None, "evil\u202emodel", "unknown"),
        (None, "x" * 10_000, "unknown"),
    ],
)
async def test_absurd_models_are_counted_and_never_reach_the_envelope(
    meter: tuple[Meter, Any], reported: str | None, requested: str, model: str
) -> None:
    addon, _ = meter
    flow = make_flow()
    flow.request.content = json.dumps({"model": requested, "messages": []}).encode()
    answer: dict[str, Any] = {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    if reported is not None:
        answer["model"] = reported
    await run_flow(addon, flow, 200, json.dumps(answer).encode(), stream=False)
    assert addon.stats.anomalies == {"invalid_model": 1}
    [env] = spooled(addon)
    assert env["metadata"]["model"] == model
    assert env["reason"] == f"usage:newapi:{model}"
    assert env["metadata"]["tokens_used"] == 7
