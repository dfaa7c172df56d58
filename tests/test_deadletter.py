"""The dead-letter area: records, moves in and out of the spool, crash safety, and the publisher
setting refused envelopes aside against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from edgemeter.ids import uuid7
from spool import NatsConfig, Publisher, Spool
from spool.deadletter import (
    DIRNAME,
    DeadLetter,
    DeadLetters,
    decode_record,
    encode_record,
    error_of,
)
from spool.errors import SpoolError
from tools.harness import ROOT, NatsServer
from tools.streams import stream_messages

SUBJECT = "catalyst.usage.recorded"
STREAM = "CATALYST_SME"
MAX_MSG = 2048  # the stream's max_msg_size: JetStream refuses bigger envelopes (err 10054)


def envelope(key: str, pad: int = 0) -> bytes:
    body = {"metadata": {"request_id": key}, "amount_micro_omr": -156, "pad": "x" * pad}
    return json.dumps(body).encode()


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def msg_ids(url: str) -> list[str]:
    return [(h or {}).get("Nats-Msg-Id", "") for h, _ in await stream_messages(url, STREAM)]


async def set_max_msg_size(url: str, size: int, *, create: bool = False) -> None:
    nc = await nats.connect(url)
    try:
        config = StreamConfig(
            name=STREAM, subjects=["catalyst.>"], storage=StorageType.FILE, max_msg_size=size
        )
        jsm = nc.jsm()
        await (jsm.add_stream(config) if create else jsm.update_stream(config))
    finally:
        await nc.close()


@pytest.fixture
def dead(spool: Spool) -> Iterator[DeadLetters]:
    letters = DeadLetters.of(spool.directory)
    yield letters
    letters.close()


# -- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"metadata": {"request_id": "k"}}',
        b'{"text": "two\nlines"}\n\n',  # newlines in the envelope stay where they were
        b"",
        bytes(range(256)),
    ],
)
def test_a_record_keeps_the_envelope_bytes_unchanged(body: bytes) -> None:
    record = encode_record(body, "MaxPayloadError", "nats: maximum payload\nexceeded", 1700.5)
    letter = decode_record("k", record)
    assert letter == DeadLetter(
        "k", body, "MaxPayloadError", "nats: maximum payload\nexceeded", 1700.5
    )


@pytest.mark.parametrize(
    "record",
    [
        b"not json\n{}",
        b"no header line at all",
        b'["a list"]\n{}',
        b'{"dead_lettered_at": "soon"}\n{}',
    ],
)
def test_a_damaged_header_still_yields_the_bytes(record: bytes) -> None:
    letter = decode_record("k", record)
    assert letter.key == "k"
    assert letter.dead_lettered_at == 0.0
    assert letter.envelope in (record, b"{}")


@pytest.mark.parametrize(
    ("exc", "error", "reason"),
    [
        (ValueError("too big"), "ValueError", "too big"),
        (
            ValueError("nats: ValueError: code=400\n err_code=10054"),
            "ValueError",
            "code=400 err_code=10054",
        ),
        (KeyError(), "KeyError", ""),
        (ValueError("y" * 1000), "ValueError", "y" * 300),
    ],
)
def test_a_refusal_is_recorded_as_its_class_and_a_short_message(
    exc: BaseException, error: str, reason: str
) -> None:
    assert error_of(exc) == (error, reason)


def test_the_export_form_parses_the_envelope_or_falls_back_to_base64() -> None:
    parsed = DeadLetter("k", b'{"a": 1}', "E", "why", 0.0).to_json()
    assert parsed["envelope"] == {"a": 1}
    assert parsed["dead_lettered_at"] == "1970-01-01T00:00:00Z"
    raw = DeadLetter("k", b"\xff\x00", "E", "why", 0.0).to_json()
    assert raw["envelope_base64"] == "/wA="
    assert "envelope" not in raw


# -- moves --------------------------------------------------------------------------------------


def test_a_move_takes_the_envelope_out_of_the_spool(spool: Spool, dead: DeadLetters) -> None:
    keep, refused = uuid7(), uuid7()
    for key in (keep, refused):
        spool.submit(key, envelope(key)).result()
    letter = dead.move(spool, refused, envelope(refused), ValueError("too big"), now=1234.0)

    assert [k for k, _ in spool.read_page("", 10)] == [keep]
    assert list(dead) == [letter]
    assert letter == DeadLetter(refused, envelope(refused), "ValueError", "too big", 1234.0)
    assert len(dead) == 1


def test_the_area_is_private_and_inside_the_spool(spool: Spool, dead: DeadLetters) -> None:
    key = uuid7()
    dead.move(spool, key, envelope(key), ValueError("x"))
    assert dead.directory == spool.directory / DIRNAME
    assert stat.S_IMODE(dead.directory.stat().st_mode) == 0o700
    files = [p for p in dead.directory.iterdir() if p.is_file()]
    assert files
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert spool.volume() > 0  # a subdirectory does not trouble the spool's own accounting


def test_reading_an_area_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    dead = DeadLetters.of(tmp_path / "spool")
    assert len(dead) == 0
    assert list(dead) == []
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("which", ["some", "all"])
def test_requeue_puts_dead_letters_back_into_the_spool(
    spool: Spool, dead: DeadLetters, which: str
) -> None:
    keys = [uuid7() for _ in range(3)]
    for key in keys:
        dead.move(spool, key, envelope(key), ValueError("x"))
    assert len(spool) == 0

    wanted = keys[:2] if which == "some" else None
    moved = dead.requeue(spool, [*wanted, "not-a-key"] if wanted else None)

    expected = keys[:2] if which == "some" else keys
    assert moved == expected
    assert spool.read_page("", 10) == [(k, envelope(k)) for k in expected]
    assert [d.key for d in dead] == sorted(set(keys) - set(expected))


def test_requeue_into_a_spool_that_takes_nothing_keeps_the_dead_letters(
    spool: Spool, dead: DeadLetters, tmp_path: Path
) -> None:
    key = uuid7()
    dead.move(spool, key, envelope(key), ValueError("x"))
    closed = Spool(tmp_path / "closed")  # never opened: every submit fails
    with pytest.raises(SpoolError, match="did not take"):
        dead.requeue(closed, None)
    assert [d.key for d in dead] == [key]


CRASH_MID_MOVE = """
import os, sys
from pathlib import Path
from spool.deadletter import DeadLetters
from spool.store import Spool

