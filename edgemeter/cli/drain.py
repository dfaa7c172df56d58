"""`edgemeter drain`: publish a spool directory now, e.g. one a dead Pod left behind."""

from __future__ import annotations

import argparse
import asyncio

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from edgemeter.cli.broker import DEFAULT_PUBLISH_TIMEOUT_MS, broker_config, nats_options
from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
    log_to,
    seconds,
)
from edgemeter.cli.spooldir import CAN_TELL_IN_USE, existing_spool_dir, in_use_by, spool_options
from spool.deadletter import DeadLetters
from spool.lock import SpoolLock
from spool.publisher import Publisher
from spool.store import Spool


async def _drain(spool: Spool, publisher: Publisher, timeout: float, progress: Progress) -> int:
    total = await asyncio.to_thread(len, spool)
    task = progress.add_task("publishing", total=total, acked=0, left=total)
    stopping = asyncio.ensure_future(publisher.stop(drain_timeout=timeout))
    while not stopping.done():
        left = await asyncio.to_thread(len, spool)
        progress.update(task, completed=total - left, left=left, acked=publisher.stats.acked)
        await asyncio.wait([stopping], timeout=0.2)
    left = stopping.result()
    progress.update(task, completed=total - left, left=left, acked=publisher.stats.acked)
    return left


def drain(args: argparse.Namespace, io: Io) -> int:
    config = broker_config(args)
    directory = existing_spool_dir(args)
    holder = in_use_by(directory)
    if not CAN_TELL_IN_USE:
        io.say("cannot tell on this platform whether a running meter has this spool open")
    if holder is not None and not args.force:
        io.error(
            f"process {holder} has this spool open: a running meter publishes it by itself "
            "(--force drains it anyway; the broker drops what both publish twice)"
        )
        return EXIT_FAILED
    # The right to publish it: never two publishers of one spool (a meter adopting it, another
    # drain). --force goes without, as it goes past a meter that has the spool open.
    lock = None if args.force else SpoolLock(directory)
    if lock is not None and not lock.acquire_nowait():
        holder = lock.holder()
        who = f"process {holder}" if holder else "another process"
        io.error(f"{who} publishes this spool now (--force drains it anyway)")
        return EXIT_FAILED
    spool = Spool(directory)
    dead = DeadLetters.of(directory)
    publisher = Publisher(spool, config, dead, lock=lock)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[acked]} acked, {task.fields[left]} left"),
        TimeElapsedColumn(),
        console=io.err_console,
    )
    spool.open()
    try:
        with progress, log_to(progress.console):
            left = asyncio.run(_drain(spool, publisher, args.timeout, progress))
    finally:
        spool.close()
        dead.close()
        if lock is not None:
            lock.release()
    stats = publisher.stats
    moved = (
        f"; {stats.dead_lettered} refused for good, now dead letters" if stats.dead_lettered else ""
    )
    duplicates = f" ({stats.duplicates} the stream had already)" if stats.duplicates else ""
    io.say(f"published {stats.acked} envelopes{duplicates}{moved}")
    if left:
        reason = stats.last_error or f"the timeout of {args.timeout:g}s ran out"
        io.error(f"{left} envelopes remain in {directory}: {reason}")
        return EXIT_FAILED
    io.say(f"the spool {directory} is empty")
    return EXIT_OK


def add_drain(commands: SubParsers) -> None:
    command = commands.add_parser(
        "drain",
        parents=[spool_options(), nats_options()],
        help="publish a spool directory now, e.g. one a dead Pod left behind",
        description="""Publish every envelope in a spool directory with the meter's own
        publisher (Nats-Msg-Id = request id, deleted after the broker's ack, refused ones to
        the dead-letter area), with a progress bar. A spool that a running meter on this host
        has open is refused without --force. Reruns are safe: the broker drops a copy it
        already has within the stream's duplicate window.""",
        epilog="""Exit codes: 0 the spool is empty; 1 envelopes remain (the reason is given:
        broker unreachable, no stream, timeout) or the spool is missing or in use; 2 usage
        error.""",
    )
    command.add_argument(
        "--timeout",
        type=seconds,
        default=60.0,
        metavar="S",
        help="give up after S seconds (default: 60)",
    )
    command.add_argument(
        "--force", action="store_true", help="drain a spool a running meter has open"
    )
    command.add_argument(
        "--publish-timeout-ms",
        metavar="MS",
        help="broker ack timeout per publish "
        f"($EDGEMETER_PUBLISH_TIMEOUT_MS; {DEFAULT_PUBLISH_TIMEOUT_MS})",
    )
    command.set_defaults(run=drain, parser=command)
