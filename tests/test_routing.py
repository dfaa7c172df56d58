"""Routed spool values: the framing, and a real nats-server receiving each message on the subject
and with the headers it was spooled with, whether the publisher hands it over fresh or finds it
in the spool after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemeter.ids import uuid7
from spool import (
    DeadLetter,
    DeadLetters,
    NatsConfig,
    Publisher,
    Route,
    RouteError,
    Spool,
    pack,
    unpack,
)
from spool.routing import ROUTED
from tools.harness import NatsServer
from tools.streams import ensure_stream

STREAM = "CATALYST_SME"
BILLING = "catalyst.usage.recorded"
ELSEWHERE = "catalyst.usage.unbillable"
# Every byte a JSON body may hold, blank lines included.
BODY = b'{"text":"one\\n\\ntwo","metadata":{"request_id":"r"}}\n\n{}'


# -- the framing ---------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() != "nats-msg-id"
)
header_values = st.from_regex(r"[!-~]([ -~]{0,10}[!-~])?", fullmatch=True)
subjects = st.just("") | st.from_regex(r"[a-z0-9_]{1,6}(\.[a-zA-Z0-9_-]{1,6}){0,3}", fullmatch=True)


@given(
    subject=subjects, headers=st.dictionaries(names, header_values, max_size=4), body=st.binary()
)
def test_a_route_reads_back_as_it_was_packed(
    subject: str, headers: dict[str, str], body: bytes
) -> None:
    route, read = unpack(pack(Route(subject, headers), body))
    assert (route.subject, dict(route.headers), read) == (subject, headers, body)


@given(body=st.binary().filter(lambda b: not b.startswith(ROUTED)))
def test_a_plain_value_is_its_own_body_on_the_publishers_subject(body: bytes) -> None:
    route, read = unpack(body)
    assert (route.subject, dict(route.headers), read) == ("", {}, body)


@pytest.mark.parametrize(
    "route",
    [
        Route("catalyst.>"),
        Route("catalyst.*.x"),
        Route("catalyst..x"),
        Route("with space"),
        Route("", {"Nats-Msg-Id": "mine"}),
        Route("", {"nats-msg-id": "mine"}),
        Route("", {"Bad Name": "x"}),
        Route("", {"X": "line\r\nInjected: yes"}),
        Route("", {"X": "value\n"}),
        Route("catalyst.usage\n"),
        Route("", {"X": " padded"}),
        Route("", {"X": ""}),
        Route("", {"X": "caf\u00e9"}),
    ],
)
def test_a_route_nats_cannot_carry_is_refused(route: Route) -> None:
    with pytest.raises(RouteError):
        pack(route, b"{}")


@pytest.mark.parametrize(
    "value",
    [
        ROUTED + b"subject\nX: 1",
        ROUTED + b"s\nX 1\n\n{}",
        ROUTED + b"s\n\xff: 1\n\n{}",
        ROUTED + b"a b\n\n{}",
    ],
)
def test_a_damaged_route_is_an_error_never_a_guess(value: bytes) -> None:
    with pytest.raises(RouteError):
        unpack(value)


# -- on a real broker ----------------------------------------------------------------------------


async def messages(url: str) -> list[tuple[str, dict[str, str], bytes]]:
    """(subject, headers, payload) of every message on the stream, in order."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        jsm = nc.jsm()
        state = (await jsm.stream_info(STREAM)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await jsm.get_msg(STREAM, seq)
            found.append((msg.subject or "", dict(msg.headers or {}), msg.data or b""))
        return found
    finally:
        await nc.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def config(url: str) -> NatsConfig:
    return NatsConfig(servers=(url,), subject=BILLING, publish_timeout_ms=2000, linger_ms=0)


def routed_values() -> dict[str, bytes]:
    keys = [uuid7() for _ in range(3)]
    return {
        keys[0]: BODY,
        keys[1]: pack(Route(ELSEWHERE, {"Why": "no_customer", "ce-id": keys[1]}), BODY),
        keys[2]: pack(Route("", {"ce-id": keys[2]}), BODY),
    }


def expected(values: dict[str, bytes]) -> list[tuple[str, dict[str, str], bytes]]:
    first, second, third = values
    return [
        (BILLING, {"Nats-Msg-Id": first}, BODY),
        (ELSEWHERE, {"Nats-Msg-Id": second, "Why": "no_customer", "ce-id": second}, BODY),
        (BILLING, {"Nats-Msg-Id": third, "ce-id": third}, BODY),
    ]


async def test_values_committed_while_running_go_where_they_were_routed(
    nats_server: NatsServer, spool: Spool, make_publisher: Callable[..., Publisher]
) -> None:
    await ensure_stream(nats_server.url)
    publisher = make_publisher(nats_server.url, linger_ms=0)
    publisher.start()
    await wait_until(lambda: publisher.stats.connected)
    values = routed_values()
    for key, value in values.items():  # handed over as committed (the publisher's fast path)
        await spool.put(key, value)
    await wait_until(lambda: len(spool) == 0)
    assert await messages(nats_server.url) == expected(values)
    assert publisher.stats.acked == 3


async def test_values_found_in_the_spool_after_a_restart_keep_their_route(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await ensure_stream(nats_server.url)
    directory = tmp_path / "spool"
    values = routed_values()
    with Spool(directory) as first_life:  # a meter that spooled them, then died
        for future in [first_life.submit(key, value) for key, value in values.items()]:
            future.result()
    with Spool(directory) as spool:  # the next one reads them back (the scan path)
        publisher = Publisher(spool, config(nats_server.url))
        publisher.start()
        try:
            await wait_until(lambda: len(spool) == 0)
        finally:
            await publisher.stop(0)
    assert await messages(nats_server.url) == expected(values)


async def test_a_damaged_route_is_set_aside_and_published_nowhere(
    nats_server: NatsServer, spool: Spool, tmp_path: Path
) -> None:
    await ensure_stream(nats_server.url)
    damaged, good = uuid7(), uuid7()
    await spool.put(damaged, ROUTED + b"catalyst.usage.recorded\nX 1\n\n" + BODY)
    await spool.put(good, BODY)
    with DeadLetters.of(tmp_path / "spool") as dead:
        publisher = Publisher(spool, config(nats_server.url), dead)
        publisher.start()
        try:
            await wait_until(lambda: len(spool) == 0)
        finally:
            await publisher.stop(0)
        [letter] = list(dead)
        assert (letter.key, letter.error) == (damaged, "RouteError")
    assert await messages(nats_server.url) == [(BILLING, {"Nats-Msg-Id": good}, BODY)]


def test_a_routed_dead_letter_exports_its_route_and_its_envelope() -> None:
    value = pack(Route(ELSEWHERE, {"Why": "no_customer"}), BODY.split(b"\n\n{}")[0])
    exported = DeadLetter("k", value, "RouteError", "x", 0.0).to_json()
    assert exported["subject"] == ELSEWHERE
    assert exported["headers"] == {"Why": "no_customer"}
    assert exported["envelope"] == {"text": "one\n\ntwo", "metadata": {"request_id": "r"}}
    assert exported["size"] == len(value)
