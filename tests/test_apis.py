"""The shapes of the gateway's whole surface, one behaviour each, through FlowMeter (no
mitmproxy): routes, request-side facts, answers that are not JSON, hollow usage objects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgemeter.metering.apis import route
from edgemeter.metering.flow import FlowMeter, Result
from edgemeter.metering.prices import flat_price
from tests.corpus import FORM, form, wav
from tests.flows import feed_stream, flow_meter


def finish(m: FlowMeter, *, aborted: bool = False) -> Result:
    return m.finish(
        aborted=aborted, now=1.0, currency="OMR", price_of=lambda u, _model: flat_price(u, 156)
    )


def answered(
    api: str, path: str, body: bytes, *, asked: bytes = b"", asked_type: str = "", ctype: str = ""
) -> Result:
    m = flow_meter(api, path=path, request_body=asked)
    m.request_type = asked_type
    m.response_type = ctype or "application/json"
    m.body(200, body, "", 0.5)
    return finish(m)


def meta(result: Result) -> dict[str, Any]:
    assert result.envelope is not None, result.reason
    metadata: dict[str, Any] = result.envelope["metadata"]
    return metadata


@pytest.mark.parametrize(
    ("path", "method", "api"),
    [
        ("/v1/images/generations", "POST", "openai.images"),
        ("/v1/images/edits", "POST", "openai.images"),
        ("/v1/images/variations", "POST", "openai.images"),
        ("/v1/edits", "POST", "openai.edits"),
        ("/v1/audio/transcriptions", "POST", "openai.audio.transcriptions"),
        ("/v1/audio/translations", "POST", "openai.audio.translations"),
        ("/v1/audio/speech", "POST", "openai.audio.speech"),
        ("/v1/rerank", "POST", "rerank"),
        ("/v1/moderations", "POST", "openai.moderations"),
        ("/v1/responses/compact", "POST", "openai.responses"),
        ("/v1/engines/text-embedding-ada-002/embeddings", "POST", "openai.embeddings"),
        ("/v1beta/models/gemini-2.5-pro:generateContent", "POST", "gemini.generate_content"),
        (
            "/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            "POST",
            "gemini.generate_content",
        ),
        ("/v1/realtime?model=gpt-realtime", "GET", "openai.realtime"),
        # Any other POST is generic; a sub-resource of a metered route never is.
        ("/v1/threads/thread_1/runs", "POST", "generic"),
        ("/v1/chat/completions/chatcmpl-123", "POST", None),
        ("/v1/responses/resp_1/cancel", "POST", None),
        ("/v1/messages/count_tokens", "POST", None),
        ("/v1/models", "GET", None),
        ("/v1/chat/completions", "GET", None),
        ("/v1/files/file-1", "DELETE", None),
    ],
)
def test_every_route_has_its_shape(path: str, method: str, api: str | None) -> None:
    shape = route(path, method)
    assert (shape.api if shape is not None else None) == api


def test_a_usage_object_without_counts_is_no_report_and_is_estimated() -> None:
    body = b'{"model":"m","choices":[{"message":{"content":"four score and seven"}}],"usage":{"foo":0}}'
    result = answered("openai.chat", "/v1/chat/completions", body, asked=b'{"messages":[]}')
    assert result.reason == "usage_without_counts"
    assert meta(result)["usage_source"] == "estimated"
    assert meta(result)["output_tokens"] == 5  # 20 characters of content


def test_a_later_usage_without_counts_keeps_the_earlier_report() -> None:
    m = flow_meter("openai.chat")
    m.start_stream(200, "", strip=False)
    feed_stream(
        m,
        [
            b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n',
            b'data: {"model":"m","choices":[],"usage":{"foo":0}}\n\n',
            b"data: [DONE]\n\n",
        ],
    )
    assert (meta(finish(m))["tokens_used"], meta(finish(m))["usage_source"]) == (7, "reported")


@pytest.mark.parametrize(
    "usage",
    [
        # LiteLLM's Claude in OpenAI shape: the Anthropic names beside prompt_tokens.
        {
            "prompt_tokens": 1532,
            "completion_tokens": 33,
            "total_tokens": 1565,
            "cache_read_input_tokens": 1111,
            "cache_creation_input_tokens": 418,
        },
        {
            "prompt_tokens": 1532,
            "completion_tokens": 33,
            "total_tokens": 1565,
            "prompt_tokens_details": {
                "cache_read_input_tokens": 1111,
                "cache_creation_input_tokens": 418,
            },
        },
    ],
)
def test_openai_shaped_usage_with_anthropic_cache_fields_counts_reads_and_writes(
    usage: dict[str, Any],
) -> None:
    body = json.dumps({"model": "claude-sonnet-4-5", "usage": usage}).encode()
    found = meta(answered("openai.chat", "/v1/chat/completions", body))
    assert (found["input_tokens"], found["cached_input_tokens"], found["cache_write_tokens"]) == (
        1532,
        1111,
        418,
    )


def test_an_anthropic_fallback_block_names_the_model_that_is_billed() -> None:
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-fable-5","usage":{"input_tokens":20,"output_tokens":1}}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"fallback","from":{"model":"claude-fable-5"},"to":{"model":"claude-opus-4-8"}}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    m = flow_meter("anthropic.messages", path="/v1/messages")
    m.start_stream(200, "", strip=False)
    feed_stream(m, events)
    result = finish(m)
    assert meta(result)["model"] == "claude-opus-4-8"
    assert (
        result.envelope is not None and result.envelope["reason"] == "usage:newapi:claude-opus-4-8"
    )


def test_a_gemini_stream_without_alt_sse_is_one_json_array() -> None:
    chunks = [
        {
            "modelVersion": "gemini-2.5-flash",
            "responseId": "r1",
            "usageMetadata": {
                "promptTokenCount": 5,
                "candidatesTokenCount": 1,
                "totalTokenCount": 6,
            },
        },
        {
            "modelVersion": "gemini-2.5-flash",
            "responseId": "r1",
            "usageMetadata": {
                "promptTokenCount": 5,
                "candidatesTokenCount": 8,
                "totalTokenCount": 13,
            },
        },
    ]
    found = meta(
        answered(
            "gemini.generate_content",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            json.dumps(chunks).encode(),
        )
    )
    assert (found["model"], found["upstream_id"], found["tokens_used"]) == (
        "gemini-2.5-flash",
        "r1",
        13,
    )


def grounded(queries: list[Any], candidates: int = 1, tokens: int | None = 9) -> dict[str, Any]:
    grounding = {"webSearchQueries": queries, "groundingChunks": []}
    chunk: dict[str, Any] = {
        "modelVersion": "gemini-2.5-pro",
        "candidates": [{"groundingMetadata": grounding} for _ in range(candidates)],
    }
    if tokens is not None:
        chunk["usageMetadata"] = {"promptTokenCount": 4, "totalTokenCount": tokens}
    return chunk


def test_gemini_grounding_bills_each_search_query_of_each_candidate() -> None:
    path = "/v1beta/models/gemini-2.5-pro:generateContent"
    body = json.dumps(grounded(["a", "b"], candidates=2)).encode()
    assert meta(answered("gemini.generate_content", path, body))["units"] == {"web_search_calls": 4}
    # Only queries count: not empty ones, not what is not a string.
    for queries in ([], ["", None, 3, {"q": "x"}]):
        plain = json.dumps(grounded(queries)).encode()
        assert "units" not in meta(answered("gemini.generate_content", path, plain))


def test_a_gemini_streams_repeated_grounding_is_counted_once() -> None:
    m = flow_meter(
        "gemini.generate_content",
        path="/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
    )
    m.start_stream(200, "", strip=False)
    # The queries in a chunk of their own (no usageMetadata) are read too.
    chunks = [grounded([], tokens=5), grounded(["q1", "q2"], tokens=None), grounded(["q1"])]
    feed_stream(m, [f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks])
    found = meta(finish(m))
    assert (found["units"], found["tokens_used"]) == ({"web_search_calls": 2}, 9)


def test_gemini_takes_the_requested_model_from_its_path() -> None:
    body = b'{"candidates":[],"usageMetadata":{"promptTokenCount":3,"totalTokenCount":3}}'
    assert (
        meta(
            answered(
                "gemini.generate_content", "/v1beta/models/gemini-2.5-pro:generateContent", body
            )
        )["model"]
        == "gemini-2.5-pro"
    )


def test_a_verbose_json_transcription_is_billed_on_its_duration() -> None:
    body = b'{"task":"transcribe","language":"english","duration":8.4705,"text":"Hello."}'
    found = meta(
        answered(
            "openai.audio.transcriptions",
            "/v1/audio/transcriptions",
            body,
            asked=form({"model": "whisper-1"}, wav(10)),
            asked_type=FORM,
        )
    )
    assert (found["usage_source"], found["units"], found["usage_raw"]) == (
        "reported",
        {"audio_ms": 8471},
        {"duration": 8.4705},
    )
    assert found["model"] == "whisper-1"


def test_a_text_transcription_is_billed_on_the_uploaded_audio() -> None:
    found = meta(
        answered(
            "openai.audio.transcriptions",
            "/v1/audio/transcriptions",
            b"Hello there.\n",
            asked=form({"model": "whisper-1", "response_format": "text"}, wav(42)),
            asked_type=FORM,
            ctype="text/plain",
        )
    )
    assert (found["usage_source"], found["units"]) == ("estimated", {"audio_ms": 4200})
    assert found["output_tokens"] == 4  # 13 characters of transcript


def test_audio_the_meter_cannot_read_is_billed_on_the_transcript() -> None:
    transcript = "x" * 150  # ten seconds of speech at 15 characters a second
    found = meta(
        answered(
            "openai.audio.translations",
            "/v1/audio/translations",
            json.dumps({"text": transcript}).encode(),
            asked=form({"model": "whisper-1"}, b"\x1aE\xdf\xa3 webm"),
            asked_type=FORM,
        )
    )
    assert (found["usage_source"], found["units"]) == ("estimated", {"audio_ms": 10_000})


def test_binary_speech_is_billed_on_the_characters_asked() -> None:
    asked = (
        b'{"model":"tts-1","input":"The quick brown fox jumped over the lazy dog.","voice":"alloy"}'
    )
    found = meta(
        answered(
            "openai.audio.speech",
            "/v1/audio/speech",
            b"\xff\xfb\x90\x00" * 100,
            asked=asked,
            ctype="audio/mpeg",
        )
    )
    assert (
        found["usage_source"],
        found["units"],
        found["input_tokens"],
        found["output_tokens"],
    ) == ("estimated", {"characters": 45}, 12, 0)


def test_dall_e_is_billed_per_image_at_the_asked_size_and_quality() -> None:
    asked = b'{"model":"dall-e-3","prompt":"a lighthouse","n":2,"size":"1792x1024","quality":"hd"}'
    body = b'{"created":1,"data":[{"url":"https://a"},{"url":"https://b"}]}'
    found = meta(answered("openai.images", "/v1/images/generations", body, asked=asked))
    assert found["units"] == {"images": 2, "image_size": "1792x1024", "image_quality": "hd"}
    assert (found["model"], found["usage_source"], found["output_tokens"]) == (
        "dall-e-3",
        "estimated",
        0,
    )


def test_dall_e_defaults_are_the_apis_when_nothing_is_said() -> None:
    found = meta(
        answered(
            "openai.images",
            "/v1/images/generations",
            b'{"data":[{"url":"u"}]}',
            asked=b'{"model":"dall-e-2","prompt":"a cat"}',
        )
    )
    assert found["units"] == {"images": 1, "image_size": "1024x1024", "image_quality": "standard"}


def test_an_image_count_that_is_no_count_falls_back_to_the_data() -> None:
    found = meta(
        answered(
            "openai.images",
            "/v1/images/generations",
            b'{"data":[]}',
            asked=b'{"model":"dall-e-3","prompt":"p","n":"lots"}',
        )
    )
    assert found["units"]["images"] == 1


def test_a_generic_route_is_billed_when_its_answer_reports_usage() -> None:
    body = b'{"id":"run_1","model":"gpt-4o","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}'
    found = meta(answered("generic", "/v1/threads/t/runs", body))
    assert (found["api"], found["tokens_used"], found["usage_source"]) == (
        "generic",
        15,
        "reported",
    )


@pytest.mark.parametrize(
    "body", [b'{"id":"file-1","object":"file"}', b'{"usage":{"foo":1}}', b"not json"]
)
def test_a_generic_route_without_usage_is_not_billed(body: bytes) -> None:
    assert answered("generic", "/v1/files", body) == Result(None, "unknown_endpoint")


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"total_tokens": 12}, (12, 0)),  # Jina, Voyage: all input
        (
            {"input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 2},
            (7, 2),
        ),  # Anthropic's names
        ({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}, (5, 6)),
    ],
)
def test_generic_usage_is_read_open_world(usage: dict[str, int], tokens: tuple[int, int]) -> None:
    found = meta(answered("generic", "/v1/anything", json.dumps({"usage": usage}).encode()))
    assert (found["input_tokens"], found["output_tokens"]) == tokens


def test_a_search_preview_chat_model_runs_one_web_search() -> None:
    body = b'{"model":"gpt-4o-search-preview-2025-03-11","usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
    assert meta(answered("openai.chat", "/v1/chat/completions", body))["units"] == {
        "web_search_calls": 1
    }


def test_a_duration_that_is_no_number_makes_the_usage_invalid() -> None:
    result = answered(
        "openai.audio.transcriptions",
        "/v1/audio/transcriptions",
        b'{"text":"hi","usage":{"type":"duration","seconds":"7"}}',
        asked=form({"model": "whisper-1"}, wav(10)),
        asked_type=FORM,
    )
    assert result.reason == "invalid_usage"
    assert meta(result)["usage_source"] == "estimated" and meta(result)["units"] == {
        "audio_ms": 1000
    }
