"""`edgemeter dead`: list, export and requeue the envelopes the broker refused for good."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
    age,
    size,
    write_private,
)
from edgemeter.cli.spooldir import existing_spool_dir, spool_options
from spool.deadletter import DeadLetter, DeadLetters
from spool.store import Spool


def dead_list(args: argparse.Namespace, io: Io) -> int:
    directory = existing_spool_dir(args)
    now = time.time()
    with DeadLetters.of(directory) as dead:
        letters = list(dead)
    if args.json:
        rows = [summary(letter, now) for letter in letters]
        io.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    if not letters:
        io.say(f"no dead letters in {dead.directory}")
        return EXIT_OK
    table = Table(title=f"{len(letters)} dead letters in {dead.directory}", title_justify="left")
    # Keys, sizes and ages are never cut; the reason wraps in what width is left.
    table.add_column("key", no_wrap=True, min_width=max(len(d.key) for d in letters))
    table.add_column("size", justify="right", no_wrap=True, min_width=9)
    table.add_column("age", justify="right", no_wrap=True, min_width=8)
    table.add_column("reason")
    for letter in letters:
        reason = f"{letter.error}: {letter.reason}" if letter.error else letter.reason
        table.add_row(
            letter.key, size(len(letter.envelope)), age(now - letter.dead_lettered_at), reason
        )
    io.console.print(table)
    return EXIT_OK


def dead_export(args: argparse.Namespace, io: Io) -> int:
    directory = existing_spool_dir(args)
    keys = args.keys or None
    with DeadLetters.of(directory) as dead:
        letters = dead.select(keys)
    lines = "".join(json.dumps(letter.to_json(), ensure_ascii=False) + "\n" for letter in letters)
    if args.output is None:
        io.stdout.write(lines)
    else:
        write_private(args.output, lines)
        io.say(f"exported {len(letters)} dead letters to {args.output}")
    return report_missing(io, keys, [letter.key for letter in letters])


def dead_requeue(args: argparse.Namespace, io: Io) -> int:
    if bool(args.keys) == args.all:
        args.parser.error("give the keys to requeue, or --all")
    directory = existing_spool_dir(args)
    keys = None if args.all else args.keys
    spool = Spool(directory)
    with DeadLetters.of(directory) as dead:
        spool.open()
        try:
            moved = dead.requeue(spool, keys)
        finally:
            spool.close()
    if moved:
        io.say(f"requeued {len(moved)} dead letters; a running meter publishes them within seconds")
    elif args.all:
        io.say("no dead letters to requeue")
    return report_missing(io, keys, moved)


def add_dead(commands: SubParsers) -> None:
    group = commands.add_parser(
        "dead",
        help="list, export and requeue envelopes the broker refused for good",
        description="""Envelopes the broker refuses for good (e.g. over the stream's max message
        size) leave the publish loop and wait in the dead-letter area next to the spool, until
        an operator exports them or requeues them (say, after raising the limit).""",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    spool = spool_options()

    listing = actions.add_parser(
        "list",
        parents=[spool],
        help="show the dead letters: key, size, age, reason",
        description="Show the dead letters, oldest request first. Exit code 0, also when empty.",
    )
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=dead_list)

    export = actions.add_parser(
        "export",
        parents=[spool],
        help="write dead letters as JSON lines",
        description="""Write one JSON object per dead letter (key, error, reason,
        dead_lettered_at, size, envelope) to stdout or a file (created 0600: envelopes name
        customers). Exit code 1 if a key given is not a dead letter.""",
    )
    export.add_argument("keys", nargs="*", metavar="KEY", help="only these (default: all)")
    export.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE")
    export.set_defaults(run=dead_export)

    requeue = actions.add_parser(
        "requeue",
        parents=[spool],
        help="move dead letters back into the spool to be published again",
        description="""Move dead letters back into the spool; a running meter publishes them on
        its next rescan, with their original Nats-Msg-Id (the broker drops a copy it already
        has within its duplicate window). Exit code 1 if a key given is not a dead letter or
        the spool does not take them.""",
    )
    requeue.add_argument("keys", nargs="*", metavar="KEY", help="the dead letters to requeue")
    requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    requeue.set_defaults(run=dead_requeue, parser=requeue)


def summary(letter: DeadLetter, now: float) -> dict[str, Any]:
    return {
        "key": letter.key,
        "size": len(letter.envelope),
        "age_s": round(max(now - letter.dead_lettered_at, 0.0), 3),
        "dead_lettered_at": letter.to_json()["dead_lettered_at"],
        "error": letter.error,
        "reason": letter.reason,
    }


def report_missing(io: Io, keys: Sequence[str] | None, found: Sequence[str]) -> int:
    if keys is None:
        return EXIT_OK
    missing = sorted(set(keys) - set(found))
    if missing:
        io.error(f"not in the dead-letter area: {', '.join(missing)}")
        return EXIT_FAILED
    return EXIT_OK
