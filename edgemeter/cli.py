"""The `edgemeter` operator command: look into a meter's spool and broker, and repair from a shell.

One function per subcommand, registered in COMMANDS; exit codes: 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import struct
import sys
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgemeter.errors import BrokerError, MeterError, SettingsError
from edgemeter.ids import uuid7_ms
from edgemeter.metering.attribution import fingerprint
from edgemeter.options import variable_of
from edgemeter.settings import (
    default_spool_dir,
    parse_file,
    parse_fingerprint_secret,
    parse_nats_urls,
    parse_subject,
)
from spool.deadletter import DeadLetter, DeadLetters
from spool.errors import SpoolError, describe
from spool.publisher import NatsConfig, Publisher, auth_options, new_client, redact_url
from spool.store import Spool

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILED = 1  # nothing matched, or the operation failed
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for tools the signal ended


@dataclass
class Io:
    """Where a subcommand writes: data to stdout, messages to stderr (so pipes get only data)."""

    stdout: TextIO
    stderr: TextIO

    @property
    def console(self) -> Console:
        return Console(file=self.stdout, highlight=False)

    @property
    def err_console(self) -> Console:
        return Console(file=self.stderr, highlight=False)

    def say(self, message: str) -> None:
        print(message, file=self.stderr)

    def error(self, message: str) -> None:
        print(f"edgemeter: error: {message}", file=self.stderr)


Handler = Callable[[argparse.Namespace, Io], int]

log = logging.getLogger(__name__)


# -- shared options ----------------------------------------------------------------------------


def _spool_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        help=f"the meter's spool directory (meter_spool_dir); default: {default_spool_dir()}",
    )
    return parent


def existing_spool_dir(args: argparse.Namespace) -> Path:
    """The spool directory the command works on; it must exist and is never created here."""
    directory = args.spool_dir.expanduser() if args.spool_dir else default_spool_dir()
    if not directory.is_dir():
        raise SpoolError(
            "no spool directory here (give --spool-dir or set EDGEMETER_SPOOL_DIR)",
            path=str(directory),
        )
    if not (directory / "cache.db").is_file():
        raise SpoolError("not a meter's spool directory (no cache.db)", path=str(directory))
    return directory


# -- dead: the dead-letter area --------------------------------------------------------------------


def dead_list(args: argparse.Namespace, io: Io) -> int:
    directory = existing_spool_dir(args)
    now = time.time()
    with DeadLetters.of(directory) as dead:
        letters = list(dead)
    if args.json:
        rows = [_summary(letter, now) for letter in letters]
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
            letter.key, _size(len(letter.envelope)), _age(now - letter.dead_lettered_at), reason
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
        _write_private(args.output, lines)
        io.say(f"exported {len(letters)} dead letters to {args.output}")
    return _report_missing(io, keys, [letter.key for letter in letters])


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
    return _report_missing(io, keys, moved)


def add_dead(commands: SubParsers) -> None:
    group = commands.add_parser(
        "dead",
        help="list, export and requeue envelopes the broker refused for good",
        description="""Envelopes the broker refuses for good (e.g. over the stream's max message
        size) leave the publish loop and wait in the dead-letter area next to the spool, until
        an operator exports them or requeues them (say, after raising the limit).""",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    spool = _spool_options()

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


# -- fingerprint: key map entries ----------------------------------------------------------------


def add_fingerprint(commands: SubParsers) -> None:
    def run(args: argparse.Namespace, io: Io) -> int:
        secret = parse_fingerprint_secret("", str(args.secret_file or ""))
        keys = [line.strip() for line in sys.stdin if line.strip()]
        for key in keys:
            io.stdout.write(fingerprint(key, secret) + "\n")
        if not keys:
            io.error("no API key on stdin")
            return EXIT_FAILED
        return EXIT_OK

    command = commands.add_parser(
        "fingerprint",
        help="print the fingerprint of API keys read from stdin, for the key map",
        description="""Read API keys from stdin, one a line, and print each one's fingerprint as
        the meter computes it: the name of its [keys."<fingerprint>"] entry in meter_keymap, and
        its api_key_fingerprint in envelopes. Keys are never arguments: a command line is seen by
        every user of the host and kept in shell history.""",
    )
    command.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="the meter's meter_fingerprint_secret_file (without: the unkeyed SHA-256 scheme)",
    )
    command.set_defaults(run=run)


# -- NATS options: status, tail and drain ------------------------------------------------------

# The meter's own defaults (addons/meter.py OPTIONS; tests/test_cli.py checks they agree).
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_SUBJECT: Final = "catalyst.usage.recorded"
DEFAULT_PUBLISH_TIMEOUT_MS: Final = 5000
DEFAULT_CONNECT_TIMEOUT_S: Final = 3.0


def _nats_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "broker",
        """Each flag defaults to the meter's own environment variable (EDGEMETER_NATS_URL for
        meter_nats_url, and so on), then to the meter's default. Secrets come from files or the
        environment, never from the command line, and are never printed.""",
    )

    def add(flag: str, option: str, metavar: str, what: str) -> None:
        # `what` names the variable as {var}: the help says where a value comes from.
        group.add_argument(flag, metavar=metavar, help=what.format(var=variable_of(option)))

    add(
        "--nats-url",
        "meter_nats_url",
        "URLS",
        f"server URLs, comma-separated ({{var}}; {DEFAULT_NATS_URL})",
    )
    add(
        "--subject", "meter_subject", "SUBJECT", f"the meter's subject ({{var}}; {DEFAULT_SUBJECT})"
    )
    add(
        "--nats-creds",
        "meter_nats_creds",
        "FILE",
        "credentials file: user JWT and nkey seed ({var})",
    )
    add(
        "--nats-token-file",
        "meter_nats_token",
        "FILE",
        "file holding the token (else the token in {var})",
    )
    add("--nats-user", "meter_nats_user", "USER", "user name ({var})")
    add(
        "--nats-password-file",
        "meter_nats_password",
        "FILE",
        "file holding the user's password (else {var})",
    )
    add("--nats-tls-ca", "meter_nats_tls_ca", "FILE", "PEM CA of the broker's certificate ({var})")
    add("--nats-tls-cert", "meter_nats_tls_cert", "FILE", "PEM client certificate ({var})")
    add("--nats-tls-key", "meter_nats_tls_key", "FILE", "PEM key of the client certificate ({var})")
    group.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        metavar="S",
        help=f"how long to try to reach the broker (default: {DEFAULT_CONNECT_TIMEOUT_S:g})",
    )
    return parent


def nats_config(args: argparse.Namespace, env: Mapping[str, str]) -> NatsConfig:
    """The broker settings: a flag, else the meter's EDGEMETER_* variable, else the meter's
    default. Raises SettingsError naming the flag or variable a bad value came from."""

    def pick(flag: str, option: str, default: str = "") -> tuple[str, str]:
        given = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if given is not None:
            return str(given), flag
        variable = variable_of(option)
        if variable in env:
            return env[variable], variable
        return default, option

    def secret(flag: str, option: str) -> str:
        path = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if path is None:
            return env.get(variable_of(option), "")
        return read_secret_file(parse_file(path, flag), flag)

    timeout_text, timeout_source = str(DEFAULT_PUBLISH_TIMEOUT_MS), "meter_publish_timeout_ms"
    if hasattr(args, "publish_timeout_ms"):  # only drain publishes
        timeout_text, timeout_source = pick(
            "--publish-timeout-ms", "meter_publish_timeout_ms", timeout_text
        )
    try:
        timeout_ms = int(timeout_text)
    except ValueError:
        raise SettingsError("not an integer", option=timeout_source, value=timeout_text) from None
    if timeout_ms <= 0:
        raise SettingsError("must be positive", option=timeout_source, value=timeout_ms)
    return NatsConfig(
        servers=parse_nats_urls(*pick("--nats-url", "meter_nats_url", DEFAULT_NATS_URL)),
        subject=parse_subject(*pick("--subject", "meter_subject", DEFAULT_SUBJECT)),
        publish_timeout_ms=timeout_ms,
        creds_file=parse_file(*pick("--nats-creds", "meter_nats_creds")),
        token=secret("--nats-token-file", "meter_nats_token"),
        user=pick("--nats-user", "meter_nats_user")[0],
        password=secret("--nats-password-file", "meter_nats_password"),
        tls_ca_file=parse_file(*pick("--nats-tls-ca", "meter_nats_tls_ca")),
        tls_cert_file=parse_file(*pick("--nats-tls-cert", "meter_nats_tls_cert")),
        tls_key_file=parse_file(*pick("--nats-tls-key", "meter_nats_tls_key")),
        name="edgemeter-cli",
    )


def read_secret_file(path: str, flag: str) -> str:
    """A token or password kept in a file, one trailing newline stripped; errors never carry it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read: {exc}", option=flag, value=path) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SettingsError("the file is empty", option=flag, value=path)
    return text


