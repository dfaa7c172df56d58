"""End to end, the downstream contract: the official SDKs call a real mitmdump running the meter;
requests the billing consumer could not book (no customer, a customer without a tenant, an
unknown key, a zero-amount answer) land on the unbillable subject of a real JetStream stream,
with their reason, and everything else on the billing subject, where the model of the consumer
books it; each request exactly once across both."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import nats
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgemeter.metering.attribution import fingerprint
from edgemeter.metering.contract import consume
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, MeterProxy, NatsServer, free_port
from tools.streams import ensure_stream

STREAM = "CATALYST_SME"
BILLING = "catalyst.usage.recorded"
UNBILLABLE = "catalyst.usage.unbillable"
KNOWN_KEY, UNKNOWN_KEY = "sk-e2e-known-0123456789", "sk-e2e-unknown-0123456789"
CHAT: Any = [{"role": "user", "content": "hello world"}]


@dataclass(frozen=True)
class Message:
    subject: str
    headers: dict[str, str]
    data: bytes

    @property
    def envelope(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.data)
        return found


async def _messages(url: str) -> list[Message]:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        jsm = nc.jsm()
        state = (await jsm.stream_info(STREAM)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await jsm.get_msg(STREAM, seq)
            found.append(Message(msg.subject or "", dict(msg.headers or {}), msg.data or b""))
        return found
    finally:
        await nc.close()


def landed(broker: NatsServer, tags: Sequence[str], timeout: float = 20.0) -> dict[str, Message]:
    """The message of each request tag (its X-Request-Id), once every one is on the stream;
    fails if a tag has two (on one subject or across both)."""
    deadline = time.monotonic() + timeout
    while True:
        per_tag: dict[str, list[Message]] = {}
        for message in asyncio.run(_messages(broker.url)):
            tag = message.envelope["metadata"].get("client_request_id")
            per_tag.setdefault(tag, []).append(message)
        if all(tag in per_tag for tag in tags) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(len(per_tag.get(tag, [])) == 1 for tag in tags), {
        tag: len(per_tag.get(tag, [])) for tag in tags
    }
    return {tag: per_tag[tag][0] for tag in tags}


def tag() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def broker(module_nats_server: NatsServer) -> NatsServer:
    """nats-server with the billing service's stream: catalyst.>, both subjects."""
    asyncio.run(ensure_stream(module_nats_server.url))
    return module_nats_server


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def headers_meter(
    module_meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    broker: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
    admin_port: int,
) -> MeterProxy:
    """Headers attribution, a price table that prices one model at nothing, CloudEvents on."""
    prices = tmp_path_factory.mktemp("prices") / "prices.toml"
    prices.write_text('version = "e2e"\n[models."zero-model"]\ninput = 0\noutput = 0\n')
    return module_meter_factory.start(
        demo_upstream.url,
        broker.url,
        f"meter_prices={prices}",
        "meter_cloudevents=true",
        f"meter_admin_listen=127.0.0.1:{admin_port}",
    )


