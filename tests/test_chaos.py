"""The chaos harness: its counting and wire reading, the tap that slows a broker down, and short
runs of the delivery scenarios against real processes (the full run is scripts/chaos)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from tools import chaos
from tools.chaos import Config, Record, count, details, table
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, NatsServer, NatsTap, NatsWire, msg_id
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"
SUBJECT = "catalyst.usage.recorded"

# --- counting ---------------------------------------------------------------------------------


def message(
    tag: str, request_id: str, outcome: str = "complete", subject: str = SUBJECT, **top: Any
) -> tuple[str, dict[str, str], bytes]:
    """An envelope the billing consumer books (unless `top` changes its fields)."""
    meta = {
        "client_request_id": tag,
        "request_id": request_id,
        "outcome": outcome,
        "tenant_id": "t_chaos",
    }
    envelope = {"customer_id": "cus", "amount_micro_omr": -156, "reason": "usage:newapi:m"}
    data = json.dumps(envelope | top | {"metadata": meta}).encode()
    return subject, {"Nats-Msg-Id": request_id}, data


def record(tag: str, state: Any, saw_terminal: bool = False, attributed: bool = True) -> Record:
    return Record(
        tag, "chat", True, 0.0, state=state, saw_terminal=saw_terminal, attributed=attributed
    )


@pytest.mark.parametrize(
    ("state", "outcomes", "field", "expected"),
    [
        ("completed", [], "lost", ["t"]),
        ("completed", ["complete"], "lost", []),
        ("completed", ["complete", "complete"], "duplicated", ["t"]),
        ("failed", ["complete", "complete"], "duplicated", ["t"]),
        ("failed", [], "lost", []),
        ("completed", ["client_aborted"], "completed_wrong", ["t"]),
        ("aborted", ["client_aborted"], "aborted_wrong", []),
        ("aborted", [], "aborted_wrong", ["t"]),
        # The proxy had sent the whole stream before it saw the hang-up.
        ("aborted", ["complete"], "aborted_wrong", []),
        ("aborted", ["complete", "client_aborted"], "aborted_wrong", ["t"]),
        ("aborted", ["client_aborted", "client_aborted"], "aborted_wrong", ["t"]),
    ],
)
def test_envelopes_are_counted_per_tag(
    state: str, outcomes: list[str], field: str, expected: list[str]
) -> None:
    messages = [message("t", f"r{i}", outcome) for i, outcome in enumerate(outcomes)]
    assert count({"t": record("t", state)}, messages)[field] == expected


def test_an_envelope_nobody_sent_or_with_a_foreign_msg_id_is_a_stranger() -> None:
    subject, headers, data = message("t", "r1")
    tally = count(
        {"t": record("t", "completed")},
        [
            message("other", "r0"),
            (subject, {"Nats-Msg-Id": "not-r1"}, data),
            (subject, headers, data),
        ],
    )
    assert (tally["strangers"], tally["lost"], tally["envelopes"]) == (2, [], 1)


UNBILLABLE = "catalyst.usage.unbillable"


@pytest.mark.parametrize(
    ("attributed", "sent", "misrouted", "unbillable"),
    [
        (True, message("t", "r1"), [], 0),
        (False, message("t", "r1", subject=UNBILLABLE, customer_id=""), [], 1),
        # An unattributed request on the billing subject, or an attributed one sent away.
        (False, message("t", "r1", customer_id=""), ["t"], 0),
        (True, message("t", "r1", subject=UNBILLABLE), ["t"], 1),
        # On the billing subject, but the billing consumer would not book it.
        (True, message("t", "r1", amount_micro_omr=0), ["t"], 0),
        (True, message("t", "r1", subject="catalyst.usage.elsewhere"), ["t"], 0),
    ],
)
def test_each_request_must_land_on_its_subject(
    attributed: bool,
    sent: tuple[str, dict[str, str], bytes],
    misrouted: list[str],
    unbillable: int,
) -> None:
    tally = count({"t": record("t", "completed", attributed=attributed)}, [sent])
    assert (tally["misrouted"], tally["unbillable"], tally["lost"]) == (misrouted, unbillable, [])


def test_one_request_on_both_subjects_is_a_duplicate() -> None:
    both = [message("t", "r1"), message("t", "r2", subject=UNBILLABLE)]
    assert count({"t": record("t", "completed")}, both)["duplicated"] == ["t"]


def test_a_stream_cut_after_its_last_event_is_counted_apart() -> None:
    records = {"a": record("a", "failed", saw_terminal=True), "b": record("b", "failed")}
    tally = count(records, [message("a", "r1")])
    assert (tally["cut_after_last_event"], tally["cut_after_last_event_billed"]) == (1, 1)
    assert tally["failed_billed"] == 1


def result(**overrides: Any) -> chaos.Result:
    fields: dict[str, Any] = {
        "scenario": "meter-kill",
        "fault": "meter SIGKILLed",
        "sent": 12,
        "completed": 10,
        "failed": 2,
        "aborted": 0,
        "envelopes": 10,
        "lost": [],
        "duplicated": [],
        "unbillable": 1,
        "misrouted": [],
        "aborted_wrong": [],
        "aborted_outcomes": {},
        "completed_wrong": [],
        "strangers": 0,
        "cut_after_last_event": 0,
        "cut_after_last_event_billed": 0,
        "failed_billed": 0,
        "left_spooled": 0,
        "republished": 3,
        "duplicate_acks": 3,
        "seconds": 9.6,
        "evidence": [("the fault hit the load", True)],
    }
    return chaos.Result(**(fields | overrides))


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        ({}, True),
        ({"lost": ["t"]}, False),
        ({"duplicated": ["t"]}, False),
        ({"misrouted": ["t"]}, False),
        ({"aborted_wrong": ["t"]}, False),
        ({"left_spooled": 1}, False),
        ({"strangers": 1}, False),
        # A fault that missed the load proves nothing.
        ({"evidence": [("the fault hit the load", False)]}, False),
    ],
)
def test_a_result_is_ok_only_without_loss_duplicate_or_missed_fault(
    overrides: dict[str, Any], ok: bool
) -> None:
    assert result(**overrides).ok is ok


def test_a_scenario_that_did_not_finish_is_a_failed_row() -> None:
    row = chaos.crashed(chaos.SCENARIOS["leader-kill"], TimeoutError(), 900.0)
    assert not row.ok
    assert "did not finish: timed out" in details(row)


def test_the_table_is_markdown_with_one_row_per_scenario() -> None:
    lines = table([result(), result(scenario="sigterm", lost=["a", "b"])]).splitlines()
    assert lines[0].startswith("| scenario ") and "| lost |" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    cells = dict(zip(chaos.COLUMNS, (c.strip() for c in lines[3].split("|")[1:-1]), strict=True))
    assert (cells["scenario"], cells["lost"], cells["duplicated"]) == ("sigterm", "2", "0")
    assert (cells["to reconciliation"], cells["misrouted"]) == ("1", "0")
    assert "MISROUTED: 1: m" in details(result(misrouted=["m"]))
    assert "LOST: 2: a, b" in details(result(lost=["a", "b"]))


def test_a_result_goes_to_json_with_its_counters_intact() -> None:
    errors = Counter({"APIConnectionError": 3})
    loaded = json.loads(json.dumps(result(errors=errors).as_json()))
    assert loaded["errors"] == {"APIConnectionError": 3}
    assert (loaded["ok"], loaded["exercised"]) == (True, True)


# --- the wire ---------------------------------------------------------------------------------


def frame(line: str, headers: bytes, payload: bytes) -> bytes:
    sizes = f"{len(headers)} {len(headers) + len(payload)}" if headers else str(len(payload))
    return f"{line} {sizes}\r\n".encode() + headers + payload + b"\r\n"


WIRE = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        b"PING\r\n",
        frame(
            "HPUB catalyst.usage.recorded _INBOX.a.1", b"NATS/1.0\r\nNats-Msg-Id: r1\r\n\r\n", b"{}"
        ),
        frame("PUB catalyst.usage.recorded", b"", b"hello\r\nPING"),
        frame("MSG _INBOX.a.1 1", b"", b'{"stream":"S","seq":7,"duplicate":true}'),
        b"PONG\r\n",
    ]
)


@pytest.mark.parametrize("size", [len(WIRE), 7, 1])
def test_the_wire_is_split_into_frames_however_it_arrives(size: int) -> None:
    frames: list[tuple[bytes, bytes, bytes]] = []
    wire = NatsWire(lambda *frame: frames.append(frame))
    for start in range(0, len(WIRE), size):
        wire.feed(WIRE[start : start + size])
    assert [verb for verb, _, _ in frames] == [b"HPUB", b"PUB", b"MSG"]
    assert msg_id(frames[0][1]) == "r1"
    assert frames[0][2] == b"{}"
    # A payload is read by its size: a line break and a verb inside it are just bytes.
    assert frames[1] == (b"PUB", b"", b"hello\r\nPING")
    assert json.loads(frames[2][2])["seq"] == 7


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n", "abc"),
        (b"NATS/1.0\r\nnats-msg-id:abc \r\nOther: 1\r\n\r\n", "abc"),
        (b"NATS/1.0\r\nOther: 1\r\n\r\n", None),
        (b"", None),
    ],
)
def test_the_msg_id_is_read_from_a_header_block(headers: bytes, expected: str | None) -> None:
    assert msg_id(headers) == expected


async def test_the_tap_sees_retries_and_a_slow_broker_times_out_stored_publishes(
    nats_server: NatsServer,
) -> None:
    await ensure_stream(nats_server.url, STREAM)
    tap = NatsTap(nats_server.port)
    await tap.start()
    nc = await nats.connect(tap.url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.publish(SUBJECT, b"1", headers={"Nats-Msg-Id": "a"})
        ack = await js.publish(SUBJECT, b"1", headers={"Nats-Msg-Id": "a"})
        assert ack.duplicate
        tap.delay_s = 1.0
        with pytest.raises(NatsTimeoutError):
            await js.publish(SUBJECT, b"2", headers={"Nats-Msg-Id": "b"}, timeout=0.3)
        tap.delay_s = 0.0
        # The late ack arrives for a publish nobody waits for any more: it was stored.
        ack = await js.publish(SUBJECT, b"2", headers={"Nats-Msg-Id": "b"}, timeout=5)
        assert ack.duplicate
    finally:
        await nc.close()
        await tap.stop()
    assert dict(tap.published) == {"a": 2, "b": 2}
    assert (tap.republished, tap.duplicate_acks) == (2, 2)
    ids = [(h or {}).get("Nats-Msg-Id") for h, _ in await stream_messages(nats_server.url, STREAM)]
    assert ids == ["a", "b"]


# --- short runs of the scenarios (the full run: scripts/chaos) --------------------------------

SHORT = Config(requests=200, concurrency=16, outage_s=3.0, kills=3)


@pytest.mark.parametrize(
    "scenario",
    [
        "meter-kill",
        "broker-outage",
        # Every publish fails while the stream is missing: a publisher that deleted before
        # the ack would lose all of them.
        "stream-missing",
    ],
)
def test_scenario_loses_and_duplicates_nothing(scenario: str, tmp_path: Path) -> None:
    [outcome] = asyncio.run(chaos.run([scenario], SHORT, tmp_path))
    assert outcome.lost == [], details(outcome)
    assert outcome.duplicated == [], details(outcome)
    # One request in ten named no customer: each on the unbillable subject, nothing misrouted.
    assert outcome.misrouted == [], details(outcome)
    assert outcome.unbillable >= SHORT.requests // chaos.UNATTRIBUTED_EVERY, details(outcome)
    assert outcome.completed >= SHORT.requests
    assert outcome.left_spooled == 0
    assert outcome.exercised, details(outcome)


def test_killing_one_worker_at_a_time_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = Config(requests=200, concurrency=16, kills=2)  # each of the 2 workers once
    [outcome] = asyncio.run(chaos.run(["worker-kill"], config, tmp_path))
    assert outcome.lost == [], details(outcome)
    assert outcome.duplicated == [], details(outcome)
    assert outcome.completed >= config.requests
    assert outcome.left_spooled == 0
    assert outcome.exercised, details(outcome)


# --- shutdown with a stream longer than the grace period -------------------------------------


def test_a_stream_cut_by_shutdown_is_billed_client_aborted(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, nats_server: NatsServer
) -> None:
    asyncio.run(ensure_stream(nats_server.url, STREAM))
    proxy = meter_factory.start(demo_upstream.url, nats_server.url, "meter_shutdown_grace_ms=1000")
    url = f"{proxy.url}/v1/chat/completions"
    body = {"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    # 64 bytes every 400 ms: the stream outlasts the grace period by many seconds.
    slow = {"x-request-id": "slow", "x-demo-chunk-size": "64", "x-demo-delay-ms": "400"}
    with (
        httpx2.Client(timeout=30) as client,
        client.stream("POST", url, json=body, headers=slow) as response,
    ):
        chunks = response.iter_raw()
        next(chunks)  # the stream is in flight
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        # Until done() begins, requests are still served; from then on they are refused.
        for attempt in range(200):
            probe = httpx2.post(
                url, json=body | {"stream": False}, headers={"x-request-id": f"p{attempt}"}
            )
            if probe.status_code == 503:
                break
            time.sleep(0.05)
        assert probe.json()["error"]["code"] == "meter_shutting_down"
        with pytest.raises(httpx2.HTTPError):
            for _ in chunks:
                pass
    assert proxy.proc.wait(timeout=30) == 0
    published = [
        json.loads(data)["metadata"]
        for _, data in asyncio.run(stream_messages(nats_server.url, STREAM))
    ]
    [cut] = [meta for meta in published if meta["client_request_id"] == "slow"]
    assert (cut["outcome"], cut["stream"]) == ("client_aborted", True)
