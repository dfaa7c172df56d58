"""`edgemeter go-spool`: publish what the Go sidecar left in its spool directory
(`<request_id>.json`, one envelope each, as its publisher.go writes them) at a cutover.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from nats.js.errors import NoStreamResponseError

from edgemeter.cli.broker import DEFAULT_PUBLISH_TIMEOUT_MS, broker_config, connect, nats_options
from edgemeter.cli.common import EXIT_FAILED, EXIT_OK, Io, SubParsers, seconds
from spool.errors import describe
from spool.publisher import NatsConfig


@dataclass
class Found:
    """The Go spool's files: envelopes to publish (request id, path) and what cannot be."""

    envelopes: list[tuple[str, Path]] = field(default_factory=list)
    # Files that are not an envelope with a request id, and why; never deleted.
    refused: list[tuple[Path, str]] = field(default_factory=list)
    # <name>.tmp: a write the Go sidecar never renamed (it crashed in between): not an envelope.
    partial: list[Path] = field(default_factory=list)


def read_go_spool(directory: Path) -> Found:
    found = Found()
    for path in sorted(directory.iterdir()):
        if path.suffix == ".tmp":
            found.partial.append(path)
            continue
        if path.suffix != ".json" or not path.is_file():
            continue
        try:
            envelope = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            found.refused.append((path, f"not JSON ({exc})"))
            continue
        metadata = envelope.get("metadata") if isinstance(envelope, dict) else None
        request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
        if not isinstance(request_id, str) or not request_id:
            # The billing consumer skips an envelope without a request id: publishing it
            # would lose it as surely, and without a trace.
            found.refused.append((path, "no metadata.request_id"))
            continue
        found.envelopes.append((request_id, path))
    return found


@dataclass
class Published:
    new: int = 0
    duplicates: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


async def publish(
    config: NatsConfig, envelopes: list[tuple[str, Path]], keep: bool, connect_timeout: float
) -> Published:
    """Each file's bytes as they are, with Nats-Msg-Id = its request id (as the Go sidecar
    publishes), the file deleted once the broker acked it."""
    nc = await connect(config, connect_timeout)
    done = Published()
    try:
        js = nc.jetstream()
        for request_id, path in envelopes:
            try:
                ack = await js.publish(
                    config.subject,
                    path.read_bytes(),
                    headers={"Nats-Msg-Id": request_id},
                    timeout=config.publish_timeout_ms / 1000,
                )
            except NoStreamResponseError:
                done.failed.append((path, f"no stream is bound to {config.subject}"))
                break
            except Exception as exc:
                done.failed.append((path, describe(exc)))
                continue
            if ack.duplicate:
                done.duplicates += 1
            else:
                done.new += 1
            if not keep:
                path.unlink()
    finally:
        await nc.close()
    return done


def go_spool(args: argparse.Namespace, io: Io) -> int:
    config = broker_config(args)
    directory = Path(args.directory)
    if not directory.is_dir():
        io.error(f"not a directory: {directory}")
        return EXIT_FAILED
    found = read_go_spool(directory)
    for path in found.partial:
        io.say(f"skipped {path.name}: a write the Go sidecar never finished (not an envelope)")
    if found.envelopes:
        done = asyncio.run(publish(config, found.envelopes, args.keep, args.timeout))
    else:
        done = Published()
    duplicates = f" ({done.duplicates} the stream had already)" if done.duplicates else ""
    io.say(f"published {done.new + done.duplicates} envelopes of {directory}{duplicates}")
    for path, reason in found.refused + done.failed:
        io.error(f"{path.name} stays: {reason}")
    if found.refused or done.failed or len(found.envelopes) > done.new + done.duplicates:
        return EXIT_FAILED
    return EXIT_OK


def add_go_spool(commands: SubParsers) -> None:
    command = commands.add_parser(
        "go-spool",
        parents=[nats_options()],
        help="publish what the Go sidecar left in its spool directory",
        description="""Publish every envelope the Go catalyst-metering-sidecar spooled
        (DIR/<request_id>.json) as it would have: the file's bytes unchanged, Nats-Msg-Id =
        metadata.request_id, the broker's ack awaited, then the file deleted (--keep leaves
        it). Reruns are safe: the broker drops a copy it already has within the stream's
        duplicate window, and the billing consumer books a request id once. Files that are
        not an envelope with a request id stay, and are named (docs/MIGRATION.md).""",
        epilog="""Exit codes: 0 every envelope published; 1 a file stays (not an envelope,
        the broker refused or did not answer) or DIR is missing; 2 usage error.""",
    )
    command.add_argument("directory", metavar="DIR", help="the Go sidecar's SPOOL_DIR (a copy)")
    command.add_argument("--keep", action="store_true", help="leave the files once published")
    command.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="give up connecting after S seconds (default: 10)",
    )
    command.add_argument(
        "--publish-timeout-ms",
        metavar="MS",
        help="broker ack timeout per publish "
        f"($EDGEMETER_PUBLISH_TIMEOUT_MS; {DEFAULT_PUBLISH_TIMEOUT_MS})",
    )
    command.set_defaults(run=go_spool, parser=command)