def _broker_config(args: argparse.Namespace) -> NatsConfig:
    try:
        return nats_config(args, os.environ)
    except SettingsError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))  # exits 2


async def connect(config: NatsConfig, timeout: float) -> NATS:
    """A client connected to one of the servers; once connected, nats-py reconnects by itself.
    Raises BrokerError with the last reason a server gave, as soon as each server has refused
    once, or when `timeout` runs out."""
    options = auth_options(config)  # checks a creds file: nats-py spins on one without a JWT
    nc = new_client(config)  # the meter's client: TLS is never skipped
    reasons: list[str] = []
    refused = asyncio.Event()

    async def error_cb(exc: Exception) -> None:
        # nats-py's default callback logs ERROR with a traceback on every failed attempt.
        if not nc.is_connected:
            reasons.append(describe(exc))
            if len(reasons) >= len(config.servers):
                refused.set()
        else:
            log.warning("NATS: %s", describe(exc))

    kwargs: dict[str, Any] = {
        "name": config.name,
        "allow_reconnect": True,
        # Attempts go on until our timeout: a finite count would sleep between rounds anyway.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": max(min(timeout, 2.0), 0.1),
        "error_cb": error_cb,
        **options,
    }
    connecting = asyncio.ensure_future(nc.connect(list(config.servers), **kwargs))
    giving_up = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait((connecting, giving_up), timeout=timeout, return_when=FIRST_COMPLETED)
    finally:
        giving_up.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])  # the connect unwinds before its client is closed
    try:
        if connecting.cancelled():
            raise TimeoutError
        connecting.result()
    except Exception as exc:  # the timeout, a refusal, or what nats-py gave up with
        with contextlib.suppress(Exception):
            await nc.close()
        reason = reasons[-1] if reasons else describe(exc)
        if isinstance(exc, TimeoutError) and not reasons:
            reason = f"no answer within {timeout:g}s"
        servers = ", ".join(redact_url(s) for s in config.servers)
        raise BrokerError(f"cannot connect to NATS at {servers}: {reason}") from None
    return nc


