"""The JetStream publisher against a real nats-server: delivery, outages, dedupe, shutdown."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import certifi
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.js.api import StorageType, StreamConfig

import spool.publisher as spool_publisher
from edgemeter.ids import uuid7
from spool import NatsConfig, Publisher, Spool, SpoolLock
from spool.errors import SpoolError
from spool.publisher import _FRESH_MAX, _LINGER_ENOUGH, _Attempt, _Client
from spool.routing import ROUTED, Route, pack, unpack
from spool.store import Scanned
from tools.harness import NatsServer
from tools.streams import ensure_stream, stream_messages

SUBJECT = "catalyst.usage.recorded"
STREAM = "CATALYST_SME"


def envelope(key: str) -> bytes:
    return b'{"metadata": {"request_id": "%s"}, "amount_micro_omr": -156}' % key.encode()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def spool_keys(spool: Spool, count: int) -> list[str]:
    keys = [uuid7() for _ in range(count)]
    await asyncio.gather(*(spool.put(key, envelope(key)) for key in keys))
    return keys


async def msg_ids(url: str) -> list[str]:
    return [
        (headers or {}).get("Nats-Msg-Id", "") for headers, _ in await stream_messages(url, STREAM)
    ]


async def test_a_prefilled_spool_drains_to_the_stream(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    keys = await spool_keys(spool, 500)
    publisher = make_publisher(nats_server.url)
    publisher.start()

    await wait_until(lambda: len(spool) == 0)
    assert await msg_ids(nats_server.url) == keys  # exactly once each, in key order
    payloads = [data for _, data in await stream_messages(nats_server.url, STREAM)]
    assert payloads[0] == envelope(keys[0])
    assert publisher.stats.acked == 500
    assert publisher.stats.duplicates == 0
    assert publisher.stats.connected


async def test_envelopes_spooled_later_are_published_even_out_of_key_order(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url)
    publisher.start()
    early = uuid7()  # minted when a long request started ...
    await spool_keys(spool, 20)
    await wait_until(lambda: len(spool) == 0)
    await spool.put(early, envelope(early))  # ... spooled after later keys were published
    await wait_until(lambda: len(spool) == 0)
    assert len(await msg_ids(nats_server.url)) == 21


async def test_envelopes_spooled_while_draining_all_arrive_exactly_once(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url, max_in_flight=32)
    publisher.start()
    keys: list[str] = []
    for _ in range(20):
        late = [uuid7() for _ in range(5)]  # minted now, spooled after newer keys
        keys += await spool_keys(spool, 100)
        await asyncio.sleep(0.005)
        await asyncio.gather(*(spool.put(key, envelope(key)) for key in late))
        keys += late
    await wait_until(lambda: len(spool) == 0)
    ids = await msg_ids(nats_server.url)
    assert len(ids) == len(set(ids)) == 2100
    assert set(ids) == set(keys)


async def test_start_returns_at_once_while_the_broker_is_down(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await ensure_stream(nats_server.url)
    nats_server.stop()
    keys = await spool_keys(spool, 100)
    publisher = make_publisher(nats_server.url)

    began = time.monotonic()
    publisher.start()
    assert time.monotonic() - began < 0.1
    with caplog.at_level(logging.INFO):
        await asyncio.sleep(1.5)
        assert not publisher.stats.connected
        assert publisher.stats.errors["connect"] >= 2
        nats_server.start()
        await wait_until(lambda: len(spool) == 0)
    assert await msg_ids(nats_server.url) == keys
    # Broker trouble is rate-limited WARNING, never ERROR (mitmdump exits on an early ERROR).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 2


async def test_a_missing_stream_is_retried_until_it_exists(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    keys = await spool_keys(spool, 50)
    publisher = make_publisher(nats_server.url)
    publisher.start()
    await wait_until(lambda: publisher.stats.stream_missing)
    await asyncio.sleep(0.3)
    assert len(spool) == 50
    assert publisher.stats.errors["no_stream"] >= 1

    await ensure_stream(nats_server.url)
    await wait_until(lambda: len(spool) == 0)
    assert not publisher.stats.stream_missing
    assert sorted(await msg_ids(nats_server.url)) == keys


async def test_a_broker_killed_mid_drain_loses_and_duplicates_nothing(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    keys = await spool_keys(spool, 4000)
    publisher = make_publisher(nats_server.url, max_in_flight=64)
    publisher.start()
    await wait_until(lambda: publisher.stats.acked >= 300)

    nats_server.stop(kill=True)
    assert publisher.stats.acked < 4000
    keys += await spool_keys(spool, 200)  # the proxy keeps spooling during the outage
    await asyncio.sleep(0.5)
    assert len(spool) > 0
    nats_server.start()

    await wait_until(lambda: len(spool) == 0, timeout=20)
    ids = await msg_ids(nats_server.url)
    assert len(ids) == len(set(ids)) == 4200
    assert set(ids) == set(keys)


async def test_republishing_a_key_is_acked_as_a_duplicate_and_removed(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url)
    publisher.start()
    (key,) = await spool_keys(spool, 1)
    await wait_until(lambda: len(spool) == 0)

    await spool.put(key, envelope(key))  # e.g. an ack lost before the delete
    await wait_until(lambda: len(spool) == 0)
    assert publisher.stats.acked == 2
    assert publisher.stats.duplicates == 1
    assert await msg_ids(nats_server.url) == [key]


async def test_stop_with_the_broker_down_leaves_envelopes_spooled(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    nats_server.stop()
    await spool_keys(spool, 30)
    publisher = make_publisher(nats_server.url)
    publisher.start()
    await asyncio.sleep(0.2)

    began = time.monotonic()
    assert await publisher.stop(drain_timeout=1.0) == 30
    assert time.monotonic() - began < 2.0
    assert len(spool) == 30
    assert not spool.listening


async def test_stop_drains_what_is_left_before_returning(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url)
    keys = await spool_keys(spool, 300)
    assert await publisher.stop(drain_timeout=5.0) == 0  # never started: connects to drain
    assert await msg_ids(nats_server.url) == keys


async def test_a_spool_another_publisher_holds_is_published_only_once_it_lets_go(
    nats_server: NatsServer, spool: Spool
) -> None:
    await ensure_stream(nats_server.url)
    keys = await spool_keys(spool, 40)
    config = NatsConfig(servers=(nats_server.url,), subject=SUBJECT)
    other = SpoolLock(spool.directory)
    assert other.acquire_nowait()
    waiting = Publisher(spool, config, lock=SpoolLock(spool.directory))
    waiting.start()
    # Its final drain finds the spool held: nothing is published, everything stays.
    assert await waiting.stop(drain_timeout=5.0) == 40
    assert await msg_ids(nats_server.url) == []
    other.release()
    mine = SpoolLock(spool.directory)
    publisher = Publisher(spool, config, lock=mine)
    publisher.start()
    await wait_until(lambda: len(spool) == 0)
    assert mine.held
    assert await publisher.stop(drain_timeout=1.0) == 0
    assert not mine.held  # stop lets it go
    assert await msg_ids(nats_server.url) == keys


async def test_an_envelope_the_broker_refuses_does_not_block_the_rest(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        config = StreamConfig(
            name=STREAM, subjects=["catalyst.>"], storage=StorageType.FILE, max_msg_size=1024
        )
        await nc.jsm().add_stream(config)
    finally:
        await nc.close()
    big = uuid7()
    await spool.put(big, b"x" * 4096)
    keys = await spool_keys(spool, 20)
    publisher = make_publisher(nats_server.url)
    publisher.start()

    await wait_until(lambda: len(spool) == 1)
    assert spool.read_page("", 10)[0][0] == big  # kept, not dropped
    assert publisher.stats.refused == 1
    assert await msg_ids(nats_server.url) == keys
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and big in errors[0].getMessage()


async def test_a_wrong_password_is_reported_but_never_logged(
    tmp_path: Path,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = NatsServer(
        store_dir=tmp_path / "js", extra_args=["--user", "meter", "--pass", "s3cret"]
    )
    server.start()
    try:
        await spool_keys(spool, 5)
        with caplog.at_level(logging.DEBUG):
            wrong = make_publisher(server.url, user="meter", password="hunter2-wrong")
            wrong.start()
            # Some attempts see the server's reset before its -ERR line: wait for a clear one.
            await wait_until(lambda: "authorization" in wrong.stats.last_error.lower())
            assert await wrong.stop(0.5) == 5
        assert "hunter2" not in caplog.text

        right = make_publisher(server.url, user="meter", password="s3cret")
        assert right.stats is not wrong.stats
        await ensure_stream(f"nats://meter:s3cret@127.0.0.1:{server.port}")
        right.start()
        await wait_until(lambda: len(spool) == 0)
    finally:
        server.stop()


async def test_tls_keeps_the_server_name_check_on(spool: Spool) -> None:
    ca = Path(certifi.where())
    publisher = Publisher(
        spool,
        NatsConfig(servers=("tls://broker:4222",), subject=SUBJECT, tls_ca_file=str(ca)),
    )
    kwargs = publisher._connect_kwargs(NATS(), _Attempt(1))
    assert kwargs["tls"].check_hostname is True
    assert "tls_hostname" not in kwargs


class GatedSpool(Spool):
    """A spool whose discard of `held` waits for `let_delete`, and whose next page holding
    `held` (once `gate` is set) reaches the publisher only after `resume`: the window in which a
    page read before a delete committed reaches the pump after the delete finished."""

    def __init__(self, directory: Path, held: str) -> None:
        super().__init__(directory)
        self.held = held
        self.gate = False
        self.deleting, self.let_delete = asyncio.Event(), asyncio.Event()
        self.page_read, self.resume = asyncio.Event(), asyncio.Event()

    def scan_async(self, after: str, limit: int) -> asyncio.Future[Scanned]:
        inner = super().scan_async(after, limit)
        if not self.gate:
            return inner

        async def relay() -> Scanned:
            scanned = await inner
            if any(key == self.held for key, _ in scanned.page):
                self.gate = False
                self.page_read.set()
                await self.resume.wait()
            return scanned

        return asyncio.ensure_future(relay())

    def discard(self, sizes: Mapping[str, int]) -> asyncio.Future[None]:
        if self.held not in sizes:
            return super().discard(sizes)

        async def held() -> None:
            self.deleting.set()
            await self.let_delete.wait()
            await super(GatedSpool, self).discard(sizes)

        return asyncio.ensure_future(held())


async def test_a_page_read_before_a_delete_does_not_publish_that_key_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await ensure_stream(nats_server.url)
    early, late = uuid7(), uuid7()
    spool = GatedSpool(tmp_path / "gated", held=late)
    spool.open()
    publisher = Publisher(spool, NatsConfig(servers=(nats_server.url,), subject=SUBJECT))
    try:
        await spool.put(late, envelope(late))
        publisher.start()
        await asyncio.wait_for(spool.deleting.wait(), 10)  # acked; its delete has not committed
        spool.gate = True
        # As after a hand-over that overflowed: the pump goes back to scanning from the start,
        # and its page holds `late` again.
        publisher._fresh_lost = True
        await spool.put(early, envelope(early))
        await asyncio.wait_for(spool.page_read.wait(), 10)
        spool.let_delete.set()
        await wait_until(lambda: late not in publisher._in_flight)  # the delete finished
        spool.resume.set()
        await wait_until(lambda: len(spool) == 0)
        assert await publisher.stop(1) == 0
        assert publisher.stats.acked == 2  # 3 when `late` went out a second time
        assert publisher.stats.duplicates == 0
        assert sorted(await msg_ids(nats_server.url)) == sorted([early, late])
    finally:
        spool.let_delete.set()
        spool.resume.set()
        await publisher.stop(0)
        spool.close()


class CountingSpool(Spool):
    """Counts the publisher's requests to the spool: scans, counts and deletes."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.calls: collections.Counter[str] = collections.Counter()

    def scan(self, after: str, limit: int) -> tuple[list[tuple[str, bytes]], int | None]:
        self.calls["scan"] += 1
        return super().scan(after, limit)

    def __len__(self) -> int:
        self.calls["len"] += 1
        return super().__len__()

    def discard(self, sizes: Mapping[str, int]) -> asyncio.Future[None]:
        self.calls["discard"] += 1
        return super().discard(sizes)


