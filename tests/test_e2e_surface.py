"""End to end over the whole surface: the openai and google-genai SDKs (and a rerank request) call
a real mitmdump in front of the demo upstream; envelopes are read back from JetStream."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from google import genai
from google.genai import types

from edgemeter.metering.attribution import fingerprint
from tests.corpus import wav
from tests.test_e2e import API_KEY, METADATA, PRICE, TENANT, TOP_LEVEL, Ledger, Published, billed
from tests.test_e2e import unique as unique_id
from tools.demo_surface import IMAGE_TOKENS, TRANSCRIPT
from tools.demo_upstream import CANNED_REPLY, BackgroundDemo
from tools.harness import MeterFactory, MeterProxy, NatsServer
from tools.streams import ensure_stream

REPLY_TOKENS = len(CANNED_REPLY.split())  # the demo counts a word as a token
UPLOAD = wav(25)  # 2.5 s of audio


@pytest.fixture(scope="module")
def broker(module_nats_server: NatsServer) -> NatsServer:
    asyncio.run(ensure_stream(module_nats_server.url))
    return module_nats_server


@pytest.fixture(scope="module")
def ledger(broker: NatsServer) -> Ledger:
    return Ledger(broker.url)


@pytest.fixture(scope="module")
def proxy(
    module_meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> MeterProxy:
    return module_meter_factory.start(demo_upstream.url, broker.url)


def client(proxy: MeterProxy, customer: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=API_KEY,
        max_retries=0,
        default_headers={"x-tenant-id": TENANT, "x-customer-id": customer},
    )


def checked(published: Published, customer: str, expected: dict[str, Any]) -> dict[str, Any]:
    """The envelope as the billing consumer reads it: the seed's fields, flat-priced, and
    `expected` field by field (None: the field is absent)."""
    envelope, md = published.envelope, published.metadata
    assert set(envelope) == TOP_LEVEL
    assert set(md) >= METADATA, METADATA - set(md)
    assert envelope["customer_id"] == customer and md["tenant_id"] == TENANT
    assert md["tokens_used"] == md["input_tokens"] + md["output_tokens"]
    assert envelope["amount_micro_omr"] == -(md["tokens_used"] * PRICE)
    assert envelope["amount_omr"] == envelope["amount_micro_omr"] / 1e6
    assert envelope["reason"] == "usage:newapi:" + md["model"].lower()
    assert md["schema"] == "edgemeter.usage/1" and md["price_version"] == f"flat:{PRICE}"
    assert published.headers.get("Nats-Msg-Id") == md["request_id"]
    assert API_KEY not in json.dumps(envelope)
    for part in ("tokens_detail", "units"):
        assert all(type(v) in (int, str) for v in (md.get(part) or {}).values())
    assert {key: md.get(key) for key in expected} == expected
    return md


def test_images_bill_tokens_or_images(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique_id("cus_img")
    oai = client(proxy, customer)
    made = oai.images.generate(model="gpt-image-1", prompt="a cat on a mat")
    assert made.usage is not None and made.usage.output_tokens == IMAGE_TOKENS
    oai.images.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", size="1792x1024", quality="hd"
    )

    tokens, per_image = billed(proxy, ledger, customer, 2)
    # The demo: 5 prompt words, 272 image tokens.
    checked(tokens, customer, {
        "api": "openai.images", "path": "/v1/images/generations", "model": "gpt-image-1",
        "usage_source": "reported", "outcome": "complete", "stream": False, "status_code": 200,
        "input_tokens": 5, "output_tokens": IMAGE_TOKENS, "tokens_used": 5 + IMAGE_TOKENS,
        "tokens_detail": {"input_text": 5, "output_image": IMAGE_TOKENS}, "units": None,
    })  # fmt: skip
    # dall-e reports nothing: one image at the asked size and quality; the prompt's 20
    # characters are 5 tokens; the image is the output.
    checked(per_image, customer, {
        "api": "openai.images", "model": "dall-e-3", "usage_source": "estimated",
        "input_tokens": 5, "output_tokens": 0, "tokens_detail": None,
        "units": {"images": 1, "image_size": "1792x1024", "image_quality": "hd"},
    })  # fmt: skip


# The openai SDK marks translations deprecated; the route is still relayed and billed.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_audio_bills_durations_tokens_and_characters(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique_id("cus_audio")
    oai = client(proxy, customer)
    whisper = oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", UPLOAD))
    assert whisper.text == TRANSCRIPT
    oai.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", UPLOAD))
    text = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", UPLOAD), response_format="text"
    )
    assert text.strip() == TRANSCRIPT
    oai.audio.translations.create(model="whisper-1", file=("a.wav", UPLOAD))
    spoken = "Today is a wonderful day to build something."
    speech = oai.audio.speech.create(model="tts-1", voice="alloy", input=spoken)
    assert speech.content.startswith(b"RIFF")

    duration, tokens, text_format, translated, speech_env = billed(proxy, ledger, customer, 5)
    # whisper-1 reports the upload's seconds, rounded up by the demo: 3.
    checked(duration, customer, {
        "api": "openai.audio.transcriptions", "model": "whisper-1", "usage_source": "reported",
        "tokens_used": 0, "units": {"audio_ms": 3000},
    })  # fmt: skip
    # gpt-4o-transcribe: 2.5 s at 10 audio tokens a second = 25; the transcript's 9 words.
    checked(tokens, customer, {
        "api": "openai.audio.transcriptions", "model": "gpt-4o-transcribe",
        "usage_source": "reported", "input_tokens": 25, "output_tokens": 9,
        "tokens_detail": {"input_audio": 25}, "units": None,
    })  # fmt: skip
    # Text format reports nothing: the uploaded file's own length (2.5 s), read by the meter;
    # output: the 50 characters of transcript and newline, 13 tokens.
    checked(text_format, customer, {
        "api": "openai.audio.transcriptions", "usage_source": "estimated",
        "input_tokens": 0, "output_tokens": 13, "units": {"audio_ms": 2500},
    })  # fmt: skip
    # Translations report nothing either: 2.5 s; the 49 characters of text, 13 tokens.
    checked(translated, customer, {
        "api": "openai.audio.translations", "model": "whisper-1", "usage_source": "estimated",
        "input_tokens": 0, "output_tokens": 13, "units": {"audio_ms": 2500},
    })  # fmt: skip
    # Speech answers audio: the 44 characters asked, 11 tokens of input.
    checked(speech_env, customer, {
        "api": "openai.audio.speech", "model": "tts-1", "usage_source": "estimated",
        "input_tokens": 11, "output_tokens": 0, "units": {"characters": 44},
    })  # fmt: skip


def test_moderations_are_free(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique_id("cus_mod")
    result = client(proxy, customer).moderations.create(
        model="omni-moderation-latest", input="hello"
    )
    assert result.results[0].flagged is False
    assert billed(proxy, ledger, customer, 0) == []


def test_a_rerank_request_is_billed_on_its_tokens(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique_id("cus_rerank")
    response = httpx2.post(
        f"{proxy.url}/v1/rerank",
        json={
            "model": "rerank-2",
            "query": "sunny day",
            "documents": ["rain today", "sun all day"],
        },
        headers={
            "x-tenant-id": TENANT,
            "x-customer-id": customer,
            "authorization": f"Bearer {API_KEY}",
        },
        timeout=10,
    )
    assert response.status_code == 200
    [published] = billed(proxy, ledger, customer, 1)
    # 2 + 2 + 3 words of query and documents, all input.
    checked(published, customer, {
        "api": "rerank", "model": "rerank-2", "usage_source": "reported",
        "input_tokens": 7, "output_tokens": 0, "units": None,
    })  # fmt: skip


def test_gemini_is_billed_streamed_and_not(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique_id("cus_gemini")
    gemini = genai.Client(
        api_key=API_KEY,
        http_options=types.HttpOptions(
            base_url=proxy.url, headers={"x-tenant-id": TENANT, "x-customer-id": customer}
        ),
    )
    answer = gemini.models.generate_content(model="gemini-2.5-flash", contents="Hello there friend")
    assert answer.text == CANNED_REPLY
    streamed = "".join(
        chunk.text or ""
        for chunk in gemini.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Hello there friend"
        )
    )
    assert streamed == CANNED_REPLY

    whole, stream = billed(proxy, ledger, customer, 2)
    # 3 prompt words; the canned reply's words.
    for published, path, streaming in (
        (whole, "/v1beta/models/gemini-2.5-flash:generateContent", False),
        (stream, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", True),
    ):
        checked(published, customer, {
            "api": "gemini.generate_content", "path": path, "stream": streaming,
            "model": "gemini-2.5-flash", "usage_source": "reported", "outcome": "complete",
            "input_tokens": 3, "output_tokens": REPLY_TOKENS, "reasoning_tokens": 0,
            "tokens_detail": None,
            # The SDK's x-goog-api-key, as the gateway authenticates it.
            "api_key_fingerprint": fingerprint(API_KEY),
        })  # fmt: skip


def test_a_realtime_session_bills_its_transcription_and_its_response(
    proxy: MeterProxy, ledger: Ledger
) -> None:
    customer = unique_id("cus_rt")
    with client(proxy, customer).realtime.connect(model="gpt-realtime") as conn:
        conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            }
        )
        conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hello"}],
            }
        )
        # One second of pcm16 at 24 kHz.
        conn.input_audio_buffer.append(audio=base64.b64encode(b"\0" * 48_000).decode())
        conn.input_audio_buffer.commit()
        conn.response.create()
        text = ""
        for event in conn:
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.done":
                break
    assert text == CANNED_REPLY

    transcribed, responded = billed(proxy, ledger, customer, 2)
    common = {"path": "/v1/realtime", "status_code": 101, "stream": True, "outcome": "complete"}
    checked(transcribed, customer, common | {
        "api": "openai.realtime.transcription", "model": "gpt-4o-transcribe",
        "usage_source": "reported", "tokens_used": 0, "units": {"audio_ms": 1000},
    })  # fmt: skip
    # "Say hello": 2 text tokens; 1 s of audio at 10 tokens a second; the reply's words.
    md = checked(responded, customer, common | {
        "api": "openai.realtime", "model": "gpt-realtime", "usage_source": "reported",
        "input_tokens": 12, "output_tokens": REPLY_TOKENS,
        "tokens_detail": {"input_text": 2, "input_audio": 10, "output_text": REPLY_TOKENS},
    })  # fmt: skip
    assert md["upstream_id"].startswith("resp_demo")
    assert transcribed.metadata["request_id"] != md["request_id"]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_long_realtime_session_does_not_grow_the_meter(
    module_meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer,
    ledger: Ledger,
) -> None:  # fmt: skip
    proxy = module_meter_factory.start(demo_upstream.url, broker.url, "meter_websocket_keep=10")
    try:
        customer = unique_id("cus_rt_long")
        # 2 s of pcm16 at 24 kHz a message, 800 messages: 77 MB that mitmproxy alone would keep.
        audio = base64.b64encode(b"\0" * 96_000).decode()
        with client(proxy, customer).realtime.connect(model="gpt-realtime") as conn:
            conn.input_audio_buffer.append(audio=audio)
            before = _rss_mib(proxy.pid)
            for _ in range(799):
                conn.input_audio_buffer.append(audio=audio)
            conn.input_audio_buffer.commit()
            conn.response.create()
            for event in conn:
                if event.type == "response.done":
                    break
            grown = _rss_mib(proxy.pid) - before
        [responded] = billed(proxy, ledger, customer, 1)
        # 1,600 s of audio at the demo's 10 tokens a second, every message counted.
        assert responded.metadata["tokens_detail"]["input_audio"] == 16_000
        assert grown < 25, f"RSS grew {grown:.1f} MiB over the session"
    finally:
        proxy.stop()
