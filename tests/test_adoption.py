"""Spools nobody publishes, adopted by a meter that runs: the one a single meter left when the group
took over, those of workers a smaller group no longer has, and the workers' spools when a single
meter takes over again; each envelope published exactly once (counted on the wire by a tap)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgemeter.adoption import Adopter, own_spool_dir, spool_dirs
from edgemeter.ids import uuid7
from spool.publisher import NatsConfig
from spool.store import Spool
from tests.conftest import Group
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, NatsServer, NatsTap
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"


def left_behind(directory: Path, count: int) -> list[str]:
    """A spool with `count` envelopes in it, as a meter that is gone left it."""
    keys = [uuid7() for _ in range(count)]
    with Spool(directory) as spool:
        for key in keys:
            envelope = {"customer_id": "cus_left", "metadata": {"request_id": key}}
            spool.submit(key, json.dumps(envelope).encode()).result(10)
    return keys


def published(nats_url: str) -> list[str]:
    return [
        (headers or {}).get("Nats-Msg-Id", "")
        for headers, _ in asyncio.run(stream_messages(nats_url, STREAM))
    ]


def wait_published(nats_url: str, keys: list[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not set(keys) <= set(published(nats_url)):
        if time.monotonic() > deadline:
            missing = len(set(keys) - set(published(nats_url)))
            raise AssertionError(f"{missing} of {len(keys)} envelopes not published")
        time.sleep(0.2)


def empty(directory: Path) -> bool:
    with Spool(directory) as spool:
        return len(spool) == 0


@pytest.fixture
def broker(nats_server: NatsServer) -> NatsServer:
    asyncio.run(ensure_stream(nats_server.url))
    return nats_server


@pytest.fixture
def single(tmp_path: Path, mitmproxy_confdir: Path) -> Iterator[MeterFactory]:
    """Lean runners alone (`edgemeter serve`, no --workers)."""
    factory = MeterFactory(
        tmp_path / "single", mitmproxy_confdir, [sys.executable, "-m", "edgemeter.serve"], "lean"
    )
    try:
        yield factory
    finally:
        factory.stop_all()


def test_a_single_meters_spool_and_those_of_workers_gone_are_drained_once_by_the_group(
    groups: Callable[..., Group],
    demo_upstream: BackgroundDemo,
    broker: NatsServer,
    tap_of: Callable[[NatsServer], NatsTap],
    tmp_path: Path,
) -> None:
    root = tmp_path / "spool"
    single = left_behind(root, 40)  # `edgemeter serve` ran here before `--workers 2`
    gone = left_behind(root / "worker-3", 25)  # a group of 4 ran here before
    tap = tap_of(broker)
    group = groups(demo_upstream.url, tap.url, f"meter_spool_dir={root}")
    wait_published(broker.url, single + gone)
    # Both workers looked at both spools at once; each envelope went out once.
    assert {key: tap.published[key] for key in single + gone} == dict.fromkeys(single + gone, 1)
    assert empty(root) and empty(root / "worker-3")

    def adopted() -> float:
        family = group.metrics().get("edgemeter_adopted_envelopes")
        return sum(family.samples.values()) if family else 0.0

    deadline = time.monotonic() + 30  # the acks reach the workers after the stream has them
    while adopted() < len(single + gone) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert adopted() == len(single + gone)


def test_a_single_meter_drains_the_spools_its_workers_left(
    single: MeterFactory,
    demo_upstream: BackgroundDemo,
    broker: NatsServer,
    tap_of: Callable[[NatsServer], NatsTap],
    tmp_path: Path,
) -> None:
    root = tmp_path / "spool"
    left = left_behind(root / "worker-0", 20) + left_behind(root / "worker-1", 15)
    tap = tap_of(broker)
    single.start(demo_upstream.url, tap.url, f"meter_spool_dir={root}")
    wait_published(broker.url, left)
    assert {key: tap.published[key] for key in left} == dict.fromkeys(left, 1)
    assert empty(root / "worker-0") and empty(root / "worker-1")


async def test_meters_that_look_at_once_publish_a_spool_nobody_publishes_once(
    broker: NatsServer, tmp_path: Path
) -> None:
    root = tmp_path / "spool"
    left = await asyncio.to_thread(left_behind, root / "worker-5", 1500)
    tap = NatsTap(broker.port)
    await tap.start()
    config = NatsConfig(servers=(tap.url,), subject="catalyst.usage.recorded")
    # Three meters of one group, each looking at the others' spools at the same instant.
    adopters = [Adopter(root, own_spool_dir(root, i), config) for i in range(3)]
    try:
        for adopter in adopters:
            adopter.start()
        deadline = time.monotonic() + 60
        while sum(a.published for a in adopters) < len(left) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for adopter in adopters:
            await adopter.stop()
        await tap.stop()
    assert sum(a.published for a in adopters) == len(left)
    assert sorted(a.published for a in adopters)[:2] == [0, 0]  # one of them took it
    assert {key: tap.published[key] for key in left} == dict.fromkeys(left, 1)
    assert await asyncio.to_thread(empty, root / "worker-5")


def test_the_spools_of_a_group_are_found_under_its_root(tmp_path: Path) -> None:
    for name in ("worker-0", "worker-12", "worker-x", "dead-letter", "worker-2"):
        (tmp_path / name).mkdir()
    for name in ("worker-0", "worker-12", "worker-x", "dead-letter"):
        (tmp_path / name / "cache.db").touch()
    assert spool_dirs(tmp_path) == [tmp_path / "worker-0", tmp_path / "worker-12"]
    (tmp_path / "cache.db").touch()
    assert spool_dirs(tmp_path)[0] == tmp_path
    assert own_spool_dir(tmp_path, None) == tmp_path
    assert own_spool_dir(tmp_path, 3) == tmp_path / "worker-3"
