"""End to end with real processes: the official SDKs call a real mitmdump running the meter in
front of the demo upstream, and the envelopes are read back from a real JetStream stream."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from spool.store import Spool
from tools.demo_upstream import CANNED_REPLY, BackgroundDemo, Request, frame_chunks
from tools.harness import ROOT, MeterFactory, MeterProxy, NatsServer, free_port
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"
PRICE = 156  # meter_price_micro_per_token's default
API_KEY = "sk-test-e2e-0123456789abcdef"
TENANT = "t_e2e"
REPLY_TOKENS = 14  # the demo's canned reply is 14 words, one token each
TOP_LEVEL = {"customer_id", "amount_omr", "amount_micro_omr", "reason", "metadata"}
METADATA = {
    "tokens_used",
    "model",
    "request_id",
    "tenant_id",
    "latency_ms",
    "completed_at",
    "schema",
    "api",
    "path",
    "stream",
    "status_code",
    "outcome",
    "usage_source",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "usage_raw",
    "price_version",
    "client_request_id",
    "upstream_id",
    "api_key_fingerprint",
    "ttft_ms",
}
CHAT: Any = [{"role": "user", "content": "hello world"}]  # 2 words: 2 prompt tokens


@dataclass(frozen=True)
class Published:
    """One message read back from the stream."""

    headers: dict[str, str]
    envelope: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = self.envelope["metadata"]
        return metadata


class Ledger:
    """Reads the stream the billing consumer would read."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url

    def all(self) -> list[Published]:
        messages = asyncio.run(stream_messages(self.nats_url, STREAM))
        return [Published(dict(headers or {}), json.loads(data)) for headers, data in messages]

    def of(self, customer_id: str) -> list[Published]:
        return [p for p in self.all() if p.envelope.get("customer_id") == customer_id]

    def wait_for(self, customer_id: str, count: int, timeout: float = 20.0) -> list[Published]:
        """Poll until at least `count` envelopes of the customer are on the stream."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(customer_id)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} envelopes for {customer_id} after {timeout}s"
                )
            time.sleep(0.05)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def settle(proxy: MeterProxy, ledger: Ledger) -> None:
    """Send one more billable request and wait for its envelope. The spool publishes in order,
    so once it is on the stream, every envelope of an earlier request is too: what is missing
    then was never billed, without sleeping for an arbitrary time."""
    barrier = unique("cus_barrier")
    response = httpx2.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "demo-chat", "messages": CHAT},
        headers={"x-customer-id": barrier, "x-tenant-id": TENANT},
        timeout=10,
    )
    assert response.status_code == 200
    ledger.wait_for(barrier, 1)


def billed(
    proxy: MeterProxy, ledger: Ledger, customer: str, count: int, timeout: float = 20.0
) -> list[Published]:
    """The customer's envelopes once `count` arrived and the meter has settled: exactly those."""
    ledger.wait_for(customer, count, timeout)
    settle(proxy, ledger)
    found = ledger.of(customer)
    assert len(found) == count, [p.metadata for p in found]
    return found


def forwarded(demo: BackgroundDemo, customer: str) -> list[Request]:
    """The requests the demo upstream received for a customer, as the meter forwarded them."""
    return [r for r in demo.upstream.received if r.headers.get("x-customer-id") == customer]


def openai_client(proxy: MeterProxy, customer: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=API_KEY,
        # One attempt per call: a retried 429 would be a second request.
        max_retries=0,
        default_headers={"x-tenant-id": TENANT, "x-customer-id": customer},
    )


def anthropic_client(proxy: MeterProxy, customer: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.url,
        api_key=API_KEY,
        max_retries=0,
        default_headers={"x-tenant-id": TENANT, "x-customer-id": customer},
    )


@pytest.fixture(scope="module")
def broker(module_nats_server: NatsServer) -> NatsServer:
    """nats-server with the stream the seed's billing service creates."""
    asyncio.run(ensure_stream(module_nats_server.url))
    return module_nats_server


@pytest.fixture(scope="module")
def ledger(broker: NatsServer) -> Ledger:
    return Ledger(broker.url)


