"""Chaos harness for SPEC §5 (delivery): real brokers, a real mitmdump meter (or a group of lean
runners, `edgemeter serve --workers 2`) and a tagged client load under injected faults, then a
count of envelopes per request on the stream.

Run it with `scripts/chaos` (or `python -m tools.chaos --help`). For each scenario it starts a
fresh nats-server (or a three-node cluster), the meter in front of the demo upstream, and drives
a mix of streamed and non-streamed requests through the official SDKs, each tagged with its own
`X-Request-Id`. While the load runs it injects the scenario's fault; then it waits for the spool
to drain, stops the meter with SIGTERM and reads the whole stream. It prints one row per
scenario — requests completed at the client, lost, duplicated — and exits 1 on any loss, any
duplicate, or a scenario whose fault did not demonstrably hit the load. One request in
UNATTRIBUTED_EVERY names no customer: it must land on the unbillable subject, every other one on
the billing subject where the model of the billing consumer books it, each exactly once across
both (anything else is misrouted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anthropic
import nats
import nats.js.errors
import openai
from nats.aio.client import Client as NatsClient

from edgemeter.adoption import own_spool_dir, spool_dirs
from edgemeter.metering.contract import consume
from edgemeter.options import DEFAULTS
from tools.harness import (
    DemoProcess,
    GroupAdmin,
    MeterFactory,
    MeterProxy,
    NatsCluster,
    NatsServer,
    NatsTap,
    free_port,
)
from tools.streams import STREAM, STREAM_SUBJECTS, ensure_stream

SUBJECTS = STREAM_SUBJECTS
# The meter's subjects, as it runs here (its defaults): both under the stream's catalyst.>.
BILLING_SUBJECT: str = DEFAULTS["meter_subject"]
UNBILLABLE_SUBJECT: str = DEFAULTS["meter_unbillable_subject"]
# Every this many requests, one names no customer: the billing consumer could not book it.
UNATTRIBUTED_EVERY = 10
# A scenario that has not counted its envelopes by then is reported as failed.
SCENARIO_TIMEOUT_S = 900
API_KEY = "sk-chaos-0123456789abcdef"
# The demo answers in chunks of this size; with a delay between chunks, streams are in flight
# (for a few hundred ms) when a fault hits.
CHUNK_SIZE = 256
# A client that hangs up on purpose does so once it has this much of the stream.
ABORT_AFTER_BYTES = 300
# The end of each streamed shape: a stream that reached it was delivered whole.
TERMINAL = {
    "chat": b"data: [DONE]",
    "responses": b"event: response.completed",
    "messages": b"event: message_stop",
}
# What a request whose client hung up mid-stream must be billed: exactly once, client_aborted;
# or complete, when the proxy had passed on the whole stream before it noticed the hang-up
# (the client had simply not read it yet, as happens to a lagging client).
BILLED_ONCE_ABORTED = (["client_aborted"], ["complete"])
# The request mix, one slot per request in turn: (shape, streamed).
MIX: tuple[tuple[str, bool], ...] = (
    ("chat", True),
    ("chat", False),
    ("responses", True),
    ("messages", True),
    ("chat", True),
    ("messages", False),
    ("responses", False),
    ("chat", True),
)
CHAT: Any = [{"role": "user", "content": "count the envelopes please"}]

State = Literal["running", "completed", "failed", "aborted"]


# --- the client load ------------------------------------------------------------------------


@dataclass
class Record:
    """One request as the client saw it."""

    tag: str
    shape: str
    stream: bool
    started: float
    ended: float = 0.0
    state: State = "running"
    # A stream whose last event arrived but whose body was then cut (the connection died
    # before the end of the HTTP message): the SDK would call it done, HTTP would not.
    saw_terminal: bool = False
    # Meant to hang up mid-stream, but the whole stream had arrived by then.
    late_hang_up: bool = False
    error: str = ""
    # Sent with a customer (billing books it) or without (it goes to reconciliation).
    attributed: bool = True


class Load:
    """Tagged requests through the official SDKs, `concurrency` at a time, until `target` of
    them completed (or were aborted on purpose). Requests that fail (the meter is down or
    shutting down) do not count towards the target; the worker pauses briefly and goes on."""

    def __init__(
        self,
        meter_url: str,
        prefix: str,
        target: int,
        *,
        concurrency: int,
        delay_ms: int,
        abort_every: int = 0,
        min_seconds: float = 0.0,
    ) -> None:
        self.prefix = prefix
        self.target = target
        self.concurrency = concurrency
        self.delay_ms = delay_ms
        self.abort_every = abort_every
        self.min_seconds = min_seconds
        self.records: dict[str, Record] = {}
        # Called (synchronously) the moment a request completed at the client.
        self.on_complete: Callable[[Record], None] | None = None
        self.finished = 0  # completed + aborted
        self.started_at = 0.0
        self.ended_at = 0.0
        self._next = 0
        self._streams = 0
        # At most this many requests are sent: a meter that never comes back must not keep
        # the harness spinning on failures.
        self._max_sent = target * 4 + 1000
        timeout = 60.0
        self._openai = openai.AsyncOpenAI(
            base_url=f"{meter_url}/v1", api_key=API_KEY, max_retries=0, timeout=timeout
        )
        self._anthropic = anthropic.AsyncAnthropic(
            base_url=meter_url, api_key=API_KEY, max_retries=0, timeout=timeout
        )

    @property
    def done(self) -> bool:
        return self.finished >= self.target or self._next >= self._max_sent

    @property
    def progress(self) -> float:
        return self.finished / self.target

    def count(self, state: State) -> int:
        return sum(1 for r in self.records.values() if r.state == state)

    def in_flight(self) -> list[Record]:
        return [r for r in self.records.values() if r.state == "running"]

    async def until(self, fraction: float) -> None:
        """Return once that fraction of the target finished (or the load ended)."""
        while self.progress < fraction and not self.done:
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))
        finally:
            self.ended_at = time.monotonic()
            await self._openai.close()
            await self._anthropic.close()

    async def _worker(self) -> None:
        # Pacing: the target is spread over at least min_seconds, so that a fault of a given
        # length lands in the middle of the load rather than after it.
        interval = self.min_seconds / self.target if self.min_seconds else 0.0
        while not self.done:
            wait = self.started_at + self.finished * interval - time.monotonic()
            if interval and wait > 0:
                await asyncio.sleep(min(wait, 0.25))
                continue
            index = self._next
            self._next += 1
            record = await self._one(index)
            if record.state == "failed":
                # The meter is down or shutting down: do not spin on refused connections.
                await asyncio.sleep(0.2)

    async def _one(self, index: int) -> Record:
        shape, stream = MIX[index % len(MIX)]
        tag = f"{self.prefix}-{index:06d}"
        attributed = index % UNATTRIBUTED_EVERY != UNATTRIBUTED_EVERY - 1
        record = self.records[tag] = Record(
            tag, shape, stream, time.monotonic(), attributed=attributed
        )
        abort = False
        if stream:
            self._streams += 1
            abort = bool(self.abort_every) and self._streams % self.abort_every == 0
        headers = {
            "x-request-id": tag,
            "x-tenant-id": "t_chaos",
            "x-demo-chunk-size": str(CHUNK_SIZE),
            "x-demo-delay-ms": str(self.delay_ms),
        }
        if attributed:
            headers["x-customer-id"] = f"cus_{self.prefix}"
        body = bytearray()
        try:
            async with self._request(shape, stream, headers) as response:
                async for chunk in response.iter_bytes():
                    body += chunk
                    if abort and len(body) >= ABORT_AFTER_BYTES:
                        if TERMINAL[shape] not in body:
                            break
                        # The whole stream is already here: too late to hang up mid-stream.
                        abort, record.late_hang_up = False, True
            if stream:
                record.saw_terminal = TERMINAL[shape] in body
            if abort:
                # Leaving the block closed the connection mid-stream: the meter sees the
                # client go away and must bill it once (client_aborted, unless the proxy had
                # sent the rest before it noticed).
                record.state = "aborted"
            elif stream and not record.saw_terminal:
                record.state, record.error = "failed", "stream ended without its last event"
            elif not stream and "usage" not in json.loads(body):
                record.state, record.error = "failed", "answer without usage"
            else:
                record.state = "completed"
        except Exception as exc:
            record.state = "failed"
            record.error = f"{type(exc).__name__}: {exc}"[:200]
            if stream:
                record.saw_terminal = TERMINAL[shape] in body
        record.ended = time.monotonic()
        if record.state in ("completed", "aborted"):
            self.finished += 1
        if record.state == "completed" and self.on_complete is not None:
            self.on_complete(record)
        return record

    def _request(
        self, shape: str, stream: bool, headers: dict[str, str]
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """The SDK call for one shape, as a raw streaming response: the harness reads the body
        to its end itself, because the SDKs stop caring once they saw the last event."""
        if shape == "chat":
            return self._openai.chat.completions.with_streaming_response.create(
                model="demo-chat", messages=CHAT, stream=stream, extra_headers=headers
            )
        if shape == "responses":
            return self._openai.responses.with_streaming_response.create(
                model="demo-chat",
                input="count the envelopes please",
                stream=stream,
                extra_headers=headers,
            )
        return self._anthropic.messages.with_streaming_response.create(
            model="claude-demo",
            max_tokens=64,
            messages=CHAT,
            stream=stream,
            extra_headers=headers,
        )


# --- the rig: brokers, taps, the meter ------------------------------------------------------


def spool_depth(spool_dir: Path) -> int:
    """Envelopes in one spool, read from its SQLite file (safe while the meter runs)."""
    db = spool_dir / "cache.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.execute("PRAGMA query_only = ON")
        return int(conn.execute("SELECT COUNT(*) FROM Cache").fetchone()[0])
    finally:
        conn.close()


def spools_depth(root: Path) -> int:
    """Envelopes in every spool under a meter_spool_dir: a single meter's, each worker's."""
    return sum(spool_depth(directory) for directory in spool_dirs(root))


async def _quiet(*_: object) -> None:
    """nats-py callbacks that say nothing: the harness reports what matters itself."""


@contextlib.asynccontextmanager
async def _connect(urls: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(
        urls.split(","),
        allow_reconnect=False,
        connect_timeout=3,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        closed_cb=_quiet,
    )
    try:
        yield nc
    finally:
        await nc.close()


class Rig:
    """Everything one scenario runs against: a broker (or cluster), a tap in front of each
    node (the meter talks to the taps), and one meter on its own spool."""

    def __init__(
        self,
        work_dir: Path,
        demo: DemoProcess,
        confdir: Path,
        cluster: bool,
        duplicate_window_s: float = 120.0,
        workers: int = 0,
    ) -> None:
        self.work_dir = work_dir
        self.demo = demo
        # 0: `mitmdump -s addons/meter.py`; N: `edgemeter serve --workers N`.
        self.workers = workers
        self.admin: GroupAdmin | None = None
        self.duplicate_window_s = duplicate_window_s
        self.cluster: NatsCluster | None = None
        if cluster:
            self.cluster = NatsCluster(work_dir / "cluster")
            self.brokers = self.cluster.nodes
        else:
            self.brokers = [
                NatsServer(store_dir=work_dir / "jetstream", log_path=work_dir / "nats.log")
            ]
        self.taps = [NatsTap(b.port) for b in self.brokers]
        if workers:
            lean = [sys.executable, "-m", "edgemeter.serve"]
            self.meters = MeterFactory(work_dir / "meters", confdir, lean, "group")
        else:
            self.meters = MeterFactory(work_dir / "meters", confdir)
        self._meter: MeterProxy | None = None

    @property
    def meter(self) -> MeterProxy:
        assert self._meter is not None
        return self._meter

    @property
    def broker_urls(self) -> str:
        """Direct URLs of the nodes that run now, comma-separated."""
        return ",".join(b.url for b in self.brokers if b.running)

    @property
    def broker_url(self) -> str:
        """A node that runs now: any node of a cluster answers for the stream."""
        return self.broker_urls.split(",")[0]

    async def up(self, *, stream: bool, meter_options: Sequence[str]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.start)
        else:
            await asyncio.to_thread(self.brokers[0].start)
        for tap in self.taps:
            await tap.start()
        if stream:
            await self.create_stream()
        nats_url = ",".join(tap.url for tap in self.taps)
        if not self.workers:
            self._meter = await asyncio.to_thread(
                self.meters.start, self.demo.url, nats_url, "flow_detail=0", *meter_options
            )
            return
        admin = self.admin = GroupAdmin(free_port())
        self._meter = await asyncio.to_thread(
            self.meters.start,
            self.demo.url,
            nats_url,
            f"meter_admin_listen=127.0.0.1:{admin.port}",
            *meter_options,
            extra=["--workers", str(self.workers)],
        )
        await asyncio.to_thread(admin.wait_serving, self.workers)

    async def create_stream(self) -> None:
        # A new cluster needs a few seconds to elect its meta leader before it takes streams.
        deadline = time.monotonic() + 60
        while True:
            try:
                await ensure_stream(
                    self.broker_url,
                    STREAM,
                    SUBJECTS,
                    duplicate_window_s=self.duplicate_window_s,
                    replicas=len(self.brokers),
                )
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def stream_info(self) -> Any:
        async with _connect(self.broker_urls) as nc:
            return await nc.jsm().stream_info(STREAM)

    async def stream_count(self) -> int | None:
        """Messages on the stream now; None while it is missing or unreachable."""
        try:
            return int((await self.stream_info()).state.messages)
        except Exception:
            return None

    async def depth(self) -> int:
        return await asyncio.to_thread(spools_depth, self.meter.spool_dir)

    async def down(self) -> None:
        await asyncio.to_thread(self.meters.stop_all)
        for tap in self.taps:
            await tap.stop()
        for broker in self.brokers:
            await asyncio.to_thread(broker.stop)


# --- scenarios --------------------------------------------------------------------------------


@dataclass
class Evidence:
    """What shows that a scenario's fault really hit the load (a fault that missed proves
    nothing): one line each, and whether it holds."""

    lines: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, text: str, ok: bool) -> None:
        self.lines.append((text, ok))


@dataclass(frozen=True)
class Config:
    requests: int = 2000
    concurrency: int = 24
    outage_s: float = 30.0
    kills: int = 3
    grace_ms: int = 10_000
    # The stream's duplicate window, and how long a SIGKILLed meter stays down: a restart
    # after the window shows the limit of broker-side dedupe (see docs/RELIABILITY.md).
    duplicate_window_s: float = 120.0
    restart_delay_s: float = 0.0
    # Pause between streamed chunks; None: each scenario's own.
    delay_ms: int | None = None


Inject = Callable[["Rig", "Load", "Evidence", "Config"], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    inject: Inject
    cluster: bool = False
    stream_at_start: bool = True
    meter_options: tuple[str, ...] = ()
    delay_ms: int = 15  # between streamed chunks
    abort_every: int = 0
    min_seconds: Callable[[Config], float] = lambda config: 0.0
    # The meter under test: 0 `mitmdump -s addons/meter.py`, N `edgemeter serve --workers N`.
    workers: int = 0


def _fractions(count: int, first: float = 0.15, last: float = 0.8) -> list[float]:
    if count == 1:
        return [(first + last) / 2]
    return [first + (last - first) * i / (count - 1) for i in range(count)]


def _killer(meter: MeterProxy, killed: asyncio.Event) -> Callable[[Record], None]:
    """A completion callback that SIGKILLs the meter, once, without waiting for it."""
    proc = meter.proc
    assert proc is not None

    def kill_now(record: Record) -> None:
        if not killed.is_set():
            proc.kill()
            killed.set()

    return kill_now


async def meter_kill(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    residues, in_flight = [], []
    for fraction in _fractions(config.kills):
        await load.until(fraction)
        # The sharpest instant: right after a client got the last byte of a response. Its
        # envelope must be on disk by then (write-ahead), and cannot have been published yet.
        killed = asyncio.Event()
        load.on_complete = _killer(rig.meter, killed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(killed.wait(), 30)
        load.on_complete = None
        in_flight.append(len(load.in_flight()))
        await asyncio.to_thread(rig.meter.kill)
        # What the crash left in the spool: spooled and not yet deleted after an ack.
        residues.append(await rig.depth())
        await asyncio.sleep(config.restart_delay_s)
        await asyncio.to_thread(rig.meter.start)
    ev.check(f"requests in flight at each SIGKILL: {in_flight}", sum(in_flight) > 0)
    ev.check(
        f"envelopes left in the spool by each SIGKILL, published after the restart: {residues}",
        sum(residues) > 0,
    )


async def worker_kill(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    """SIGKILL one worker of the group at a time (each in turn) right after a client got the
    last byte of a response; the supervisor starts it again while the others serve on."""
    admin = rig.admin
    assert admin is not None

    async def back(index: int, victim: int, completed: int) -> tuple[bool, int]:
        """Once worker `index` serves again: whether it did, and the requests that completed
        at the client meanwhile."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = (await asyncio.to_thread(admin.workers)).get(index)
            if state and state.pid not in (None, victim) and state.state.startswith("ready"):
                return True, load.count("completed") - completed
            await asyncio.sleep(0.1)
        return False, load.count("completed") - completed

    in_flight, residues = [], []
    returns: dict[int, asyncio.Future[tuple[bool, int]]] = {}
    every: list[asyncio.Future[tuple[bool, int]]] = []
    for number, fraction in enumerate(_fractions(config.kills)):
        await load.until(fraction)
        index = number % rig.workers
        if index in returns:
            await returns[index]  # killed before: it serves again first
        victim = (await asyncio.to_thread(admin.workers))[index].pid
        assert victim is not None
        killed = asyncio.Event()

        def kill_now(record: Record, pid: int = victim, done: asyncio.Event = killed) -> None:
            if not done.is_set():
                os.kill(pid, signal.SIGKILL)
                done.set()

        load.on_complete = kill_now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(killed.wait(), 30)
        load.on_complete = None
        in_flight.append(len(load.in_flight()))
        # What the crash left in the worker's spool: spooled, not yet deleted after an ack.
        spool = own_spool_dir(rig.meter.spool_dir, index)
        residues.append(await asyncio.to_thread(spool_depth, spool))
        returns[index] = asyncio.ensure_future(back(index, victim, load.count("completed")))
        every.append(returns[index])
    outcomes = await asyncio.gather(*every)
    ev.check(f"requests in flight at each SIGKILL of a worker: {in_flight}", sum(in_flight) > 0)
    ev.check(
        f"envelopes left in the killed worker's spool, published after: {residues}",
        sum(residues) > 0,
    )
    meanwhile = [served for _, served in outcomes]
    ev.check(
        f"requests completed at the client until the killed worker served again: {meanwhile}",
        sum(meanwhile) > 0,
    )
    restarted = [ok for ok, _ in outcomes]
    ev.check(f"each killed worker started again by the supervisor: {restarted}", all(restarted))