def in_use_by(directory: Path) -> int | None:
    """The id of a process that has the spool's database open (a running meter), else None.

    SQLite in WAL mode holds a shared lock on one byte of the -shm file (the DMS byte at offset
    128) for as long as a connection is open, and the OS drops it when the process ends: so it
    tells a live meter from the files a dead one left behind. F_GETLK only asks; it takes no
    lock, so the meter is not disturbed. Locks of this process itself are not seen, and the
    answer covers this host only (a meter on another node sharing the volume is not seen).
    None also where the platform's lock query is not known (see CAN_TELL_IN_USE).
    """
    if not CAN_TELL_IN_USE:
        return None
    layout = _FLOCK[sys.platform]
    try:
        fd = os.open(directory / "cache.db-shm", os.O_RDONLY)
    except FileNotFoundError:
        return None  # no connection has the database open in WAL mode
    try:
        fields = {"type": fcntl.F_WRLCK, "whence": os.SEEK_SET, "start": 128, "len": 1, "pid": 0}
        query = struct.pack(layout[0], *(fields[name] for name in layout[1]))
        answer = dict(
            zip(
                layout[1],
                struct.unpack(layout[0], fcntl.fcntl(fd, fcntl.F_GETLK, query)),
                strict=True,
            )
        )
    finally:
        os.close(fd)
    if answer["type"] == fcntl.F_UNLCK:
        return None
    return int(answer["pid"])


# struct flock of each platform: (struct format, field order).
_FLOCK: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "linux": ("hhqqi4x", ("type", "whence", "start", "len", "pid")),
    "darwin": ("qqihh", ("start", "len", "pid", "type", "whence")),
}
CAN_TELL_IN_USE: Final = sys.platform in _FLOCK and struct.calcsize("P") == 8


# -- status: spool, dead letters, broker, stream -----------------------------------------------


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


async def broker_state(config: NatsConfig, timeout: float) -> BrokerState:
    """Whether the broker answers, and the stream bound to the subject; never raises for a
    broker that is down or has no such stream."""
    state = BrokerState([redact_url(s) for s in config.servers], config.subject)
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
    except nats.errors.NoRespondersError:
        state.error = "JetStream is not enabled on this server"
    except (nats.errors.Error, TimeoutError) as exc:
        state.error = f"JetStream did not answer: {describe(exc)}"
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return state


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
    return found


