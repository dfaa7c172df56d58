"""`edgemeter status`: the spool, the dead letters, the broker and its stream, whether a named
durable consumer (the billing one) keeps up, and what needs attention.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js.manager import JetStreamManager
from rich.console import Console
from rich.table import Table

from edgemeter.cli.broker import (
    add_unbillable_subject,
    broker_config,
    connect,
    nats_options,
    unbillable_subject,
)
from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
    age,
    size,
)
from edgemeter.cli.spooldir import CAN_TELL_IN_USE, in_use_by, spool_options
from edgemeter.errors import MeterError
from edgemeter.ids import uuid7_ms
from edgemeter.settings import (
    default_spool_dir,
)
from spool.deadletter import DeadLetters
from spool.errors import SpoolError, describe
from spool.publisher import NatsConfig, redact_url
from spool.store import Spool


@dataclass
class SpoolState:
    path: str
    exists: bool = False
    envelopes: int = 0
    bytes: int = 0
    disk_bytes: int = 0
    oldest_key: str | None = None
    oldest_age_s: float | None = None
    dead_letters: int = 0
    # A process that has the spool open now (the meter); None: none seen.
    in_use_by: int | None = None
    error: str = ""


@dataclass
class ConsumerState:
    """A durable consumer on the stream, as JetStream reports it: how far behind it is."""

    name: str
    found: bool = False
    # Messages on its subjects not delivered to it yet, and delivered but not acknowledged.
    pending: int | None = None
    ack_pending: int | None = None
    redelivered: int | None = None
    # Seconds since it was last delivered a message; None: never.
    last_delivery_age_s: float | None = None
    filter_subjects: list[str] = field(default_factory=list)
    # Whether its filter takes the meter's subject (no filter takes every subject).
    reads_subject: bool | None = None
    error: str = ""


@dataclass
class BrokerState:
    servers: list[str]
    subject: str
    reachable: bool = False
    server: str = ""
    version: str = ""
    stream: str | None = None
    messages: int | None = None
    stream_bytes: int | None = None
    duplicate_window_s: float | None = None
    error: str = ""
    consumer: ConsumerState | None = None
    # The envelopes sent to reconciliation: on the stream bound to the unbillable subject (None:
    # not known), and the latest one's reason and age.
    unbillable_subject: str = ""
    unbillable_stream: str | None = None
    unbillable: int | None = None
    last_unbillable_reason: str = ""
    last_unbillable_age_s: float | None = None


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject filter (`*` one token, `>` the rest) takes a subject."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


async def consumer_state(
    jsm: JetStreamManager, stream: str, name: str, subject: str
) -> ConsumerState:
    """The durable consumer `name` on the stream; found=False (with why) when it is not."""
    state = ConsumerState(name)
    try:
        info = await jsm.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        state.error = f"no consumer {name!r} on stream {stream}"
        return state
    except ValueError as exc:  # nats-py refuses names with '.', ' ', '*' or '>'
        state.error = f"not a consumer name: {exc}"
        return state
    state.found = True
    state.pending = info.num_pending
    state.ack_pending = info.num_ack_pending
    state.redelivered = info.num_redelivered
    last = info.delivered.last_active if info.delivered is not None else None
    if last is not None:
        age = (datetime.now(UTC) - last.astimezone(UTC)).total_seconds()
        state.last_delivery_age_s = round(max(age, 0.0), 3)
    config = info.config
    state.filter_subjects = [
        *([config.filter_subject] if config.filter_subject else []),
        *(config.filter_subjects or []),
    ]
    state.reads_subject = not state.filter_subjects or any(
        subject_matches(f, subject) for f in state.filter_subjects
    )
    return state


def spool_state(directory: Path, now: float) -> SpoolState:
    """What the spool holds; a missing spool is reported and never created."""
    state = SpoolState(str(directory))
    if not (directory / "cache.db").is_file():
        state.error = "no spool here (give --spool-dir or set EDGEMETER_SPOOL_DIR)"
        return state
    state.exists = True
    state.in_use_by = in_use_by(directory)  # asked before this process opens it (see in_use_by)
    # Reading only: Spool.open starts its writer thread, which writes nothing unless asked.
    spool = Spool(directory)
    try:
        spool.open()
        state.envelopes = len(spool)
        state.bytes = spool.held_bytes
        state.disk_bytes = spool.volume()
        state.oldest_key = spool.oldest_key()
    except SpoolError as exc:
        state.error = str(exc)
        return state
    finally:
        spool.close()
    minted = uuid7_ms(state.oldest_key) if state.oldest_key else None
    if minted is not None:
        state.oldest_age_s = round(max(now - minted / 1000, 0.0), 3)
    with DeadLetters.of(directory) as dead:
        try:
            state.dead_letters = len(dead)
        except SpoolError as exc:
            state.error = f"cannot read the dead-letter area: {exc}"
    return state


async def broker_state(
    config: NatsConfig, timeout: float, consumer: str | None = None, unbillable_subject: str = ""
) -> BrokerState:
    """Whether the broker answers, the stream bound to the subject, the named durable `consumer`
    on it and the envelopes on the unbillable subject; never raises for a broker that is down
    or has no such stream."""
    state = BrokerState([redact_url(s) for s in config.servers], config.subject)
    state.unbillable_subject = unbillable_subject
    try:
        nc = await connect(config, timeout)
    except (MeterError, SpoolError) as exc:
        state.error = str(exc)
        return state
    try:
        state.reachable = True
        url = nc.connected_url
        state.server = redact_url(url.geturl()) if url is not None else ""
        version = nc.connected_server_version
        with contextlib.suppress(ValueError):  # not semver: the version stays unknown
            state.version = f"{version.major}.{version.minor}.{version.patch}"
        jsm = nc.jsm(timeout=timeout)
        try:
            state.stream = await jsm.find_stream_name_by_subject(config.subject)
        except nats.js.errors.NotFoundError:
            state.error = f"no stream is bound to subject {config.subject!r}"
            return state
        info = await jsm.stream_info(state.stream)
        state.messages = info.state.messages
        state.stream_bytes = info.state.bytes
        state.duplicate_window_s = info.config.duplicate_window
        if consumer is not None:
            state.consumer = await consumer_state(jsm, state.stream, consumer, config.subject)
        if unbillable_subject:
            await _unbillable_state(jsm, state)
    except nats.errors.NoRespondersError:
        state.error = "JetStream is not enabled on this server"
    except (nats.errors.Error, TimeoutError) as exc:
        state.error = f"JetStream did not answer: {describe(exc)}"
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return state


async def _unbillable_state(jsm: JetStreamManager, state: BrokerState) -> None:
    """How many envelopes wait on the unbillable subject, and the latest one's reason."""
    subject = state.unbillable_subject
    try:
        stream = await jsm.find_stream_name_by_subject(subject)
    except nats.js.errors.NotFoundError:
        return
    state.unbillable_stream = stream
    info = await jsm.stream_info(stream, subjects_filter=subject)
    state.unbillable = (info.state.subjects or {}).get(subject, 0)
    if not state.unbillable:
        return
    last = await jsm.get_last_msg(stream, subject)
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        meta = json.loads(last.data or b"")["metadata"]
        state.last_unbillable_reason = str(meta.get("unbillable_reason", ""))
        ended = datetime.fromisoformat(str(meta["completed_at"]).replace("Z", "+00:00"))
        state.last_unbillable_age_s = round(max(time.time() - ended.timestamp(), 0.0), 3)