@pytest.fixture(scope="module")
def proxy(
    module_meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> MeterProxy:
    """The meter with default options (meter_stream_usage=inject-strip)."""
    return module_meter_factory.start(demo_upstream.url, broker.url)


@pytest.fixture(scope="module")
def proxy_off(
    module_meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> MeterProxy:
    """The meter with meter_stream_usage=off: it never changes a request or a response."""
    return module_meter_factory.start(demo_upstream.url, broker.url, "meter_stream_usage=off")


# --- exact envelopes for recorded responses -------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """A recorded response and the envelope it must produce; numbers worked out by hand."""

    fixture: str
    api: str
    path: str
    stream: bool
    model: str  # as the upstream reports it (the SDK asks for the undated name)
    input_tokens: int
    output_tokens: int
    upstream_id: str
    content: str  # what the SDK must hand to the caller
    client_total: int  # tokens in the usage the SDK itself received
    usage_raw: dict[str, Any] | None  # None: shape left to the meter (see the test)


NANO_USAGE = {
    "prompt_tokens": 16,
    "completion_tokens": 363,
    "total_tokens": 379,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
RECORDED_CASES = [
    # openai-chat-nonstream.json: usage 16 + 363 = 379 tokens.
    Recorded(
        "openai-chat-nonstream.json",
        "openai.chat",
        "/v1/chat/completions",
        False,
        "gpt-4.1-nano-2025-04-14",
        16,
        363,
        "chatcmpl-D8Z5f52zQqikDBEKQMQoYcWMcWPeU",
        "<the fixture's message content>",
        379,
        NANO_USAGE,
    ),
    # The last chunk before [DONE] carries usage 53 + 15 = 68 (the client asked include_usage).
    Recorded(
        "openai-chat-stream-tool-call-usage.raw.sse",
        "openai.chat",
        "/v1/chat/completions",
        True,
        "gpt-4o-mini-2024-07-18",
        53,
        15,
        "chatcmpl-Dx0XpqH8w09uBXwq1zFGYdETjtnEl",
        'get_capital({"country":"UK"})',
        68,
        {
            "prompt_tokens": 53,
            "completion_tokens": 15,
            "total_tokens": 68,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    ),
    # input 12 (no cache reads or writes) + output 29 = 41.
    Recorded(
        "anthropic-messages-nonstream.json",
        "anthropic.messages",
        "/v1/messages",
        False,
        "claude-sonnet-4-5-20250929",
        12,
        29,
        "msg_01VdEjxAP5ahtHKrrRdNBteQ",
        "Hello! I'm doing well, thanks for asking. How are you doing today? "
        "Is there anything I can help you with?",
        41,
        {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 29,
            "service_tier": "standard",
            "inference_geo": "not_available",
        },
    ),
    # message_start: input 20; the cumulative message_delta: input 20, output 5 -> 25.
    Recorded(
        "anthropic-messages-stream-simple.raw.sse",
        "anthropic.messages",
        "/v1/messages",
        True,
        "claude-sonnet-4-5-20250929",
        20,
        5,
        "msg_018E1hg8GoVTGEKQY3ovMcSJ",
        "2",
        25,
        None,
    ),
]


def call_sdk(proxy: MeterProxy, case: Recorded, customer: str, request_id: str) -> tuple[str, int]:
    """Make the request with the official SDK; return (content, total tokens it was told)."""
    headers = {"x-demo-fixture": case.fixture, "x-request-id": request_id}
    if case.api == "anthropic.messages":
        claude = anthropic_client(proxy, customer)
        params: Any = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "extra_headers": headers,
        }
        if not case.stream:
            message = claude.messages.create(**params)
            text = "".join(b.text for b in message.content if b.type == "text")
        else:
            with claude.messages.stream(**params) as stream:
                text = "".join(stream.text_stream)
                message = stream.get_final_message()
        return text, message.usage.input_tokens + message.usage.output_tokens
    oai = openai_client(proxy, customer)
    if not case.stream:
        completion = oai.chat.completions.create(
            model="gpt-4.1-nano", messages=CHAT, extra_headers=headers
        )
        assert completion.usage is not None
        return completion.choices[0].message.content or "", completion.usage.total_tokens
    tool: Any = {
        "type": "function",
        "function": {
            "name": "get_capital",
            "parameters": {"type": "object", "properties": {"country": {"type": "string"}}},
        },
    }
    chunks = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=CHAT,
        tools=[tool],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    name, arguments, total = "", "", 0
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function is not None:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
        if chunk.usage is not None:
            total = chunk.usage.total_tokens
    return f"{name}({arguments})", total


@pytest.mark.parametrize("case", RECORDED_CASES, ids=lambda c: c.fixture)
def test_recorded_response_bills_exactly_once(
    proxy: MeterProxy, ledger: Ledger, recorded: Path, case: Recorded
) -> None:
    customer, request_id = unique("cus"), unique("cli")
    started = datetime.now(UTC)
    content, client_total = call_sdk(proxy, case, customer, request_id)

    expected_content = case.content
    if case.fixture == "openai-chat-nonstream.json":
        body = json.loads((recorded / case.fixture).read_text())
        expected_content = body["choices"][0]["message"]["content"]
    assert content == expected_content
    assert client_total == case.input_tokens + case.output_tokens

    [published] = billed(proxy, ledger, customer, 1)
    envelope, md = published.envelope, published.metadata
    tokens = case.input_tokens + case.output_tokens
    assert set(envelope) == TOP_LEVEL
    assert set(md) >= METADATA, METADATA - set(md)
    assert envelope["customer_id"] == customer
    assert envelope["amount_micro_omr"] == -(tokens * PRICE)
    assert envelope["amount_omr"] == envelope["amount_micro_omr"] / 1e6
    assert envelope["reason"] == "usage:newapi:" + case.model.lower()
    assert md["tokens_used"] == tokens
    assert md["model"] == case.model
    assert md["tenant_id"] == TENANT
    assert md["schema"] == "edgemeter.usage/1"
    assert (md["api"], md["path"], md["stream"]) == (case.api, case.path, case.stream)
    assert (md["status_code"], md["outcome"], md["usage_source"]) == (200, "complete", "reported")
    assert (md["input_tokens"], md["output_tokens"]) == (case.input_tokens, case.output_tokens)
    assert (md["cached_input_tokens"], md["cache_write_tokens"], md["reasoning_tokens"]) == (
        0,
        0,
        0,
    )
    assert md["price_version"] == f"flat:{PRICE}"
    assert md["upstream_id"] == case.upstream_id
    # The meter mints the id (never the client's) and dedupes the publish on it.
    assert published.headers.get("Nats-Msg-Id") == md["request_id"]
    assert md["request_id"] != request_id
    assert md["client_request_id"] == request_id
    if case.usage_raw is not None:
        assert md["usage_raw"] == case.usage_raw
    else:
        assert md["usage_raw"]["output_tokens"] == case.output_tokens
    completed = datetime.fromisoformat(md["completed_at"].replace("Z", "+00:00"))
    assert md["completed_at"].endswith("Z")
    assert started - timedelta(seconds=1) <= completed <= datetime.now(UTC)
    assert isinstance(md["latency_ms"], int)
    assert 0 <= md["latency_ms"] <= (datetime.now(UTC) - started).total_seconds() * 1000
    if case.stream:
        assert isinstance(md["ttft_ms"], int)
        assert 0 <= md["ttft_ms"] <= md["latency_ms"]
    # The key itself never reaches the broker, only a fingerprint of it.
    assert API_KEY not in json.dumps(envelope)
    if case.api.startswith("openai"):
        assert isinstance(md["api_key_fingerprint"], str)
        assert md["api_key_fingerprint"]


def test_request_ids_are_unique(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique("cus")
    oai = openai_client(proxy, customer)
    for _ in range(5):
        oai.chat.completions.create(model="demo-chat", messages=CHAT)
    found = billed(proxy, ledger, customer, 5)
    ids = [p.metadata["request_id"] for p in found]
    assert len(set(ids)) == 5
    assert [p.headers.get("Nats-Msg-Id") for p in found] == ids
    assert {p.metadata["tokens_used"] for p in found} == {2 + REPLY_TOKENS}


# --- streams pass through byte for byte -----------------------------------------------------


def stream_bytes(proxy: MeterProxy, path: str, fixture: str, customer: str, body: Any) -> bytes:
    """POST and collect the body exactly as the client received it (after de-chunking)."""
    headers = {"x-demo-fixture": fixture, "x-customer-id": customer, "x-tenant-id": TENANT}
    received = bytearray()
    with (
        httpx2.Client(timeout=10) as client,
        client.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    return bytes(received)


OPENAI_STREAM_ASKING_USAGE = {
    "model": "gpt-4o-mini",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": CHAT,
}
ANTHROPIC_STREAM = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 64,
    "stream": True,
    "messages": CHAT,
}


@pytest.mark.parametrize(
    ("mode", "path", "fixture", "body", "tokens"),
    [
        (
            "off",
            "/v1/chat/completions",
            "openai-chat-stream-tool-call-usage.raw.sse",
            OPENAI_STREAM_ASKING_USAGE,
            68,
        ),
        ("off", "/v1/messages", "anthropic-messages-stream-simple.raw.sse", ANTHROPIC_STREAM, 25),
        # Its cumulative message_delta: 12 input + 30 output tokens.
        ("off", "/v1/messages", "anthropic-messages-stream-text.chunks.txt", ANTHROPIC_STREAM, 42),
        # The client asked for usage itself, so inject-strip has nothing to strip.
        (
            "inject-strip",
            "/v1/chat/completions",
            "openai-chat-stream-tool-call-usage.raw.sse",
            OPENAI_STREAM_ASKING_USAGE,
            68,
        ),
        (
            "inject-strip",
            "/v1/messages",
            "anthropic-messages-stream-simple.raw.sse",
            ANTHROPIC_STREAM,
            25,
        ),
    ],
)
def test_stream_reaches_the_client_byte_for_byte(
    request: pytest.FixtureRequest,
    ledger: Ledger,
    recorded: Path,
    mode: str,
    path: str,
    fixture: str,
    body: Any,
    tokens: int,
) -> None:
    proxy: MeterProxy = request.getfixturevalue("proxy_off" if mode == "off" else "proxy")
    customer = unique("cus")
    received = stream_bytes(proxy, path, fixture, customer, body)
    sent = (recorded / fixture).read_bytes()
    if fixture.endswith(".chunks.txt"):
        sent = frame_chunks(sent)
    assert received == sent
    [published] = billed(proxy, ledger, customer, 1)
    assert published.metadata["tokens_used"] == tokens
    assert published.metadata["stream"] is True


def test_added_usage_event_is_stripped_from_the_client(
    proxy: MeterProxy, ledger: Ledger, demo_upstream: BackgroundDemo, recorded: Path
) -> None:
    fixture = "openai-chat-stream-tool-call-usage.raw.sse"
    customer = unique("cus")
    body = {"model": "gpt-4o-mini", "stream": True, "messages": CHAT}  # no include_usage
    received = stream_bytes(proxy, "/v1/chat/completions", fixture, customer, body)

    sent = (recorded / fixture).read_bytes()
    events = sent.split(b"\n\n")
    usage_events = [e for e in events if b'"usage":{' in e]
    assert len(usage_events) == 1
    assert received == sent.replace(usage_events[0] + b"\n\n", b"")
    [upstream_request] = forwarded(demo_upstream, customer)
    assert json.loads(upstream_request.body)["stream_options"] == {"include_usage": True}
    [published] = billed(proxy, ledger, customer, 1)
    assert published.metadata["tokens_used"] == 68
    assert published.metadata["usage_source"] == "reported"


def test_meter_asks_for_stream_usage_the_client_did_not_ask_for(
    proxy: MeterProxy, ledger: Ledger, demo_upstream: BackgroundDemo
) -> None:
    customer = unique("cus")
    chunks = list(
        openai_client(proxy, customer).chat.completions.create(
            model="demo-chat", messages=CHAT, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CANNED_REPLY
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk reached the client
    [upstream_request] = forwarded(demo_upstream, customer)
    assert json.loads(upstream_request.body)["stream_options"] == {"include_usage": True}
    [published] = billed(proxy, ledger, customer, 1)
    assert published.metadata["tokens_used"] == 2 + REPLY_TOKENS
    assert published.metadata["usage_source"] == "reported"


def test_meter_off_forwards_the_request_unchanged(
    proxy_off: MeterProxy, demo_upstream: BackgroundDemo
) -> None:
    customer = unique("cus")
    body = {"model": "demo-chat", "stream": True, "messages": CHAT}
    response = httpx2.post(
        f"{proxy_off.url}/v1/chat/completions",
        json=body,
        headers={"x-customer-id": customer},
        timeout=10,
    )
    assert response.status_code == 200
    [upstream_request] = forwarded(demo_upstream, customer)
    assert json.loads(upstream_request.body) == body
    assert b'"usage"' not in response.content


# --- what is not billed ---------------------------------------------------------------------


def test_non_2xx_bills_nothing(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique("cus")
    oai = openai_client(proxy, customer)
    failures: list[Callable[[], object]] = [
        lambda: oai.chat.completions.create(
            model="demo-chat", messages=CHAT, extra_headers={"x-demo-status": "429"}
        ),
        lambda: oai.chat.completions.create(
            model="demo-chat", messages=CHAT, extra_headers={"x-demo-status": "500"}
        ),
        lambda: list(
            oai.chat.completions.create(
                model="demo-chat",
                messages=CHAT,
                stream=True,
                extra_headers={"x-demo-status": "429"},
            )
        ),
        # A recorded error body that carries no usage, answered with its recorded 429.
        lambda: oai.chat.completions.create(
            model="demo-chat",
            messages=CHAT,
            extra_headers={"x-demo-fixture": "openrouter-error-429.json"},
        ),
        # A recorded success body, but the upstream said 500: usage in a non-2xx is not billed.
        lambda: oai.chat.completions.create(
            model="demo-chat",
            messages=CHAT,
            extra_headers={"x-demo-fixture": "openai-chat-nonstream.json", "x-demo-status": "500"},
        ),
        lambda: anthropic_client(proxy, customer).messages.create(
            model="claude-demo",
            max_tokens=64,
            messages=CHAT,
            extra_headers={"x-demo-status": "429"},
        ),
    ]
    statuses = []
    for fail in failures:
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as info:
            fail()
        assert isinstance(info.value, openai.APIStatusError | anthropic.APIStatusError)
        statuses.append(info.value.status_code)
    assert statuses == [429, 500, 429, 429, 500, 429]

    oai.chat.completions.create(model="demo-chat", messages=CHAT)
    [published] = billed(proxy, ledger, customer, 1)
    assert published.metadata["status_code"] == 200
    assert published.metadata["tokens_used"] == 2 + REPLY_TOKENS


def test_models_and_admin_paths_bill_nothing(proxy: MeterProxy, ledger: Ledger) -> None:
    customer = unique("cus")
    models = openai_client(proxy, customer).models.list()
    assert [m.id for m in models] == ["demo-chat", "demo-embed", "claude-demo"]
    status = httpx2.get(f"{proxy.url}/api/status", headers={"x-customer-id": customer}, timeout=10)
    assert status.json()["success"] is True

    openai_client(proxy, customer).chat.completions.create(model="demo-chat", messages=CHAT)
    [published] = billed(proxy, ledger, customer, 1)
    assert published.metadata["path"] == "/v1/chat/completions"


# --- clients that go away ------------------------------------------------------------------


def read_until(proxy: MeterProxy, path: str, body: Any, customer: str, marker: bytes) -> bytes:
    """Stream a slow answer and hang up as soon as `marker` arrived."""
    headers = {
        "x-customer-id": customer,
        "x-tenant-id": TENANT,
        "x-api-key": API_KEY,
        "x-demo-chunk-size": "64",
        "x-demo-delay-ms": "30",
    }
    received = bytearray()
    with (
        httpx2.Client(timeout=10) as client,
        client.stream("POST", f"{proxy.url}{path}", json=body, headers=headers) as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
            if marker in received:
                break
    return bytes(received)


def test_client_that_hangs_up_mid_stream_is_billed_with_an_estimate(
    proxy: MeterProxy, ledger: Ledger
) -> None:
    customer = unique("cus")
    body = {"model": "demo-chat", "stream": True, "messages": CHAT}
    received = read_until(proxy, "/v1/chat/completions", body, customer, b'"content":"the "')
    assert b"[DONE]" not in received
    [published] = billed(proxy, ledger, customer, 1)
    md = published.metadata
    # No usage reached the meter before the hang-up (it comes last): an estimate, marked so.
    assert (md["outcome"], md["usage_source"]) == ("client_aborted", "estimated")
    assert md["tokens_used"] > 0
    assert published.envelope["amount_micro_omr"] == -(md["tokens_used"] * PRICE)


def test_client_that_hangs_up_mid_stream_is_billed_for_reported_usage(
    proxy: MeterProxy, ledger: Ledger
) -> None:
    customer = unique("cus")
    body = {"model": "claude-demo", "max_tokens": 64, "stream": True, "messages": CHAT}
    received = read_until(proxy, "/v1/messages", body, customer, b"content_block_delta")
    assert b"message_stop" not in received
    [published] = billed(proxy, ledger, customer, 1)
    md = published.metadata
    # message_start reported the 2 prompt tokens (and 1 output token) before the hang-up.
    assert (md["outcome"], md["usage_source"]) == ("client_aborted", "reported")
    assert md["input_tokens"] == 2
    assert md["tokens_used"] >= 3


# --- delivery -------------------------------------------------------------------------------


def test_proxy_serves_while_nats_is_down_and_the_spool_drains_later(
    meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    stopped_nats_server: NatsServer,
) -> None:
    proxy = meter_factory.start(demo_upstream.url, stopped_nats_server.url)
    customer = unique("cus")
    oai = openai_client(proxy, customer)
    started = time.monotonic()
    for _ in range(3):
        reply = oai.chat.completions.create(model="demo-chat", messages=CHAT)
        assert reply.choices[0].message.content == CANNED_REPLY
    with anthropic_client(proxy, customer).messages.stream(
        model="claude-demo", max_tokens=64, messages=CHAT
    ) as stream:
        assert "".join(stream.text_stream) == CANNED_REPLY
    # Served at once: metering never waits for the broker (these take milliseconds each).
    assert time.monotonic() - started < 3.0

    stopped_nats_server.start()
    asyncio.run(ensure_stream(stopped_nats_server.url))
    ledger = Ledger(stopped_nats_server.url)
    found = billed(proxy, ledger, customer, 4, timeout=30)
    assert len({p.metadata["request_id"] for p in found}) == 4
    assert sorted(p.metadata["api"] for p in found) == ["anthropic.messages"] + ["openai.chat"] * 3
    assert all(p.headers.get("Nats-Msg-Id") == p.metadata["request_id"] for p in found)
    # SIGTERM: a clean exit, after its final drain.
    assert proxy.stop() == 0


def test_a_full_spool_in_reject_mode_answers_503_before_the_upstream(
    meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    stopped_nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "full-spool"
    with Spool(spool_dir) as spool:
        spool.submit("0000-filler", b"x" * 1024 * 1024).result(timeout=10)
    proxy = meter_factory.start(
        demo_upstream.url,
        stopped_nats_server.url,  # no broker: nothing drains the spool
        f"meter_spool_dir={spool_dir}",
        "meter_spool_max_mb=1",
        "meter_on_spool_full=reject",
    )
    customer = unique("cus")
    response = httpx2.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "demo-chat", "messages": CHAT},
        headers={"x-customer-id": customer},
        timeout=10,
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "meter_spool_full"
    assert forwarded(demo_upstream, customer) == []
    # Paths that are not metered still pass.
    models = httpx2.get(f"{proxy.url}/v1/models", headers={"x-customer-id": customer}, timeout=10)
    assert models.status_code == 200


# --- the README's first command -------------------------------------------------------------


def wait_for_output(path: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """Poll the command's output until `pattern` shows up (or it exits, or 30 s pass)."""
    deadline = time.monotonic() + 30
    while True:
        text = path.read_text(encoding="utf-8", errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the output of scripts/run:\n{text}")
        time.sleep(0.05)


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def test_run_command_meters_the_demo_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "run.out"
    data = tmp_path / "data"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.demo_stack",
                "--data-dir",
                str(data),
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        nats_port = int(wait_for_output(output, r"nats://127\.0\.0\.1:(\d+)", proc).group(1))
        # The two sample requests it sends through the demo at startup.
        wait_for_output(output, r"cus_demo +t_demo +gpt-4o-mini +openai\.chat ⇣ .*complete", proc)
        wait_for_output(output, r"cus_demo +t_demo +claude-sonnet-4-6 +anthropic\.messages ", proc)
        customer = f"c{uuid.uuid4().hex[:8]}"
        response = httpx2.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "demo-chat", "messages": CHAT},
            headers={"x-customer-id": customer, "x-tenant-id": "t_run"},
            timeout=10,
        )
        assert response.json()["choices"][0]["message"]["content"] == CANNED_REPLY
        # 2 + 14 tokens at 156 micro-OMR each.
        wait_for_output(
            output, customer + r" +t_run +demo-chat +openai\.chat +2 +14 +-0\.002496", proc
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=40)
    text = output.read_text(encoding="utf-8")
    assert code == 0, text
    assert "stopped; 3 envelope(s) shown." in text
    assert refuses(port)
    assert refuses(nats_port)
    assert (data / "spool").is_dir()
    assert (data / "jetstream").is_dir()
    assert "Loading script" in (data / "logs" / "mitmdump.log").read_text()
