"""Shared fixtures: real nats-server processes on free loopback ports, the recorded corpus,
the demo upstream and real mitmdump meters."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from edgemeter.addon import Meter
from edgemeter.aggregate import Families, parse
from spool.deadletter import DeadLetters
from spool.publisher import NatsConfig, Publisher
from spool.store import Spool
from tools.demo_upstream import BackgroundDemo, DemoUpstream
from tools.harness import (
    LIVE_PROXIES,
    ROOT,
    GroupAdmin,
    MeterFactory,
    MeterProxy,
    NatsServer,
    NatsTap,
    free_port,
)

SHARED = Path(os.environ.get("EDGEMETER_SHARED", ROOT.parent / "shared"))
RECORDED = SHARED / "fixtures" / "recorded"


@pytest.fixture(scope="session", autouse=True)
def default_spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Addons configured with default options open the default spool: never the user's own."""
    path = tmp_path_factory.mktemp("default-spool")
    before = os.environ.get("EDGEMETER_SPOOL_DIR")
    os.environ["EDGEMETER_SPOOL_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("EDGEMETER_SPOOL_DIR", None)
        else:
            os.environ["EDGEMETER_SPOOL_DIR"] = before


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def recorded() -> Path:
    if not RECORDED.is_dir():
        raise RuntimeError(f"recorded fixtures not found at {RECORDED} (set EDGEMETER_SHARED)")
    return RECORDED


# --- The demo upstream and the real mitmdump meter (end-to-end harness) ---------------------


@pytest.fixture(scope="session")
def demo_upstream() -> Iterator[BackgroundDemo]:
    """The demo upstream in a thread: canned answers, or the recorded file named by the
    x-demo-fixture header, streamed 7 bytes at a time so SSE events split anywhere."""
    if not RECORDED.is_dir():
        raise RuntimeError(f"recorded fixtures not found at {RECORDED} (set EDGEMETER_SHARED)")
    with BackgroundDemo(DemoUpstream(RECORDED, chunk_size=7)) as demo:
        yield demo


@pytest.fixture(scope="session")
def mitmproxy_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mitmproxy confdir (its CA) for the session: never the user's ~/.mitmproxy."""
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture
def meter_factory(tmp_path: Path, mitmproxy_confdir: Path) -> Iterator[MeterFactory]:
    factory = MeterFactory(tmp_path / "meters", mitmproxy_confdir)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_meter_factory(
    tmp_path_factory: pytest.TempPathFactory, mitmproxy_confdir: Path
) -> Iterator[MeterFactory]:
    factory = MeterFactory(tmp_path_factory.mktemp("meters"), mitmproxy_confdir)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def module_nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server shared by the tests of one module (cheaper than one per test)."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("jetstream"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Group:
    """A real `edgemeter serve --workers N` and its admin endpoint."""

    proxy: MeterProxy
    admin: GroupAdmin

    def metrics(self, worker: int | None = None) -> Families:
        """The group's /metrics, or one worker's own."""
        status, text = self.admin.get("/metrics" if worker is None else f"/metrics?worker={worker}")
        assert status == 200, text
        return parse(text)


@pytest.fixture
def groups(tmp_path: Path, mitmproxy_confdir: Path) -> Iterator[Callable[..., Group]]:
    """Start groups of lean runners: `groups(upstream, nats_url, *options, workers=2)` returns
    once every worker serves; each is stopped after the test."""
    factory = MeterFactory(
        tmp_path / "groups", mitmproxy_confdir, [sys.executable, "-m", "edgemeter.serve"], "group"
    )

    def start(upstream: str, nats_url: str, *options: str, workers: int = 2) -> Group:
        admin = GroupAdmin(free_port())
        proxy = factory.start(
            upstream,
            nats_url,
            f"meter_admin_listen=127.0.0.1:{admin.port}",
            *options,
            extra=["--workers", str(workers)],
        )
        admin.wait_serving(workers)
        return Group(proxy, admin)

    try:
        yield start
    finally:
        factory.stop_all()


@pytest.fixture
def tap_of() -> Iterator[Callable[[NatsServer], NatsTap]]:
    """Taps in front of nats-servers (harness.NatsTap: publishes counted per Nats-Msg-Id on the
    wire), served by an event loop of their own in a thread, for tests that are not async."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="taps", daemon=True)
    thread.start()
    taps: list[NatsTap] = []

    def tap(server: NatsServer) -> NatsTap:
        made = NatsTap(server.port)
        asyncio.run_coroutine_threadsafe(made.start(), loop).result(10)
        taps.append(made)
        return made

    try:
        yield tap
    finally:
        for made in taps:
            asyncio.run_coroutine_threadsafe(made.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def stopped_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server whose port is chosen but which is not running yet: call .start()."""
    server = NatsServer(store_dir=tmp_path / "jetstream-later")
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for proxy in LIVE_PROXIES:
            report.sections.append((f"mitmdump log {proxy.log_path}", proxy.log_tail()))
    return report


@pytest.fixture
def meter(tmp_path: Path) -> Iterator[tuple[Meter, taddons.context]]:
    addon = Meter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, meter_spool_dir=str(tmp_path / "spool"))
        yield addon, tctx
        assert addon.spool is not None
        addon.spool.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    s.open()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def make_publisher(spool: Spool) -> AsyncIterator[Callable[..., Publisher]]:
    """Publishers of the `spool` fixture to catalyst.usage.recorded (ack timeout 1 s unless
    overridden), stopped after the test."""
    made: list[Publisher] = []

    def make(url: str, dead: DeadLetters | None = None, **overrides: object) -> Publisher:
        options: dict[str, object] = {"publish_timeout_ms": 1000, **overrides}
        config = NatsConfig(servers=(url,), subject="catalyst.usage.recorded", **options)  # type: ignore[arg-type]
        publisher = Publisher(spool, config, dead)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        await publisher.stop(0)