@pytest.fixture(scope="module")
def keymap_meter(
    module_meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    broker: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> MeterProxy:
    keymap = tmp_path_factory.mktemp("keymap") / "keys.toml"
    keymap.write_text(f'[keys."{fingerprint(KNOWN_KEY)}"]\ntenant = "t_k"\ncustomer = "cus_k"\n')
    return module_meter_factory.start(
        demo_upstream.url, broker.url, "meter_attribution=keymap", f"meter_keymap={keymap}"
    )


def chat(proxy: MeterProxy, headers: dict[str, str], *, model: str = "demo-chat") -> None:
    """A streamed chat completion through the official SDK, read to its end."""
    client = openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=headers.pop("key", "sk-e2e-0123456789"),
        max_retries=0,
        default_headers=headers,
    )
    stream = client.chat.completions.create(model=model, messages=CHAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def messages_of(proxy: MeterProxy, headers: dict[str, str]) -> None:
    claude = anthropic.Anthropic(
        base_url=proxy.url, api_key="sk-e2e-0123456789", max_retries=0, default_headers=headers
    )
    claude.messages.create(model="claude-demo", max_tokens=64, messages=CHAT)


CASES: list[tuple[str, Callable[[MeterProxy, str], None], str]] = [
    (
        "no customer",
        lambda proxy, t: chat(proxy, {"x-request-id": t, "x-tenant-id": "t_7"}),
        "no_customer",
    ),
    (
        "a customer without a tenant",
        lambda proxy, t: messages_of(proxy, {"x-request-id": t, "x-customer-id": "cus_nt"}),
        "no_tenant",
    ),
    (
        "a zero-amount answer",
        lambda proxy, t: chat(
            proxy,
            {"x-request-id": t, "x-tenant-id": "t_7", "x-customer-id": "cus_zero"},
            model="zero-model",
        ),
        "zero_amount",
    ),
]


def test_what_billing_cannot_book_goes_to_reconciliation_with_its_reason(
    headers_meter: MeterProxy, broker: NatsServer, admin_port: int
) -> None:
    billable = tag()
    chat(headers_meter, {"x-request-id": billable, "x-tenant-id": "t_7", "x-customer-id": "c1"})
    tags = {}
    for _, call, reason in CASES:
        tags[reason] = tag()
        call(headers_meter, tags[reason])
    found = landed(broker, [billable, *tags.values()])

    booked = found[billable]
    assert booked.subject == BILLING
    assert consume(booked.data) == ("book", "")
    assert "unbillable_reason" not in booked.envelope["metadata"]
    for reason, t in tags.items():
        message = found[t]
        assert message.subject == UNBILLABLE, reason
        assert message.headers["Edgemeter-Unbillable-Reason"] == reason
        assert message.envelope["metadata"]["unbillable_reason"] == reason
        assert message.headers["Nats-Msg-Id"] == message.envelope["metadata"]["request_id"]
        assert consume(message.data)[0] != "book"
    assert found[tags["zero_amount"]].envelope["amount_micro_omr"] == 0

    metrics = httpx2.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).text
    counted = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "edgemeter_unbillable_requests_total" and sample.value
    }
    assert counted == {reason: 1 for reason in tags}


def test_cloudevents_headers_reach_the_stream_beside_the_same_body(
    headers_meter: MeterProxy, broker: NatsServer
) -> None:
    billable, unbillable = tag(), tag()
    customer = 'cus 42 "%"'  # characters a ce- header carries percent-encoded
    chat(headers_meter, {"x-request-id": billable, "x-tenant-id": "t_7", "x-customer-id": customer})
    chat(headers_meter, {"x-request-id": unbillable, "x-tenant-id": "t_7"})
    found = landed(broker, [billable, unbillable])
    for t, kind in (
        (billable, "edgemeter.usage.recorded"),
        (unbillable, "edgemeter.usage.unbillable"),
    ):
        message = found[t]
        meta = message.envelope["metadata"]
        assert {
            name: value for name, value in message.headers.items() if name.startswith("ce-")
        } | {"content-type": message.headers["content-type"]} == {
            "ce-specversion": "1.0",
            "ce-id": meta["request_id"],
            "ce-source": "edgemeter",
            "ce-type": kind,
            "ce-time": meta["completed_at"],
            "content-type": "application/json",
            **(
                {"ce-subject": urllib.parse.quote(message.envelope["customer_id"], safe="")}
                if message.envelope["customer_id"]
                else {}
            ),
        }
    assert urllib.parse.unquote(found[billable].headers["ce-subject"]) == customer
    # The body is the envelope the seed's consumer reads: its fields as ever, nothing added.
    assert consume(found[billable].data) == ("book", "")


def test_an_unknown_key_in_keymap_mode_goes_to_reconciliation(
    keymap_meter: MeterProxy, broker: NatsServer
) -> None:
    known, unknown = tag(), tag()
    chat(keymap_meter, {"x-request-id": known, "key": KNOWN_KEY})
    # Headers naming someone are not read at all in keymap mode.
    chat(
        keymap_meter,
        {"x-request-id": unknown, "key": UNKNOWN_KEY, "x-customer-id": "cus_k", "x-tenant-id": "t"},
    )
    found = landed(broker, [known, unknown])
    assert (found[known].subject, found[known].envelope["customer_id"]) == (BILLING, "cus_k")
    message = found[unknown]
    assert message.subject == UNBILLABLE
    assert message.headers["Edgemeter-Unbillable-Reason"] == "unknown_key"
    meta = message.envelope["metadata"]
    assert (meta["attribution"], meta["api_key_fingerprint"]) == (
        "unknown_key",
        fingerprint(UNKNOWN_KEY),
    )
    assert "ce-id" not in message.headers  # CloudEvents are off by default
