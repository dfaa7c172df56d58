"""mitmweb support: flow comments and marks, and the "LLM usage" contentview."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow, tutils

from edgemeter.addon import Meter
from edgemeter.webview import MARK_ESTIMATED, MARK_REPORTED, UsageContentview, annotation, extract
from tests.corpus import is_stream, wire_body
from tests.flows import make_flow, run_flow


def shown(flow: http.HTTPFlow, view_name: str = "auto") -> contentviews.ContentviewResult:
    """What mitmweb shows for the flow's response once the meter is loaded."""
    assert flow.response is not None
    with taddons.context(Meter()) as tctx:
        tctx.options.update(meter_admin_listen="")
        assert "llm usage" in contentviews.registry  # registered by the meter's load
        return contentviews.prettify_message(flow.response, flow, view_name=view_name)


def response_flow(path: str, body: bytes, content_type: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = path
    flow.response = tutils.tresp(headers=http.Headers(content_type=content_type))
    flow.response.content = body
    return flow


@pytest.mark.parametrize(
    ("fixture", "path", "tokens_used"),
    [
        ("openai-chat-nonstream.json", "/v1/chat/completions", 379),
        ("openai-chat-stream-tool-call-usage.raw.sse", "/v1/chat/completions", 68),
        ("anthropic-messages-stream-simple.raw.sse", "/v1/messages", 25),
    ],
)
def test_the_view_shows_the_usage_the_meter_reads(
    recorded: Path, fixture: str, path: str, tokens_used: int
) -> None:
    stream = is_stream(recorded / fixture)
    ctype = "text/event-stream" if stream else "application/json"
    result = shown(response_flow(path, wire_body(recorded / fixture), ctype), "llm usage")
    assert result.view_name == "LLM usage"
    assert f"tokens_used: {tokens_used}\n" in result.text
    assert "usage_raw: {" in result.text


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


def test_the_view_declines_paths_that_are_not_metered() -> None:
    flow = response_flow("/api/status", b'{"usage": {"prompt_tokens": 1}}', "application/json")
    assert extract("/api/status", b"{}", False) is None
    assert flow.response is not None
    with pytest.raises(ValueError, match="not a metered"):
        UsageContentview().prettify(
            flow.response.content or b"",
            contentviews.Metadata(flow=flow, http_message=flow.response),
        )


def test_a_body_without_usage_says_it_would_be_estimated() -> None:
    found = extract("/v1/chat/completions", b'{"choices": []}', False)
    assert found is not None and found.usage is None


def envelope(source: str) -> dict[str, Any]:
    return {
        "amount_micro_omr": -23556,
        "metadata": {
            "input_tokens": 120,
            "output_tokens": 31,
            "currency": "OMR",
            "outcome": "complete",
            "usage_source": source,
            "price_version": "flat:156",
        },
    }


def test_the_comment_says_tokens_amount_and_outcome() -> None:
    comment, mark = annotation(envelope("reported"))
    assert comment == (
        "edgemeter: 120 in / 31 out tokens, 0.023556 OMR, complete (reported), flat:156"
    )
    assert mark == MARK_REPORTED
    assert annotation(envelope("estimated"))[1] == MARK_ESTIMATED


async def test_a_metered_flow_carries_comment_mark_and_envelope(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = make_flow()
    await run_flow(addon, flow, 200, wire_body(recorded / "openai-chat-nonstream.json"), False)
    env = flow.metadata["edgemeter"]
    assert env["metadata"]["tokens_used"] == 379
    assert flow.comment.startswith("edgemeter: ") and "complete (reported)" in flow.comment
    assert flow.marked == MARK_REPORTED


async def test_an_unmetered_flow_is_left_unmarked(meter: tuple[Meter, Any]) -> None:
    addon, _ = meter
    flow = make_flow()
    await run_flow(addon, flow, 500, b'{"error": {"message": "boom"}}', False)
    assert "edgemeter" not in flow.metadata
    assert flow.comment == "" and flow.marked == ""


def test_flush_wakes_the_publisher_only_when_running(meter: tuple[Meter, Any]) -> None:
    addon, _ = meter
    assert addon.flush() == "the meter is not running"