def problems(spool: SpoolState, broker: BrokerState) -> list[str]:
    """What an operator should look at; empty when healthy."""
    found = []
    if spool.error:
        found.append(f"spool: {spool.error}")
    if spool.dead_letters:
        found.append(
            f"{spool.dead_letters} dead letters wait for an operator (edgemeter dead list)"
        )
    if not broker.reachable:
        found.append(f"broker unreachable: {broker.error}")
    elif broker.stream is None:
        found.append(
            f"{broker.error or 'no stream'}: envelopes stay spooled until the billing consumer "
            "creates it"
        )
    elif broker.error:
        found.append(broker.error)
    else:
        if (consumer := broker.consumer) is not None:
            if not consumer.found:
                found.append(f"{consumer.error}: nothing books the envelopes there")
            elif not consumer.reads_subject:
                found.append(
                    f"consumer {consumer.name!r} does not read subject {broker.subject!r} "
                    f"(its filter: {', '.join(consumer.filter_subjects)})"
                )
        if broker.unbillable_subject and broker.unbillable_stream is None:
            found.append(
                f"no stream is bound to the unbillable subject {broker.unbillable_subject!r}: "
                "envelopes sent to reconciliation stay spooled"
            )
    return found


def status(args: argparse.Namespace, io: Io) -> int:
    config = broker_config(args)
    directory = args.spool_dir.expanduser() if args.spool_dir else default_spool_dir()
    spool = spool_state(directory, time.time())
    broker = asyncio.run(
        broker_state(config, args.connect_timeout, args.consumer, unbillable_subject(args))
    )
    found = problems(spool, broker)
    if args.json:
        report = {"healthy": not found, "problems": found, "spool": asdict(spool)}
        report["broker"] = asdict(broker)
        io.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_status(io.console, spool, broker, found)
    return EXIT_FAILED if found else EXIT_OK