@pytest.fixture
async def counted(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[CountingSpool, Publisher]]:
    """A counting spool and its publisher (not started), both stopped after the test."""
    spool = CountingSpool(tmp_path / "counted")
    spool.open()
    publisher = Publisher(spool, NatsConfig(servers=(nats_server.url,), subject=SUBJECT))
    try:
        yield spool, publisher
    finally:
        await publisher.stop(0)
        spool.close()


async def test_a_short_page_ends_the_scan_without_a_second_read_or_count(
    nats_server: NatsServer, counted: tuple[CountingSpool, Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    spool, publisher = counted
    keys = await spool_keys(spool, 5)
    publisher.start()
    await wait_until(lambda: publisher.stats.acked == 5 and not publisher._in_flight)
    assert spool.calls["scan"] == 1  # was: a page, an empty page, then a count
    assert spool.calls["len"] == 1  # the one inside the scan
    assert spool.calls["discard"] >= 1
    assert spool.held_bytes == 0  # kept from the sizes published, without a query
    assert await publisher.stop(1) == 0
    assert sorted(await msg_ids(nats_server.url)) == sorted(keys)


async def test_envelopes_committed_once_caught_up_are_published_without_reading_them_back(
    nats_server: NatsServer, counted: tuple[CountingSpool, Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    spool, publisher = counted
    publisher.start()
    await wait_until(lambda: spool.calls["scan"] == 1)  # the scan that found it empty
    keys: list[str] = []
    for _ in range(10):
        keys += await spool_keys(spool, 30)
        await asyncio.sleep(0.01)
    # The spool can read empty a moment before the loop hears that the deletes committed.
    await wait_until(
        lambda: publisher.stats.acked == 300 and len(spool) == 0 and not publisher._in_flight
    )
    assert spool.calls["scan"] == 1  # every one of them came from the writer's hand-over
    # Nothing kept per envelope once published: a meter runs for months.
    assert not publisher._deleted and not publisher._fresh
    assert not publisher._awaiting
    assert publisher.stats.duplicates == 0
    assert spool.held_bytes == 0
    assert sorted(await msg_ids(nats_server.url)) == sorted(keys)


async def test_a_hand_over_past_its_bound_is_read_back_from_the_spool(
    nats_server: NatsServer, counted: tuple[CountingSpool, Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    nats_server.stop()
    spool, publisher = counted
    publisher.start()
    keys = await spool_keys(spool, _FRESH_MAX + 100)  # while the broker is down
    assert publisher._fresh_count <= _FRESH_MAX  # memory stays bounded
    nats_server.start()
    await wait_until(lambda: len(spool) == 0, timeout=30)
    assert spool.calls["scan"] >= 1
    assert publisher.stats.duplicates == 0
    ids = await msg_ids(nats_server.url)
    assert len(ids) == len(set(ids)) == len(keys)


@pytest.fixture
async def lingering(nats_server: NatsServer, make_publisher: Callable[..., Publisher]) -> Publisher:
    """A connected publisher that lingers an hour: only a flush or a full batch ends it."""
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url, linger_ms=3_600_000)
    publisher.start()
    await wait_until(lambda: publisher.stats.connected)
    return publisher


async def test_a_trickle_lingers_and_goes_as_one_batch_when_flushed(
    nats_server: NatsServer, spool: Spool, lingering: Publisher
) -> None:
    publisher = lingering
    keys: list[str] = []
    for _ in range(5):
        keys += await spool_keys(spool, 1)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert publisher.stats.acked == 0  # an hour's linger: still gathering

    publisher.notify()  # what meter.flush does: the linger ends now
    await wait_until(lambda: len(spool) == 0)
    assert await msg_ids(nats_server.url) == keys


async def test_a_full_batch_ends_the_linger(
    nats_server: NatsServer, spool: Spool, lingering: Publisher
) -> None:
    publisher = lingering
    await spool_keys(spool, 1)
    await asyncio.sleep(0.2)
    keys = await spool_keys(spool, _LINGER_ENOUGH)
    await wait_until(lambda: publisher.stats.acked == _LINGER_ENOUGH + 1)
    assert set(keys) <= set(await msg_ids(nats_server.url))


async def test_an_ack_that_never_comes_times_out_and_the_retry_is_deduped(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        # A stream that stores but never acks: every publish to it times out.
        config = StreamConfig(
            name=STREAM, subjects=["catalyst.>"], storage=StorageType.FILE, no_ack=True
        )
        await nc.jsm().add_stream(config)
    finally:
        await nc.close()
    keys = await spool_keys(spool, 3)
    publisher = make_publisher(nats_server.url, publish_timeout_ms=200)
    publisher.start()

    await wait_until(lambda: publisher.stats.errors["timeout"] >= 2)  # tried, and tried again
    assert len(spool) == 3  # never acked: never deleted
    assert publisher.stats.acked == 0
    assert sorted(await msg_ids(nats_server.url)) == sorted(keys)  # stored once each
    await publisher.stop(0)
    assert not publisher._awaiting and publisher.stats.in_flight == 0


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"not json", "api"),
        (b"[1, 2]", "api"),
        (b'{"error": {"code": 503, "err_code": 10077, "description": "busy"}}', "api"),
        (b'{"error": "no object", "extra": 1}', "api"),
        (b'{"error": {"code": 400, "err_code": 10054, "future": [1]}}', "refused"),
    ],
)
async def test_a_foreign_answer_to_a_publish_is_an_error_and_the_envelope_stays(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    answer: bytes,
    kind: str,
) -> None:
    # No stream: a plain subscriber answers in JetStream's place.
    nc = await nats.connect(nats_server.url)

    async def respond(msg: Msg) -> None:
        await nc.publish(msg.reply, answer)

    await nc.subscribe(SUBJECT, cb=respond)
    await nc.flush()
    try:
        keys = await spool_keys(spool, 1)
        publisher = make_publisher(nats_server.url)
        publisher.start()
        await wait_until(lambda: publisher.stats.errors[kind] >= 1)
        assert publisher.stats.acked == 0
        assert [key for key, _ in spool.read_page("", 10)] == keys
        await publisher.stop(0)
        assert publisher.stats.in_flight == 0
    finally:
        await nc.close()


# -- the publisher's own wire work, held to nats-py's (pinned in requirements/lock.txt) -------


async def nats_py_hpub(
    subject: str, reply: str, headers: dict[str, str], payload: bytes
) -> bytes | BaseException:
    """What nats-py's publish() queues for these (or raises), read off an unconnected client."""
    nc = NATS()
    nc._status = NATS.CONNECTED  # past publish()'s reconnect-buffer checks
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    nc._send_command = capture  # type: ignore[method-assign]
    try:
        await nc.publish(subject, payload, reply=reply, headers=dict(headers))
    except Exception as exc:
        return exc
    (command,) = sent
    return command


@pytest.mark.parametrize(
    ("subject", "headers", "payload"),
    [
        (SUBJECT, {"Nats-Msg-Id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"}, b'{"a": 1}'),
        (SUBJECT, {"Nats-Msg-Id": " spaced\r\nkey "}, b""),
        (
            "catalyst.usage.unbillable",
            {"Nats-Msg-Id": "k", "ce-id": "x", " ce-type ": "t\nu", "": "skipped", "ce-é": "v"},
            b"x" * 900,
        ),
        (SUBJECT, {"Nats-Msg-Id": "k", "bad key": "v"}, b"{}"),
        ("bad subject", {"Nats-Msg-Id": "k"}, b"{}"),
        ("", {"Nats-Msg-Id": "k"}, b"{}"),
        (SUBJECT, {"Nats-Msg-Id": "k"}, b"x" * (1024 * 1024 + 1)),
    ],
)
async def test_publishes_are_the_bytes_and_errors_of_nats_py(
    spool: Spool, subject: str, headers: dict[str, str], payload: bytes
) -> None:
    publisher = Publisher(spool, NatsConfig(servers=("nats://x:4222",), subject=SUBJECT))
    nc = NATS()  # its max_payload before any INFO: nats-py's default, 1 MiB
    expected = await nats_py_hpub(subject, "_INBOX.abc.7", headers, payload)
    try:
        built: bytes | BaseException = publisher._hpub(
            nc, subject, "_INBOX.abc.7", headers, payload
        )
    except Exception as exc:
        built = exc
    if isinstance(expected, BaseException):
        assert type(built) is type(expected)
    else:
        assert built == expected


async def test_acks_are_read_where_nats_py_parses_them_and_a_plain_one_without_json(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await ensure_stream(nats_server.url)
    through_queue: list[Msg] = []

    async def on_ack(self: Publisher, msg: Msg) -> None:
        through_queue.append(msg)

    monkeypatch.setattr(Publisher, "_on_ack", on_ack)
    decoded: list[bytes] = []

    def loads(text: bytes) -> object:
        decoded.append(text)
        return json.loads(text)

    monkeypatch.setattr(spool_publisher, "json", SimpleNamespace(loads=loads))
    publisher = make_publisher(nats_server.url)
    publisher.start()
    (key,) = await spool_keys(spool, 1)
    await wait_until(lambda: len(spool) == 0)
    await spool.put(key, envelope(key))  # acked as a duplicate
    keys = await spool_keys(spool, 50)
    await wait_until(lambda: len(spool) == 0)
    assert isinstance(publisher._nc, _Client)
    assert publisher._nc._ack_sid in publisher._nc._subs  # the subscription's sid, as parsed
    assert publisher.stats.acked == 52 and publisher.stats.duplicates == 1
    assert through_queue == []  # no Msg, no subscription task
    assert decoded == []  # nats-server's PubAck, with and without duplicate, read as bytes
    assert sorted(await msg_ids(nats_server.url)) == sorted([key, *keys])


async def test_without_the_interception_acks_still_come_through_the_subscription(
    nats_server: NatsServer,
    spool: Spool,
    make_publisher: Callable[..., Publisher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await ensure_stream(nats_server.url)
    monkeypatch.setattr(_Client, "intercept", lambda self, sid, handler: None)
    publisher = make_publisher(nats_server.url)
    publisher.start()
    keys = await spool_keys(spool, 20)
    await wait_until(lambda: len(spool) == 0)
    assert publisher.stats.acked == 20
    assert await msg_ids(nats_server.url) == keys


@pytest.mark.parametrize(
    ("answer", "duplicate"),
    [
        (b'{"stream":"S","seq":1}', False),
        (b'{"stream":"S","seq":2,"duplicate":true}', True),
        (b'{"stream":"S","seq":2,"duplicate": true}', True),
        (b'{"stream": "S", "domain": "hub", "seq": 2}', False),
        (b'{"stream":"S","domain":"hub","seq":3,"duplicate":true}', True),
        (b'{"stream":"S","seq":4,"duplicate":false}', False),  # through json
        (b'{"seq":5,"stream":"S","duplicate":1}', True),  # through json
        (b'{"stream":"S","seq":6}\n', False),  # through json
    ],
)
async def test_an_ack_read_as_bytes_counts_as_json_would(
    spool: Spool, answer: bytes, duplicate: bool
) -> None:
    publisher = Publisher(spool, NatsConfig(servers=("nats://x:4222",), subject=SUBJECT))
    publisher._bind()
    publisher._inbox = "_INBOX.t"
    assert publisher._slots is not None
    await publisher._slots.acquire()
    publisher._awaiting[9] = ("k", b"{}", time.monotonic())
    publisher._in_flight.add("k")
    publisher._ack(b"_INBOX.t.9", answer, None)
    assert publisher.stats.acked == 1
    assert publisher.stats.duplicates == int(duplicate)
    assert not publisher._awaiting and not publisher._acked  # handed to the spool at once
    await asyncio.gather(*publisher._discarding)
    assert "k" not in publisher._in_flight


@pytest.mark.parametrize(
    ("key", "data", "subject"),
    [
        ("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", b'{"a": 1}' * 100, SUBJECT),
        (" spaced\r\nkey\u00e9 ", b"", SUBJECT),
        ("0190a1b2", b"{}", "bad subject"),
        (
            "0190a1b2",
            pack(Route("catalyst.usage.unbillable", {"ce-id": "abc", "ce-type": "t"}), b"{}"),
            SUBJECT,
        ),
    ],
)
async def test_a_batch_queues_what_nats_py_would_for_each_envelope(
    spool: Spool, key: str, data: bytes, subject: str
) -> None:
    publisher = Publisher(spool, NatsConfig(servers=("nats://x:4222",), subject=subject))
    publisher._bind()
    publisher._set_inbox("_INBOX.abc")
    nc = NATS()
    nc._status = NATS.CONNECTED
    assert await publisher._publish_one(nc, key, data) is (subject == SUBJECT)
    route, body = unpack(data) if data.startswith(ROUTED) else (Route(""), data)
    expected = await nats_py_hpub(
        route.subject or subject, "_INBOX.abc.1", {"Nats-Msg-Id": key, **route.headers}, body
    )
    if isinstance(expected, BaseException):
        assert publisher._out == [] and publisher.stats.errors["publish"] == 1
    else:
        assert publisher._out == [expected]
    for _, _, _ in publisher._awaiting.values():
        publisher._release(key, acked=False)
    if publisher._expiry is not None:
        publisher._expiry.cancel()


class WrittenTransport(TcpTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[list[bytes]] = []

    def writelines(self, payload: list[bytes]) -> None:
        self.written.append(list(payload))


async def test_a_batch_goes_straight_to_the_socket_unless_nats_py_has_bytes_waiting(
    spool: Spool,
) -> None:
    publisher = Publisher(spool, NatsConfig(servers=("nats://x:4222",), subject=SUBJECT))
    nc = NATS()
    nc._status = NATS.CONNECTED
    transport = nc._transport = WrittenTransport()
    publisher._out = [b"A", b"B"]
    await publisher._send_out(nc)
    assert transport.written == [[b"A", b"B"]] and nc._pending == []

    nc._pending = [b"PING\r\n"]  # queued by nats-py, not yet flushed: ours go behind it
    publisher._out = [b"C", b"D"]
    await publisher._send_out(nc)
    assert transport.written == [[b"A", b"B"]]
    assert nc._pending == [b"PING\r\n", b"CD"]
    assert nc.stats["out_msgs"] == 4

    nc._pending = []
    nc._status = NATS.RECONNECTING  # into nats-py's reconnect buffer
    publisher._out = [b"E"]
    await publisher._send_out(nc)
    assert nc._pending == [b"E"] and transport.written == [[b"A", b"B"]]


class FailingDiscards(Spool):
    def discard(self, sizes: Mapping[str, int]) -> asyncio.Future[None]:
        raise SpoolError("disk gone")


async def test_a_delete_that_fails_is_warned_and_the_keys_come_round_again_as_duplicates(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await ensure_stream(nats_server.url)
    spool = FailingDiscards(tmp_path / "failing")
    spool.open()
    publisher = Publisher(spool, NatsConfig(servers=(nats_server.url,), subject=SUBJECT))
    try:
        publisher.start()
        keys = await spool_keys(spool, 5)
        await wait_until(lambda: publisher.stats.acked >= 5 and not publisher._in_flight)
        assert publisher.stats.errors["spool"] >= 1
        assert len(spool) == 5
    finally:
        await publisher.stop(0)
        spool.close()
    assert sorted(await msg_ids(nats_server.url)) == sorted(keys)  # stored once each