def status(args: argparse.Namespace, io: Io) -> int:
    config = _broker_config(args)
    directory = args.spool_dir.expanduser() if args.spool_dir else default_spool_dir()
    spool = spool_state(directory, time.time())
    broker = asyncio.run(broker_state(config, args.connect_timeout))
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
            f"{spool.envelopes} envelopes ({_size(spool.bytes)}; {_size(spool.disk_bytes)} on disk)"
        )
        if spool.oldest_age_s is not None:
            held += f", oldest {_age(spool.oldest_age_s)} old"
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
        window = "" if broker.duplicate_window_s is None else _age(broker.duplicate_window_s)
        grid.add_row(
            "stream",
            f"{broker.stream}: {broker.messages} messages ({_size(broker.stream_bytes or 0)}), "
            f"duplicate window {window}",
        )
    elif broker.reachable:
        grid.add_row("stream", "none")
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
        parents=[_spool_options(), _nats_options()],
        help="spool depth and age, dead letters, broker and stream",
        description="""Report what a meter's spool holds (envelopes, bytes, the oldest one's
        age, dead letters, whether a meter has it open) and whether the broker answers, with
        the stream bound to the subject (messages, duplicate window). Reads only: a missing
        spool is reported, never created, and a running meter's spool is safe to read.""",
        epilog="""Exit codes: 0 healthy; 1 needs attention (spool missing or unreadable, dead
        letters, broker unreachable, no stream bound to the subject); 2 usage error.""",
    )
    command.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    command.set_defaults(run=status, parser=command)


# -- tail: envelopes as they reach the stream ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """The columns of one envelope in `tail`, read open-world (absent or odd fields: empty)."""

    time: str
    tenant: str
    customer: str
    model: str
    api: str
    input_tokens: int
    output_tokens: int
    amount_micro: int
    currency: str
    outcome: str
    usage_source: str


def parse_envelope(data: bytes) -> tuple[dict[str, Any], Row] | None:
    """The envelope and its row; None unless it is a JSON object with a metadata object."""
    try:
        envelope = json.loads(data)
    except ValueError:
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("metadata"), dict):
        return None
    meta: dict[str, Any] = envelope["metadata"]

    def text(obj: Mapping[str, Any], key: str) -> str:
        value = obj.get(key)
        return value if isinstance(value, str) else ""

    def number(obj: Mapping[str, Any], key: str) -> int:
        value = obj.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    # A seed-shaped envelope has only the total: it counts as input.
    input_tokens = (
        number(meta, "input_tokens") if "input_tokens" in meta else number(meta, "tokens_used")
    )
    return envelope, Row(
        time=text(meta, "completed_at").replace("T", " ").removesuffix("Z"),
        tenant=text(meta, "tenant_id"),
        customer=text(envelope, "customer_id"),
        model=text(meta, "model"),
        api=text(meta, "api"),
        input_tokens=input_tokens,
        output_tokens=number(meta, "output_tokens"),
        amount_micro=number(envelope, "amount_micro_omr"),
        currency=text(meta, "currency"),
        outcome=text(meta, "outcome"),
        usage_source=text(meta, "usage_source"),
    )


@dataclass
class Total:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    amount_micro: int = 0
    currency: str = ""


@dataclass
class TailView:
    """The last envelopes and the running totals per (tenant, model); rich renders it live."""

    last: int = 20
    rows: collections.deque[Row] = field(default_factory=collections.deque)
    totals: dict[tuple[str, str], Total] = field(default_factory=dict)
    envelopes: int = 0
    malformed: int = 0

    def add(self, row: Row) -> None:
        self.envelopes += 1
        self.rows.append(row)
        while len(self.rows) > self.last:
            self.rows.popleft()
        total = self.totals.setdefault((row.tenant, row.model), Total(currency=row.currency))
        total.requests += 1
        total.input_tokens += row.input_tokens
        total.output_tokens += row.output_tokens
        total.amount_micro += row.amount_micro
        if total.currency != row.currency:
            total.currency = "mixed"

    def __rich__(self) -> Group:
        recent = Table(
            title=f"last {len(self.rows)} of {self.envelopes} envelopes", title_justify="left"
        )
        for name in ("time", "tenant", "customer", "model", "api"):
            recent.add_column(name, no_wrap=True)
        for name in ("in", "out", "amount"):
            recent.add_column(name, justify="right", no_wrap=True)
        recent.add_column("outcome", no_wrap=True)
        recent.add_column("usage", no_wrap=True)
        for r in self.rows:
            recent.add_row(
                r.time,
                r.tenant,
                r.customer,
                r.model,
                r.api,
                str(r.input_tokens),
                str(r.output_tokens),
                _amount(r.amount_micro),
                r.outcome,
                r.usage_source,
                style=None if r.outcome in ("complete", "") else "yellow",
            )
        caption = f"{self.malformed} malformed messages skipped" if self.malformed else None
        totals = Table(
            title="totals", title_justify="left", caption=caption, caption_justify="left"
        )
        for name in ("tenant", "model"):
            totals.add_column(name, no_wrap=True)
        for name in ("requests", "in", "out", "amount"):
            totals.add_column(name, justify="right", no_wrap=True)
        totals.add_column("currency", no_wrap=True)
        for (tenant, model), t in sorted(self.totals.items()):
            totals.add_row(
                tenant,
                model,
                str(t.requests),
                str(t.input_tokens),
                str(t.output_tokens),
                _amount(t.amount_micro),
                t.currency,
            )
        return Group(recent, totals)


