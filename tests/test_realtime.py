"""One Realtime session's metering without mitmproxy: which server events bill, and how."""

from __future__ import annotations

import itertools
import json
from typing import Any

from edgemeter.metering.flow import Request, Result
from edgemeter.metering.prices import flat_price
from edgemeter.metering.realtime import MAX_OPEN, RealtimeMeter

USAGE = {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20}


def session() -> RealtimeMeter:
    ids = itertools.count()
    request = Request("", "openai.realtime", "/v1/realtime", 0.0, "t", "c", "cli", "fp")
    return RealtimeMeter(request, "gpt-realtime-mini", lambda: f"id-{next(ids)}")


def server(s: RealtimeMeter, event: dict[str, Any] | bytes, at: float = 1.0) -> list[Result]:
    data = event if isinstance(event, bytes) else json.dumps(event).encode()
    return s.server(data, now=at, currency="OMR", price_of=lambda u, _m: flat_price(u, 156))


def end(s: RealtimeMeter) -> list[Result]:
    return s.end(now=9.0, currency="OMR", price_of=lambda u, _m: flat_price(u, 156))


def done(status: str, usage: dict[str, Any] | None, rid: str = "resp_1") -> dict[str, Any]:
    return {"type": "response.done", "response": {"id": rid, "status": status, "usage": usage}}


def meta(result: Result) -> dict[str, Any]:
    assert result.envelope is not None, result.reason
    metadata: dict[str, Any] = result.envelope["metadata"]
    return metadata


def test_a_response_is_billed_at_its_done_event_with_its_own_id() -> None:
    s = session()
    server(s, {"type": "response.created", "response": {"id": "resp_1"}}, at=1.0)
    server(
        s, {"type": "response.output_text.delta", "response_id": "resp_1", "delta": "hi"}, at=1.25
    )
    [result] = server(s, done("completed", USAGE), at=2.0)
    found = meta(result)
    assert (found["request_id"], found["upstream_id"], found["model"]) == (
        "id-0",
        "resp_1",
        "gpt-realtime-mini",
    )
    assert (found["latency_ms"], found["ttft_ms"], found["tokens_used"]) == (1000, 250, 30)
    assert end(s) == []


def test_the_session_names_the_model_and_the_transcriber() -> None:
    s = session()
    server(
        s,
        {
            "type": "session.updated",
            "session": {
                "model": "gpt-realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            },
        },
    )
    [response] = server(s, done("completed", USAGE))
    [heard] = server(
        s,
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_1",
            "usage": {"type": "tokens", "input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
        },
    )
    assert meta(response)["model"] == "gpt-realtime"
    assert (meta(heard)["model"], meta(heard)["api"], meta(heard)["tokens_used"]) == (
        "gpt-4o-transcribe",
        "openai.realtime.transcription",
        7,
    )


def test_a_transcription_without_usage_bills_nothing() -> None:
    assert (
        server(
            session(),
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "i",
                "transcript": "hi",
            },
        )
        == []
    )


def test_a_cancelled_response_bills_what_it_reported_as_client_aborted() -> None:
    [result] = server(session(), done("cancelled", USAGE))
    assert (meta(result)["outcome"], meta(result)["usage_source"], meta(result)["tokens_used"]) == (
        "client_aborted",
        "reported",
        30,
    )


def test_a_failed_response_without_usage_bills_nothing() -> None:
    assert server(session(), done("failed", None)) == [Result(None, "upstream_error_without_usage")]


def test_a_failed_response_with_usage_is_an_upstream_error() -> None:
    [result] = server(session(), done("failed", USAGE))
    assert meta(result)["outcome"] == "upstream_error"


def test_audio_deltas_are_counted_without_being_parsed() -> None:
    s = session()
    server(s, {"type": "response.created", "response": {"id": "resp_1"}})
    # Not JSON past its start: counted all the same (64,000 base64 characters = 1 s of pcm16).
    delta = (
        b'{"type":"response.output_audio.delta","response_id":"resp_1","delta":"' + b"A" * 64_000
    )
    assert server(s, delta) == []
    [cut] = end(s)
    found = meta(cut)
    assert (found["outcome"], found["usage_source"]) == ("client_aborted", "estimated")
    assert found["tokens_detail"] == {"output_audio": 20}  # 1000 ms at 50 ms a token
    assert found["output_tokens"] == 20 and found["input_tokens"] == 1


def test_an_estimate_counts_what_the_client_sent_for_the_response() -> None:
    s = session()
    s.client(
        b'{"type":"conversation.item.create","item":{"content":[{"type":"input_text","text":"twelve chars"}]}}'
    )
    s.client(b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 128_000 + b'"}')
    server(s, {"type": "response.created", "response": {"id": "resp_1"}})
    [cut] = end(s)
    # 12 characters = 3 tokens; ~2 s of pcm16 at 100 ms a token = 20 tokens.
    assert meta(cut)["input_tokens"] == 23
    assert meta(cut)["tokens_detail"] == {"input_text": 3, "input_audio": 20}


def test_invalid_usage_is_estimated_and_says_so() -> None:
    [result] = server(session(), done("completed", {"input_tokens": -1, "output_tokens": 2}))
    assert result.reason == "invalid_usage" and meta(result)["usage_source"] == "estimated"


def test_open_responses_are_bounded() -> None:
    s = session()
    for i in range(MAX_OPEN + 5):
        server(s, {"type": "response.created", "response": {"id": f"resp_{i}"}})
    assert len(s.open) == MAX_OPEN
    assert len(end(s)) == MAX_OPEN


def test_what_is_not_an_event_is_ignored() -> None:
    s = session()
    for data in (b"", b"[1,2]", b"\xff\xfe", b'{"type":"error","error":{"message":"x"}}'):
        assert server(s, data) == []
