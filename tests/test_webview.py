"""mitmweb support: what the meter records on each flow, the comment and mark, the "LLM usage"
view that shows the envelope billed, and flows this run did not bill (replayed, loaded)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import contentviews, eventsequence, flowfilter, http
from mitmproxy import io as flowio
from mitmproxy.test import taddons, tflow, tutils

from edgemeter.addon import Meter
from edgemeter.stats import Snapshot, status_text
from edgemeter.webview import (
    ENVELOPE,
    MARK_ESTIMATED,
    MARK_LOADED,
    MARK_REPLAYED,
    MARK_REPORTED,
    RECORD,
    UsageContentview,
    annotation,
    describe,
    extract,
)
from tests.corpus import is_stream, wire_body
from tests.flows import make_flow, run_flow, spooled

TOOL_CALL_STREAM = "openai-chat-stream-tool-call-usage.raw.sse"
STREAM_REQUEST = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


def shown(
    flow: http.HTTPFlow, view_name: str = "auto", message: http.Message | None = None
) -> contentviews.ContentviewResult:
    """What mitmweb shows for the flow's response (or `message`) with the view registered."""
    assert flow.response is not None
    with taddons.context(Meter()) as tctx:
        tctx.options.update(meter_admin_listen="")
        assert "llm usage" in contentviews.registry  # registered by the meter's load
        target = message if message is not None else flow.response
        return contentviews.prettify_message(target, flow, view_name=view_name)