def parse_since(text: str, now: datetime) -> datetime:
    """`90s`, `15m`, `2h` or `1d` ago, or an ISO 8601 time (UTC unless it names a zone)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit in units and number.isdigit():
        return now - timedelta(seconds=int(number) * units[unit])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected 15m, 2h, 1d or an ISO time, not {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_REDRAW_S: Final = 0.25


async def _tail(
    config: NatsConfig,
    args: argparse.Namespace,
    view: TailView,
    show: Callable[[dict[str, Any] | None], None],
) -> bool:
    """Feed envelopes from the stream into view until --count or --timeout; True when --count
    was reached. `show` gets each envelope, and None at least once a second."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    nc = await connect(config, args.connect_timeout)
    try:
        js = nc.jetstream(timeout=args.connect_timeout)
        consumer = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        if args.all:
            consumer = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        elif args.since is not None:
            consumer = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=args.since
            )
        try:
            # An ordered consumer: ephemeral, in memory, without acks; it changes no stream.
            sub = await js.subscribe(config.subject, ordered_consumer=True, config=consumer)
        except nats.js.errors.NotFoundError:
            raise BrokerError(f"no stream is bound to subject {config.subject!r}") from None
        while args.count is None or view.envelopes < args.count:
            wait = 1.0 if deadline is None else min(deadline - time.monotonic(), 1.0)
            if wait <= 0:
                return False
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                show(None)
                continue
            parsed = parse_envelope(msg.data)
            if parsed is None:
                view.malformed += 1
                show(None)
                continue
            envelope, row = parsed
            view.add(row)
            show(envelope)
        return True
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def tail(args: argparse.Namespace, io: Io) -> int:
    config = _broker_config(args)
    view = TailView(last=args.last)

    # Redrawn from the loop that changes the view, not by rich's refresh thread, which would
    # read the view while it changes.
    live = None if args.json else Live(view, console=io.console, auto_refresh=False)
    drawn = 0.0

    def show(envelope: dict[str, Any] | None) -> None:
        nonlocal drawn
        if live is None:
            if envelope is not None:
                io.stdout.write(json.dumps(envelope, ensure_ascii=False, separators=(",", ":")))
                io.stdout.write("\n")
                io.stdout.flush()  # a pipe gets each envelope as it comes
        elif time.monotonic() - drawn >= _REDRAW_S:
            live.refresh()
            drawn = time.monotonic()

    reached = False
    try:
        with live or contextlib.nullcontext():
            reached = asyncio.run(_tail(config, args, view, show))
    except KeyboardInterrupt:
        reached = True  # Ctrl-C is how a live tail ends
    if not args.json and not io.console.is_terminal:
        io.stdout.write("\n")
    skipped = f", {view.malformed} malformed messages skipped" if view.malformed else ""
    io.say(f"{view.envelopes} envelopes{skipped}")
    if args.count is not None and not reached:
        io.error(f"saw {view.envelopes} of {args.count} envelopes within {args.timeout:g}s")
        return EXIT_FAILED
    return EXIT_OK