class DiesOnDelete(Spool):
    def delete(self, keys):
        os._exit(0)  # the process dies after the dead letter is written, before the spool forgets

spool = DiesOnDelete(Path(sys.argv[1]))
spool.open()
key = sys.argv[2]
spool.submit(key, b'{"refused": true}').result()
DeadLetters.of(spool.directory).move(spool, key, b'{"refused": true}', ValueError("too big"))
"""


def crash_mid_move(spool_dir: Path, key: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", CRASH_MID_MOVE, str(spool_dir), key],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_a_crash_mid_move_leaves_the_envelope_in_both_places_and_settle_finishes_it(
    tmp_path: Path,
) -> None:
    key = uuid7()
    crash_mid_move(tmp_path / "spool", key)
    with Spool(tmp_path / "spool") as spool, DeadLetters.of(tmp_path / "spool") as dead:
        assert [k for k, _ in spool.read_page("", 10)] == [key]
        assert [d.key for d in dead] == [key]

        assert dead.settle(spool) == 1
        assert len(spool) == 0
        assert [d.envelope for d in dead] == [b'{"refused": true}']


# -- the publisher against a real nats-server ---------------------------------------------------


async def test_refused_envelopes_are_dead_lettered_and_the_rest_delivered(
    nats_server: NatsServer,
    spool: Spool,
    dead: DeadLetters,
    make_publisher: Callable[..., Publisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await set_max_msg_size(nats_server.url, MAX_MSG, create=True)
    over_stream, over_server = uuid7(), uuid7()
    await spool.put(over_stream, envelope(over_stream, pad=4 * MAX_MSG))  # JetStream err 10054
    await spool.put(over_server, envelope(over_server, pad=2 * 1024 * 1024))  # > max_payload
    first = [uuid7() for _ in range(20)]
    await asyncio.gather(*(spool.put(k, envelope(k)) for k in first))
    publisher = make_publisher(nats_server.url, dead, publish_timeout_ms=2000)
    publisher.start()

    await wait_until(lambda: publisher.stats.dead_lettered == 2 and len(spool) == 0)
    later = [uuid7() for _ in range(20)]  # the loop keeps moving after the refusals
    await asyncio.gather(*(spool.put(k, envelope(k)) for k in later))
    await wait_until(lambda: len(spool) == 0 and publisher.stats.acked == 40)

    assert await msg_ids(nats_server.url) == first + later
    assert publisher.stats.refused == 2
    letters = {d.key: d for d in dead}
    assert set(letters) == {over_stream, over_server}
    assert letters[over_stream].envelope == envelope(over_stream, pad=4 * MAX_MSG)
    assert (
        letters[over_stream].error == "BadRequestError" and "10054" in letters[over_stream].reason
    )
    assert letters[over_server].error == "MaxPayloadError"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert all("dead-letter area" in e for e in errors)
    assert any(over_stream in e and "10054" in e for e in errors)

    # After the operator raises the stream's limit, a requeued envelope is delivered; one the
    # server can still never take (over its max_payload) comes back to the dead-letter area.
    await set_max_msg_size(nats_server.url, -1)
    assert await asyncio.to_thread(dead.requeue, spool, None) == sorted(letters)
    await wait_until(lambda: publisher.stats.acked == 41 and publisher.stats.dead_lettered == 3)
    await wait_until(lambda: len(spool) == 0)
    assert (await msg_ids(nats_server.url))[-1] == over_stream
    assert [d.key for d in dead] == [over_server]


async def test_a_requeue_from_another_process_reaches_the_running_publisher(
    nats_server: NatsServer,
    spool: Spool,
    dead: DeadLetters,
    make_publisher: Callable[..., Publisher],
) -> None:
    await set_max_msg_size(nats_server.url, MAX_MSG, create=True)
    key = uuid7()
    publisher = make_publisher(nats_server.url, dead, publish_timeout_ms=2000)
    publisher.start()
    await spool.put(key, envelope(key, pad=4 * MAX_MSG))
    await wait_until(lambda: publisher.stats.dead_lettered == 1)
    await set_max_msg_size(nats_server.url, -1)

    # The operator CLI in its own process: nothing wakes the publisher but its rescan.
    cli = [sys.executable, "-m", "edgemeter.cli", "dead", "requeue", "--all"]
    done = await asyncio.to_thread(
        subprocess.run,
        [*cli, "--spool-dir", str(spool.directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    await wait_until(lambda: publisher.stats.acked == 1, timeout=30)
    assert await msg_ids(nats_server.url) == [key]
    assert len(dead) == 0


async def test_an_envelope_a_crash_left_in_both_places_is_not_published_or_moved_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await set_max_msg_size(nats_server.url, -1, create=True)  # it would be accepted now
    refused, other = uuid7(), uuid7()
    crash_mid_move(tmp_path / "spool", refused)
    with Spool(tmp_path / "spool") as spool, DeadLetters.of(spool.directory) as dead:
        await spool.put(other, envelope(other))
        publisher = Publisher(spool, NatsConfig(servers=(nats_server.url,), subject=SUBJECT), dead)
        publisher.start()
        try:
            await wait_until(lambda: len(spool) == 0)
        finally:
            await publisher.stop(0)
        assert await msg_ids(nats_server.url) == [other]
        assert publisher.stats.refused == publisher.stats.dead_lettered == 0
        assert [d.key for d in dead] == [refused]


async def test_an_unwritable_dead_letter_area_keeps_the_envelope_spooled(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await set_max_msg_size(nats_server.url, MAX_MSG, create=True)
    (spool.directory / DIRNAME).write_bytes(b"")  # a file where the directory should be
    big, small = uuid7(), uuid7()
    await spool.put(big, envelope(big, pad=4 * MAX_MSG))
    await spool.put(small, envelope(small))
    publisher = make_publisher(
        nats_server.url, DeadLetters.of(spool.directory), publish_timeout_ms=2000
    )
    publisher.start()

    await wait_until(lambda: publisher.stats.refused == 1 and publisher.stats.acked == 1)
    await asyncio.sleep(0.5)  # skipped from now on, not retried in a loop
    assert publisher.stats.refused == 1
    assert [k for k, _ in spool.read_page("", 10)] == [big]
    assert publisher.stats.dead_lettered == 0
    assert publisher.stats.errors["dead_letter"] >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dead-letter area" in w and big in w for w in warnings)