def _print_status(
    console: Console, spool: SpoolState, broker: BrokerState, found: list[str]
) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("spool", spool.path)
    if spool.exists and not spool.error:
        held = (
            f"{spool.envelopes} envelopes ({size(spool.bytes)}; {size(spool.disk_bytes)} on disk)"
        )
        if spool.oldest_age_s is not None:
            held += f", oldest {age(spool.oldest_age_s)} old"
        grid.add_row("", held)
        grid.add_row("dead letters", str(spool.dead_letters))
        if spool.in_use_by is not None:
            grid.add_row("in use", f"by process {spool.in_use_by} (a running meter)")
        elif CAN_TELL_IN_USE:
            grid.add_row("in use", "no process on this host has it open")
    if broker.reachable:
        grid.add_row("broker", f"reachable at {broker.server} (nats-server {broker.version})")
    else:
        grid.add_row("broker", f"unreachable at {', '.join(broker.servers)}")
    grid.add_row("subject", broker.subject)
    if broker.stream is not None:
        window = "" if broker.duplicate_window_s is None else age(broker.duplicate_window_s)
        grid.add_row(
            "stream",
            f"{broker.stream}: {broker.messages} messages ({size(broker.stream_bytes or 0)}), "
            f"duplicate window {window}",
        )
    elif broker.reachable:
        grid.add_row("stream", "none")
    if (consumer := broker.consumer) is not None and consumer.found:
        seen = consumer.last_delivery_age_s
        grid.add_row(
            "consumer",
            f"{consumer.name}: {consumer.pending} pending, {consumer.ack_pending} awaiting ack, "
            f"{consumer.redelivered} redelivered; "
            + ("never delivered to" if seen is None else f"last delivery {age(seen)} ago"),
        )
    if broker.unbillable is not None:
        line = f"{broker.unbillable} on {broker.unbillable_subject} ({broker.unbillable_stream})"
        if broker.last_unbillable_age_s is not None:
            line += f", last {age(broker.last_unbillable_age_s)} ago"
            line += f" ({broker.last_unbillable_reason})" if broker.last_unbillable_reason else ""
        grid.add_row("unbillable", line)
    console.print(grid)
    if found:
        console.print("[bold red]needs attention[/]")
        for problem in found:
            console.print(f"  - {problem}", markup=False)
    else:
        console.print("[bold green]healthy[/]")


def add_status(commands: SubParsers) -> None:
    command = commands.add_parser(
        "status",
        parents=[spool_options(), nats_options()],
        help="spool depth and age, dead letters, broker and stream",
        description="""Report what a meter's spool holds (envelopes, bytes, the oldest one's
        age, dead letters, whether a meter has it open) and whether the broker answers, with
        the stream bound to the subject (messages, duplicate window), with --consumer whether
        that durable consumer keeps up (messages pending for it, delivered and awaiting its ack,
        redelivered, its last delivery), and the envelopes sent to reconciliation on the
        unbillable subject (how many, the latest one's age and reason). Reads only: a missing
        spool is reported, never created, and a running meter's spool is safe to read.""",
        epilog="""Exit codes: 0 healthy; 1 needs attention (spool missing or unreadable, dead
        letters, broker unreachable, no stream bound to the subject or to the unbillable
        subject, the --consumer missing or not reading the subject); 2 usage error.""",
    )
    add_unbillable_subject(command)
    command.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    command.add_argument(
        "--consumer",
        metavar="NAME",
        help="a durable consumer on the stream whose lag to show: the billing service's "
        "(the seed's is sme-billing-metering)",
    )
    command.set_defaults(run=status, parser=command)