async def broker_outage(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    await load.until(0.25)
    broker = rig.brokers[0]
    before = load.count("completed")
    await asyncio.to_thread(broker.stop)
    peak = 0
    stopped = time.monotonic()
    while (left := config.outage_s - (time.monotonic() - stopped)) > 0:
        peak = max(peak, await rig.depth())
        await asyncio.sleep(min(0.5, left))
    during = load.count("completed") - before
    await asyncio.to_thread(broker.start)
    ev.check(f"broker stopped for {config.outage_s:g} s while the load ran", not load.done)
    ev.check(f"requests completed at the client during the outage: {during}", during > 0)
    ev.check(f"spool depth peaked at {peak} during the outage", peak > 0)


async def broker_kill(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    await load.until(0.3)
    broker = rig.brokers[0]
    stored = await rig.stream_count() or 0
    before = load.count("completed")
    await asyncio.to_thread(broker.stop, True)
    down_s = min(5.0, config.outage_s)
    peak = 0
    killed = time.monotonic()
    while (left := down_s - (time.monotonic() - killed)) > 0:
        peak = max(peak, await rig.depth())
        await asyncio.sleep(min(0.5, left))
    during = load.count("completed") - before
    await asyncio.to_thread(broker.start)
    kept = await rig.stream_count() or 0
    ev.check(
        f"broker SIGKILLed with {stored} messages stored, {kept} after restart", kept >= stored
    )
    ev.check(f"requests completed at the client while it was down: {during}", during > 0)
    ev.check(f"spool depth peaked at {peak} while it was down", peak > 0)


async def leader_kill(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    assert rig.cluster is not None
    await load.until(0.3)
    info = await rig.stream_info()
    leader = info.cluster.leader
    replicas = info.config.num_replicas
    node = rig.cluster.node(leader)
    before = load.count("completed")
    await asyncio.to_thread(node.stop, True)
    killed = time.monotonic()
    new_leader = ""
    while time.monotonic() - killed < 60:
        with contextlib.suppress(Exception):
            new_leader = (await rig.stream_info()).cluster.leader or ""
            if new_leader and new_leader != leader:
                break
        await asyncio.sleep(0.2)
    elected_s = time.monotonic() - killed
    await load.until(0.65)
    during = load.count("completed") - before
    await asyncio.to_thread(node.start)
    ev.check(f"R{replicas} stream; SIGKILLed its leader {leader} mid-load", replicas == 3)
    ev.check(
        f"{new_leader or 'no node'} took over as leader after {elected_s:.1f} s",
        bool(new_leader) and new_leader != leader,
    )
    ev.check(f"requests completed at the client without {leader}: {during}", during > 0)


async def stream_missing(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    missing = await rig.stream_count() is None
    await load.until(0.4)
    waiting = await rig.depth()
    await rig.create_stream()
    ev.check("no stream bound to the subject when the load started", missing)
    ev.check(f"envelopes waiting in the spool when the stream was created: {waiting}", waiting > 0)


async def slow_broker(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    await load.until(0.2)
    for tap in rig.taps:
        tap.delay_s = 1.5
    slowed = time.monotonic()
    await load.until(0.5)
    for tap in rig.taps:
        tap.delay_s = 0.0
    republished = sum(tap.republished for tap in rig.taps)
    ev.check(
        f"broker's bytes held back 1.5 s (ack timeout 0.5 s) for {time.monotonic() - slowed:.0f} s",
        not load.done,
    )
    ev.check(f"publishes repeated with the same Nats-Msg-Id so far: {republished}", republished > 0)


async def client_abort(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    while not load.done or load.in_flight():
        await asyncio.sleep(0.05)
    late = sum(1 for r in load.records.values() if r.late_hang_up)
    ev.check(
        f"streams the client hung up on mid-stream: {load.count('aborted')} "
        f"(too late to hang up, read to the end: {late})",
        load.count("aborted") > 0,
    )


async def sigterm(rig: Rig, load: Load, ev: Evidence, config: Config) -> None:
    streams_in_flight: list[Record] = []
    stops = []
    for fraction in _fractions(config.kills, 0.2, 0.75):
        await load.until(fraction)
        streams_in_flight += [r for r in load.in_flight() if r.stream]
        sent = time.monotonic()
        code = await asyncio.to_thread(rig.meter.stop, config.grace_ms / 1000 + 30)
        stops.append((code, time.monotonic() - sent, await rig.depth()))
        await asyncio.to_thread(rig.meter.start)
    finished = sum(1 for r in streams_in_flight if r.state == "completed")
    ev.check(
        f"streams in flight at the {len(stops)} SIGTERMs: {len(streams_in_flight)}, "
        f"finished at the client: {finished}",
        finished > 0,
    )
    ev.check(
        "exit codes and seconds to exit: "
        + ", ".join(f"{code} in {took:.1f} s" for code, took, _ in stops),
        all(code == 0 for code, _, _ in stops),
    )
    left = [depth for _, _, depth in stops]
    ev.check(f"envelopes left in the spool by each final drain: {left}", not any(left))


def _outage_load_s(config: Config) -> float:
    # The outage starts at a quarter of the load and must end before the load does.
    return config.outage_s * 2.5


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("meter-kill", "meter SIGKILLed mid-load, restarted on its spool", meter_kill),
        Scenario(
            "worker-kill",
            "one of 2 workers (edgemeter serve --workers 2) SIGKILLed mid-load, in turn",
            worker_kill,
            workers=2,
        ),
        Scenario(
            "broker-outage",
            "broker stopped, restarted after --outage-s",
            broker_outage,
            min_seconds=_outage_load_s,
        ),
        Scenario(
            "broker-kill",
            "broker SIGKILLed (file storage), restarted",
            broker_kill,
            min_seconds=lambda config: 15.0,
        ),
        Scenario(
            "leader-kill",
            "3-node cluster, R3 stream, its leader SIGKILLed",
            leader_kill,
            cluster=True,
        ),
        Scenario(
            "stream-missing",
            "no stream at start, created mid-load",
            stream_missing,
            stream_at_start=False,
        ),
        Scenario(
            "slow-broker",
            "acks delayed past the publish timeout",
            slow_broker,
            meter_options=("meter_publish_timeout_ms=500",),
            min_seconds=lambda config: 20.0,
        ),
        Scenario(
            "client-abort",
            "every 3rd stream hung up by its client",
            client_abort,
            delay_ms=50,
            abort_every=3,
        ),
        Scenario(
            "sigterm",
            "meter SIGTERMed with streams in flight, restarted",
            sigterm,
            delay_ms=60,
        ),
    )
}


# --- counting -------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    fault: str
    sent: int
    completed: int
    failed: int
    aborted: int
    envelopes: int
    lost: list[str]
    duplicated: list[str]
    # Envelopes on the unbillable subject (requests sent without a customer), and the tags on
    # the wrong subject: unattributed on the billing one, attributed on the unbillable one, or
    # on the billing subject but not booked by the model of the billing consumer.
    unbillable: int
    misrouted: list[str]
    # Aborted on purpose but not billed exactly once (see BILLED_ONCE_ABORTED).
    aborted_wrong: list[str]
    # Envelope outcomes of the requests aborted on purpose ("client_aborted" for each, or
    # "none", "complete", "client_aborted+client_aborted", ...).
    aborted_outcomes: Counter[str]
    # Completed at the client but billed with another outcome than complete.
    completed_wrong: list[str]
    # Envelopes whose tag the load never sent.
    strangers: int
    # Failed requests that reached their last event before the body was cut, and how many of
    # those have an envelope.
    cut_after_last_event: int
    cut_after_last_event_billed: int
    failed_billed: int
    left_spooled: int
    republished: int
    duplicate_acks: int
    seconds: float
    evidence: list[tuple[str, bool]]
    errors: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting them.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"ok": self.ok, "exercised": self.exercised}

    @property
    def exercised(self) -> bool:
        return all(ok for _, ok in self.evidence)

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and not self.misrouted
            and not self.aborted_wrong
            and not self.completed_wrong
            and self.strangers == 0
            and self.left_spooled == 0
            and self.exercised
        )


def count(
    records: Mapping[str, Record],
    messages: Sequence[tuple[str, dict[str, str] | None, bytes]],
) -> dict[str, Any]:
    """Envelopes per tag (client_request_id) across both subjects against what the client
    saw: the lost, the duplicated, the misrouted and the misbilled. `messages` are (subject,
    headers, payload). Returns the counting fields of a Result."""
    per_tag: dict[str, list[dict[str, Any]]] = {}
    strangers = unbillable = 0
    misrouted: set[str] = set()
    for subject, headers, data in messages:
        envelope = json.loads(data)
        meta = envelope.get("metadata", {})
        tag = meta.get("client_request_id", "")
        if tag not in records or (headers or {}).get("Nats-Msg-Id") != meta.get("request_id"):
            strangers += 1
            continue
        per_tag.setdefault(tag, []).append(meta)
        if subject == UNBILLABLE_SUBJECT:
            unbillable += 1
        expected = BILLING_SUBJECT if records[tag].attributed else UNBILLABLE_SUBJECT
        if subject != expected or (subject == BILLING_SUBJECT and consume(data)[0] != "book"):
            misrouted.add(tag)
    completed = [r for r in records.values() if r.state == "completed"]
    aborted = [r for r in records.values() if r.state == "aborted"]
    failed = [r for r in records.values() if r.state == "failed"]
    cut = [r for r in failed if r.saw_terminal]
    errors: Counter[str] = Counter(r.error.split(":", 1)[0] for r in failed)
    return {
        "sent": len(records),
        "completed": len(completed),
        "failed": len(failed),
        "aborted": len(aborted),
        "envelopes": sum(len(v) for v in per_tag.values()),
        "lost": sorted(r.tag for r in completed if r.tag not in per_tag),
        "duplicated": sorted(tag for tag, found in per_tag.items() if len(found) > 1),
        "unbillable": unbillable,
        "misrouted": sorted(misrouted),
        "aborted_wrong": sorted(
            r.tag
            for r in aborted
            if [m.get("outcome") for m in per_tag.get(r.tag, [])] not in BILLED_ONCE_ABORTED
        ),
        "completed_wrong": sorted(
            r.tag
            for r in completed
            if any(m.get("outcome") != "complete" for m in per_tag.get(r.tag, []))
        ),
        "aborted_outcomes": Counter(
            "+".join(m.get("outcome", "?") for m in per_tag.get(r.tag, [])) or "none"
            for r in aborted
        ),
        "strangers": strangers,
        "cut_after_last_event": len(cut),
        "cut_after_last_event_billed": sum(1 for r in cut if r.tag in per_tag),
        "failed_billed": sum(1 for r in failed if r.tag in per_tag),
        "errors": errors,
    }


async def drain(rig: Rig, timeout: float = 180.0) -> bool:
    """Wait until the meter's spool is empty and the stream stopped growing; False if that
    did not happen within the timeout (what is left then shows as left in the spool)."""
    deadline = time.monotonic() + timeout
    last: int | None = -1
    while time.monotonic() < deadline:
        depth = await rig.depth()
        now = await rig.stream_count()
        if depth == 0 and now is not None and now == last:
            return True
        last = now
        await asyncio.sleep(1.0)
    return False


async def run_scenario(
    scenario: Scenario, config: Config, work_dir: Path, demo: DemoProcess, confdir: Path
) -> Result:
    started = time.monotonic()
    rig = Rig(
        work_dir / scenario.name,
        demo,
        confdir,
        scenario.cluster,
        config.duplicate_window_s,
        scenario.workers,
    )
    options = (f"meter_shutdown_grace_ms={config.grace_ms}", *scenario.meter_options)
    evidence = Evidence()
    try:
        await rig.up(stream=scenario.stream_at_start, meter_options=options)
        load = Load(
            rig.meter.url,
            scenario.name,
            config.requests,
            concurrency=config.concurrency,
            delay_ms=scenario.delay_ms if config.delay_ms is None else config.delay_ms,
            abort_every=scenario.abort_every,
            min_seconds=scenario.min_seconds(config),
        )
        running = asyncio.ensure_future(load.run())
        try:
            await scenario.inject(rig, load, evidence, config)
            await running
        finally:
            if not running.done():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        evidence.check(
            f"load reached {load.finished} of {config.requests} requests",
            load.finished >= config.requests,
        )
        drained_at = time.monotonic()
        drained = await drain(rig)
        evidence.check(
            f"spool drained {time.monotonic() - drained_at:.0f} s after the load ended", drained
        )
        code = await asyncio.to_thread(rig.meter.stop, config.grace_ms / 1000 + 30)
        evidence.check(f"meter exit code after the final SIGTERM: {code}", code == 0)
        left = await rig.depth()
        messages = await messages_by_subject(rig.broker_url)
        tally = count(load.records, messages)
        return Result(
            scenario=scenario.name,
            fault=scenario.fault,
            left_spooled=left,
            republished=sum(tap.republished for tap in rig.taps),
            duplicate_acks=sum(tap.duplicate_acks for tap in rig.taps),
            seconds=time.monotonic() - started,
            evidence=evidence.lines,
            **tally,
        )
    finally:
        await rig.down()


async def messages_by_subject(url: str) -> list[tuple[str, dict[str, str] | None, bytes]]:
    """Every message on the stream, in sequence order, as (subject, headers, payload)."""
    async with _connect(url) as nc:
        jsm = nc.jsm()
        state = (await jsm.stream_info(STREAM)).state
        if not state.messages:
            return []
        limit = asyncio.Semaphore(64)

        async def get(seq: int) -> tuple[str, dict[str, str] | None, bytes] | None:
            async with limit:
                try:
                    msg = await jsm.get_msg(STREAM, seq)
                except nats.js.errors.NotFoundError:
                    return None  # deleted or purged sequence
            return msg.subject or "", msg.headers, msg.data or b""

        found = await asyncio.gather(
            *(get(seq) for seq in range(state.first_seq, state.last_seq + 1))
        )
        return [m for m in found if m is not None]


def crashed(scenario: Scenario, exc: BaseException, seconds: float) -> Result:
    """The row of a scenario that could not run to its count: failed, with the reason."""
    what = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    return Result(
        scenario=scenario.name,
        fault=scenario.fault,
        sent=0,
        completed=0,
        failed=0,
        aborted=0,
        envelopes=0,
        lost=[],
        duplicated=[],
        unbillable=0,
        misrouted=[],
        aborted_wrong=[],
        aborted_outcomes=Counter(),
        completed_wrong=[],
        strangers=0,
        cut_after_last_event=0,
        cut_after_last_event_billed=0,
        failed_billed=0,
        left_spooled=0,
        republished=0,
        duplicate_acks=0,
        seconds=seconds,
        evidence=[(f"the scenario did not finish: {what}"[:300], False)],
    )


# --- reporting --------------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "fault",
    "sent",
    "completed",
    "failed",
    "aborted",
    "aborted, billed once",
    "lost",
    "duplicated",
    "to reconciliation",
    "misrouted",
    "retries deduped",
    "s",
)


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (what docs/RELIABILITY.md shows)."""
    rows = [
        (
            r.scenario,
            r.fault,
            str(r.sent),
            str(r.completed),
            str(r.failed),
            str(r.aborted),
            str(r.aborted - len(r.aborted_wrong)),
            str(len(r.lost)),
            str(len(r.duplicated)),
            str(r.unbillable),
            str(len(r.misrouted)),
            str(r.duplicate_acks),
            f"{r.seconds:.0f}",
        )
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    numeric = [False, False] + [True] * (len(COLUMNS) - 2)

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if num else "-" * (w + 2)
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(COLUMNS), rule, *(line(row) for row in rows)])


def details(result: Result) -> str:
    out = [f"{result.scenario}: {'OK' if result.ok else 'FAILED'}"]
    for text, ok in result.evidence:
        out.append(f"  {'✓' if ok else '✗'} {text}")
    aborted_ok = result.aborted - len(result.aborted_wrong)
    if result.aborted:
        outcomes = ", ".join(f"{o} x{n}" for o, n in result.aborted_outcomes.most_common())
        out.append(
            f"  aborted on purpose and billed exactly once: {aborted_ok} (envelopes: {outcomes})"
        )
    out.append(
        f"  failed at the client: {result.failed} (of which billed: {result.failed_billed}; "
        f"cut after their last event: {result.cut_after_last_event}, billed "
        f"{result.cut_after_last_event_billed})"
    )
    if result.errors:
        common = ", ".join(f"{name} x{n}" for name, n in result.errors.most_common(4))
        out.append(f"  client errors: {common}")
    out.append(
        f"  envelopes on the stream: {result.envelopes} ({result.envelopes - result.unbillable} "
        f"on {BILLING_SUBJECT}, {result.unbillable} on {UNBILLABLE_SUBJECT}); publishes "
        f"repeated on the wire: {result.republished}; acks the broker marked duplicate: "
        f"{result.duplicate_acks}"
    )
    for label, tags in (
        ("LOST", result.lost),
        ("DUPLICATED", result.duplicated),
        ("MISROUTED", result.misrouted),
        ("ABORTED BUT NOT BILLED EXACTLY ONCE", result.aborted_wrong),
        ("COMPLETED BUT NOT BILLED complete", result.completed_wrong),
    ):
        if tags:
            out.append(f"  {label}: {len(tags)}: {', '.join(tags[:10])}")
    if result.strangers:
        out.append(f"  ENVELOPES NOBODY SENT: {result.strangers}")
    if result.left_spooled:
        out.append(f"  LEFT IN THE SPOOL AFTER THE FINAL DRAIN: {result.left_spooled}")
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------


async def run(
    names: Sequence[str],
    config: Config,
    work_dir: Path,
    on_result: Callable[[Result], None] = lambda result: None,
) -> list[Result]:
    """Run the named scenarios one after the other against one demo upstream."""
    work_dir.mkdir(parents=True, exist_ok=True)
    demo = DemoProcess(work_dir / "demo.log", chunk_size=CHUNK_SIZE)
    await asyncio.to_thread(demo.start)
    results = []
    try:
        for name in names:
            scenario = SCENARIOS[name]
            started = time.monotonic()
            try:
                async with asyncio.timeout(SCENARIO_TIMEOUT_S):
                    result = await run_scenario(
                        scenario, config, work_dir, demo, work_dir / "mitmproxy-conf"
                    )
            except Exception as exc:
                result = crashed(scenario, exc, time.monotonic() - started)
            on_result(result)
            results.append(result)
    finally:
        await asyncio.to_thread(demo.stop)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description="Prove SPEC §5 under faults: envelopes per request on the stream, counted.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which scenarios to run (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests each scenario completes (2000)"
    )
    parser.add_argument("--concurrency", type=int, default=24, help="requests at a time (24)")
    parser.add_argument(
        "--outage-s", type=float, default=30.0, help="how long the broker stays stopped (30)"
    )
    parser.add_argument(
        "--kills", type=int, default=3, help="SIGKILLs / SIGTERMs of the meter per scenario (3)"
    )
    parser.add_argument(
        "--grace-ms", type=int, default=10_000, help="meter_shutdown_grace_ms (10000)"
    )
    parser.add_argument(
        "--duplicate-window-s",
        type=float,
        default=120.0,
        help="the stream's duplicate window (120, the server's default)",
    )
    parser.add_argument(
        "--restart-delay-s",
        type=float,
        default=0.0,
        help="meter-kill: how long the killed meter stays down (0); past the duplicate window, "
        "envelopes acked but not yet deleted at the kill land twice",
    )
    parser.add_argument(
        "--delay-ms",
        type=int,
        help="pause of the upstream between streamed chunks (default: each scenario's own)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--work-dir", type=Path, help="where logs, spools and stores go (default: a temp dir)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work dir (it is kept anyway on a failure)"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.requests < 1 or args.concurrency < 1 or args.kills < 1 or args.outage_s <= 0:
        parser.error("--requests, --concurrency and --kills must be >= 1, --outage-s > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    config = Config(
        requests=args.requests,
        concurrency=args.concurrency,
        outage_s=args.outage_s,
        kills=args.kills,
        grace_ms=args.grace_ms,
        duplicate_window_s=args.duplicate_window_s,
        restart_delay_s=args.restart_delay_s,
        delay_ms=args.delay_ms,
    )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgemeter-chaos-"))
    print(
        f"edgemeter chaos: {', '.join(names)}; {config.requests} requests each, "
        f"{config.concurrency} at a time; work dir {work_dir}",
        flush=True,
    )

    def show(result: Result) -> None:
        print(details(result), flush=True)

    started = datetime.now(UTC)
    results = asyncio.run(run(names, config, work_dir, show))
    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC, {time.time() - started.timestamp():.0f} s")
    print(table(results))
    ok = all(r.ok for r in results)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started.isoformat(),
                    "config": asdict(config),
                    "results": [r.as_json() for r in results],
                },
                indent=2,
            )
        )
    if ok and not args.keep and args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    elif not ok:
        print(f"logs, spools and stores kept in {work_dir}")
    print("all scenarios: 0 lost, 0 duplicated, 0 misrouted" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