def add_tail(commands: SubParsers) -> None:
    command = commands.add_parser(
        "tail",
        parents=[_nats_options()],
        help="a live table of envelopes on the stream, with totals per tenant and model",
        description="""Follow the stream bound to the subject with an ordered consumer (ephemeral,
        in memory, no acks: it takes nothing from the billing consumer) and show the last
        envelopes and running totals per tenant and model. Messages that are not envelopes are
        counted and skipped. Ctrl-C ends it.""",
        epilog="""Exit codes: 0 stopped by Ctrl-C, --count reached or --timeout (without
        --count); 1 broker unreachable, no stream, or --count not reached within --timeout;
        2 usage error.""",
    )
    start = command.add_mutually_exclusive_group()
    start.add_argument("--all", action="store_true", help="start at the stream's first message")
    start.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="start at a time: 15m, 2h, 1d ago, or an ISO time (default: new envelopes only)",
    )
    command.add_argument("--json", action="store_true", help="one envelope per line, for pipes")
    command.add_argument("--count", type=_positive, metavar="N", help="stop after N envelopes")
    command.add_argument("--timeout", type=_seconds, metavar="S", help="stop after S seconds")
    command.add_argument(
        "--last", type=_positive, default=20, metavar="N", help="rows shown (default: 20)"
    )
    command.set_defaults(run=tail, parser=command)


# -- drain: publish a spool now ----------------------------------------------------------------


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
    config = _broker_config(args)
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
    spool = Spool(directory)
    dead = DeadLetters.of(directory)
    publisher = Publisher(spool, config, dead)
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
        with progress, _log_to(progress.console):
            left = asyncio.run(_drain(spool, publisher, args.timeout, progress))
    finally:
        spool.close()
        dead.close()
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
        parents=[_spool_options(), _nats_options()],
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
        type=_seconds,
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
        help="broker ack timeout per publish ($EDGEMETER_PUBLISH_TIMEOUT_MS; 5000)",
    )
    command.set_defaults(run=drain, parser=command)


# -- serve: the lean runner --------------------------------------------------------------------


def add_serve(commands: SubParsers) -> None:
    def run(args: argparse.Namespace, io: Io) -> int:
        from edgemeter import serve  # mitmproxy: loaded only when it is needed

        try:
            return serve.main(args.args)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                io.say(exc.code)
                return EXIT_FAILED
            return EXIT_OK if exc.code is None else exc.code

    # No option of its own: everything after `serve` goes to the runner unchanged, `--help`
    # included ('-' is not an option prefix here, so argparse takes no flag for itself).
    command = commands.add_parser(
        "serve",
        prefix_chars="\0",
        add_help=False,
        help="run the meter on mitmproxy's proxy core (edgemeter serve --help)",
    )
    command.add_argument("args", nargs=argparse.REMAINDER)
    command.set_defaults(run=run)


# -- the command -------------------------------------------------------------------------------

# Each adds one subcommand (group) to the parser; its handlers are set as `run` defaults.
COMMANDS: list[Callable[[SubParsers], None]] = [
    add_status,
    add_tail,
    add_drain,
    add_dead,
    add_fingerprint,
    add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemeter",
        description="Operator commands for edgemeter, the LLM usage meter.",
        epilog="""Exit codes: 0 done (status: healthy), 1 nothing matched, the operation
        failed or (status) something needs attention, 2 usage error; 130 after Ctrl-C, except
        for tail, which Ctrl-C ends with 0; 141 when the reader of a pipe went away. Each
        command's --help says more.""",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    io = Io(sys.stdout, sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.run
        return handler(args, io)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (MeterError, SpoolError) as exc:
        io.error(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`edgemeter tail --json | head`): end quietly, as tools killed
        # by SIGPIPE do; stdout goes to /dev/null so the flush at exit does not complain.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        io.error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


# -- helpers -----------------------------------------------------------------------------------


def _summary(letter: DeadLetter, now: float) -> dict[str, Any]:
    return {
        "key": letter.key,
        "size": len(letter.envelope),
        "age_s": round(max(now - letter.dead_lettered_at, 0.0), 3),
        "dead_lettered_at": letter.to_json()["dead_lettered_at"],
        "error": letter.error,
        "reason": letter.reason,
    }


def _report_missing(io: Io, keys: Sequence[str] | None, found: Sequence[str]) -> int:
    if keys is None:
        return EXIT_OK
    missing = sorted(set(keys) - set(found))
    if missing:
        io.error(f"not in the dead-letter area: {', '.join(missing)}")
        return EXIT_FAILED
    return EXIT_OK


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def _age(seconds: float) -> str:
    s = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def _amount(micro: int) -> str:
    """Micro-units as a decimal, exactly (no float rounding)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _since(text: str) -> datetime:
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _ConsoleLog(logging.Handler):
    """Log records as one line each on a rich console (above a progress bar or live table)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(f"{record.levelname.lower()}: {record.getMessage()}", markup=False)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _log_to(console: Console) -> Iterator[None]:
    handler = _ConsoleLog(console)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