def response_flow(path: str, body: bytes, content_type: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = path
    flow.response = tutils.tresp(headers=http.Headers(content_type=content_type))
    flow.response.content = body
    return flow


async def streamed_inject_strip_flow(addon: Meter, recorded: Path) -> tuple[http.HTTPFlow, bytes]:
    """A streamed chat completion whose client did not ask for usage, metered with the default
    inject-strip; the response keeps what the client got (as store_streamed_bodies does)."""
    flow = make_flow()
    flow.request.content = json.dumps(STREAM_REQUEST).encode()
    sent = await run_flow(addon, flow, 200, wire_body(recorded / TOOL_CALL_STREAM), stream=True)
    assert flow.response is not None
    flow.response.content = sent
    return flow, sent


# -- the view of a billed flow ------------------------------------------------------------------


async def test_a_stripped_stream_shows_the_usage_that_was_billed(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow, sent = await streamed_inject_strip_flow(addon, recorded)
    # What the client got (and mitmweb kept) no longer carries the usage...
    found = extract(flow.request.path, sent, event_stream=True)
    assert found is not None and found.usage is None
    # ...the view shows the envelope the meter billed all the same.
    [env] = spooled(addon)
    result = shown(flow)
    assert result.view_name == "LLM usage"
    text = result.text
    assert text.startswith("status: billed 0.010608 OMR by this meter run\n")
    meta = env["metadata"]
    for line in (
        f'request_id: "{meta["request_id"]}"',
        'customer_id: "cus_42"',
        'tenant_id: "t_7"',
        f'model: "{meta["model"]}"',
        'outcome: "complete"',
        'usage_source: "reported"',
        "amount_micro_omr: -10608",
        'price_version: "flat:156"',
        "  tokens_used: 68",
        f"  input_tokens: {meta['input_tokens']}",
        f"  output_tokens: {meta['output_tokens']}",
        "  reasoning_tokens: 0",
        "usage_raw: " + json.dumps(meta["usage_raw"], sort_keys=True),
    ):
        assert line + "\n" in text, line
    assert '  request: added "stream_options": {"include_usage": true}' in text
    assert (
        "  response: the usage the meter asked for taken out of the client's stream:\n"
        "    1 usage-only event dropped (the Response tab shows what the client got,\n"
    ) in text
    # Every other field of the envelope follows.
    for name in ("latency_ms", "ttft_ms", "upstream_id", "api_key_fingerprint", "schema"):
        assert f"\n  {name}: " in text, name


async def test_a_stream_the_client_asked_usage_for_was_not_changed(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = make_flow()
    flow.request.content = json.dumps(
        {**STREAM_REQUEST, "stream_options": {"include_usage": True}}
    ).encode()
    await run_flow(addon, flow, 200, wire_body(recorded / TOOL_CALL_STREAM), stream=True)
    text = describe(flow)
    assert text is not None
    assert "  request: unchanged\n  response: unchanged\n" in text


def test_every_count_and_unit_of_the_envelope_is_shown() -> None:
    flow = tflow.tflow(resp=True)
    envelope = billed_envelope("reported")
    envelope["metadata"] |= {
        "tokens_detail": {"input_audio": 12, "output_image": 3},
        "units": {"images": 2, "image_size": "1024x1024"},
        "audio_tokens": 5,
        "service_tier": "flex",
    }
    flow.metadata[ENVELOPE] = envelope
    text = describe(flow)
    assert text is not None
    for line in (
        "  audio_tokens: 5",
        "tokens_detail:\n  input_audio: 12\n  output_image: 3",
        'units:\n  images: 2\n  image_size: "1024x1024"',
        '  service_tier: "flex"',
    ):
        assert line + "\n" in text, line


async def test_an_aborted_stream_shows_what_was_billed_on_the_request(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    flow = make_flow()
    flow.request.content = json.dumps(STREAM_REQUEST).encode()
    addon.requestheaders(flow)
    addon.request(flow)
    flow.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"))
    flow.response.content = None  # mitmproxy keeps no body of a stream cut off
    addon.responseheaders(flow)
    assert callable(flow.response.stream)
    flow.response.stream(
        b'data: {"model":"m","choices":[{"delta":{"content":"' + b"y" * 40 + b'"}}]}\n\n'
    )
    flow.error = tflow.terr()
    pending = addon.error(flow)
    if pending is not None:  # else committed before the hook returned (nothing in flight)
        await pending
    [env] = spooled(addon)
    assert shown(flow).text == "Content is missing."  # mitmproxy's own, before any view
    result = shown(flow, message=flow.request)
    assert result.view_name == "LLM usage"  # the default on the request of such a flow
    assert f'request_id: "{env["metadata"]["request_id"]}"' in result.text
    assert 'outcome: "client_aborted"' in result.text


@pytest.mark.parametrize(
    ("fixture", "path", "tokens_used"),
    [
        ("openai-chat-nonstream.json", "/v1/chat/completions", 379),
        ("openai-chat-stream-tool-call-usage.raw.sse", "/v1/chat/completions", 68),
        ("anthropic-messages-stream-simple.raw.sse", "/v1/messages", 25),
    ],
)
def test_a_flow_without_an_envelope_shows_what_its_body_reports(
    recorded: Path, fixture: str, path: str, tokens_used: int
) -> None:
    stream = is_stream(recorded / fixture)
    ctype = "text/event-stream" if stream else "application/json"
    result = shown(response_flow(path, wire_body(recorded / fixture), ctype), "llm usage")
    assert result.view_name == "LLM usage"
    assert result.text.startswith(
        "status: no envelope on this flow (not metered by this meter run)\n"
        "this body reports (not billed):\n"
    )
    assert f"tokens_used: {tokens_used}\n" in result.text


async def test_an_unbilled_flow_says_why(meter: tuple[Meter, Any]) -> None:
    addon, _ = meter
    flow = make_flow()
    await run_flow(addon, flow, 500, b'{"error": {"message": "boom"}}', False)
    assert ENVELOPE not in flow.metadata
    assert flow.comment == "" and flow.marked == ""
    assert flow.metadata[RECORD] == {"not_billed": "non_2xx"}
    assert shown(flow, "llm usage").text.startswith("status: not billed (non_2xx)\n")


def test_the_view_is_chosen_for_streams_and_offered_for_json(recorded: Path) -> None:
    sse = response_flow(
        "/v1/messages",
        wire_body(recorded / "anthropic-messages-stream-simple.raw.sse"),
        "text/event-stream",
    )
    assert shown(sse).view_name == "LLM usage"
    body = wire_body(recorded / "openai-chat-nonstream.json")
    assert (
        shown(response_flow("/v1/chat/completions", body, "application/json")).view_name == "JSON"
    )
    # A request keeps its JSON view while the response shows the bill.
    assert shown(sse, message=sse.request).view_name != "LLM usage"


def test_the_view_declines_paths_that_are_not_metered() -> None:
    flow = response_flow("/api/status", b'{"usage": {"prompt_tokens": 1}}', "application/json")
    assert extract("/api/status", b"{}", False) is None
    assert flow.response is not None
    with pytest.raises(ValueError, match="not a metered"):
        UsageContentview().prettify(
            flow.response.content or b"",
            contentviews.Metadata(flow=flow, http_message=flow.response),
        )


# -- comment, mark, finding a flow ------------------------------------------------------------


REQUEST_ID = "019aa6f0-3c2e-7d41-9a1b-5f0c2d9e8a77"


def billed_envelope(source: str) -> dict[str, Any]:
    return {
        "customer_id": "cus_42",
        "amount_omr": -0.023556,
        "amount_micro_omr": -23556,
        "reason": "usage:newapi:gpt-4o-mini",
        "metadata": {
            "request_id": REQUEST_ID,
            "tenant_id": "t_7",
            "model": "gpt-4o-mini",
            "tokens_used": 151,
            "input_tokens": 120,
            "output_tokens": 31,
            "currency": "OMR",
            "outcome": "complete",
            "usage_source": source,
            "price_version": "flat:156",
        },
    }


def test_the_comment_starts_with_amount_outcome_and_request_id() -> None:
    comment, mark = annotation(billed_envelope("reported"))
    assert comment == (
        f"0.023556 OMR complete {REQUEST_ID} · 120 in / 31 out tokens (reported) · flat:156 · "
        "customer cus_42 tenant t_7 · edgemeter"
    )
    assert mark == MARK_REPORTED
    assert annotation(billed_envelope("estimated"))[1] == MARK_ESTIMATED


async def test_a_flow_is_found_by_its_request_id_with_a_mitmproxy_filter(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    body = wire_body(recorded / "openai-chat-nonstream.json")
    flows = [make_flow() for _ in range(3)]
    for flow in flows:
        await run_flow(addon, flow, 200, body, False)
    wanted = flows[1].metadata[ENVELOPE]["metadata"]["request_id"]
    assert [e["metadata"]["request_id"] for e in spooled(addon)].count(wanted) == 1
    match = flowfilter.parse(f"~comment {wanted}")
    assert [flow for flow in flows if match(flow)] == [flows[1]]
    assert flows[1].marked == MARK_REPORTED


async def test_a_replayed_flow_is_marked_and_not_billed_again(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow, _ = await streamed_inject_strip_flow(addon, recorded)
    billed = flow.metadata[ENVELOPE]
    comment = flow.comment
    for _ in range(2):  # replayed twice: said once
        flow.is_replay = "request"  # what mitmproxy's client replay sets
        addon.requestheaders(flow)
        addon.request(flow)
        addon.responseheaders(flow)
        assert addon.response(flow) is None
    assert len(spooled(addon)) == 1
    assert flow.comment == f"replayed: not billed by this run · {comment}"
    assert flow.marked == MARK_REPLAYED
    assert flow.metadata[ENVELOPE] is billed
    text = describe(flow)
    assert text is not None
    assert text.startswith(
        "status: replayed: not billed by this run; the original request was billed 0.010608 OMR\n"
    )


async def test_a_server_replay_is_not_billed(meter: tuple[Meter, Any], recorded: Path) -> None:
    addon, _ = meter
    flow = make_flow()
    addon.requestheaders(flow)
    addon.request(flow)
    # mitmproxy's server playback answers from a file in its request hook, after the meter's.
    flow.is_replay = "response"
    flow.response = tutils.tresp(headers=http.Headers(content_type="application/json"))
    flow.response.content = wire_body(recorded / "openai-chat-nonstream.json")
    assert addon.response(flow) is None
    assert spooled(addon) == []
    assert flow.metadata[RECORD] == {"not_billed": "replayed"}


async def test_a_flow_loaded_from_a_file_keeps_its_envelope_and_is_not_billed_again(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow, _ = await streamed_inject_strip_flow(addon, recorded)
    saved = io.BytesIO()
    flowio.FlowWriter(saved).add(flow)
    [loaded] = list(flowio.FlowReader(io.BytesIO(saved.getvalue())).stream())
    assert isinstance(loaded, http.HTTPFlow) and not loaded.live
    for hook in eventsequence.iterate(loaded):  # what mitmproxy's load_flow calls
        if (pending := getattr(addon, hook.name)(*hook.args())) is not None:
            await pending
    assert len(spooled(addon)) == 1
    request_id = flow.metadata[ENVELOPE]["metadata"]["request_id"]
    assert loaded.metadata[ENVELOPE] == flow.metadata[ENVELOPE]
    assert loaded.marked == MARK_LOADED
    assert loaded.comment.startswith(
        f"loaded: not billed by this run · 0.010608 OMR complete {request_id}"
    )
    assert flowfilter.match(f"~comment {request_id}", loaded)
    result = shown(loaded)
    assert result.text.startswith(
        "status: loaded from a file: not billed by this run; billed 0.010608 OMR when it was recorded\n"
    )
    assert 'usage_source: "reported"' in result.text


# -- meter.status ------------------------------------------------------------------------------


def test_status_is_a_line_each_or_one_line_for_mitmweb() -> None:
    snapshot = Snapshot(
        metered={("openai.chat", "complete", "reported"): 3},
        unmetered={"non_2xx": 1},
        anomalies={},
        tokens={},
        amount_micro=0,
        currency="OMR",
        rejected=0,
        unknown_keys=0,
        spool_failures={},
        spool_writable=True,
        spool_envelopes=2,
        spool_bytes=0,
        spool_oldest_age_s=None,
        dead_letters=0,
        acked=1,
        duplicates=0,
        publish_errors={},
        broker_connected=True,
        broker_down_s=None,
        stream_missing=False,
        publishing=True,
    )
    lines = [
        "spooled: 2",
        "broker: connected, acked 1, duplicates 0, errors 0",
        "spool failures: 0",
        "metered openai.chat complete reported: 3",
        "not metered (non_2xx): 1",
    ]
    assert status_text(snapshot) == "\n".join(lines)
    assert status_text(snapshot, one_line=True) == " · ".join(lines)


def test_flush_wakes_the_publisher_only_when_running(meter: tuple[Meter, Any]) -> None:
    addon, _ = meter
    assert addon.flush() == "the meter is not running"
