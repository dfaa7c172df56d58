"""The README's first command (`scripts/run`): the meter with everything it needs on one machine.

With no arguments it starts an embedded JetStream nats-server, the demo upstream and mitmdump
with the meter, and shows every envelope that lands on the stream as one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgemeter.options import DEFAULTS
from tools.demo_upstream import DemoUpstream, server_url
from tools.harness import METER_ADDON, ROOT, Process
from tools.harness import venv_binary as _venv_binary
from tools.streams import STREAM, STREAM_SUBJECTS, ensure_stream

DEFAULT_PROXY_PORT = 8086
DEFAULT_NATS_PORT = 4222
DEFAULT_ADMIN_PORT = 9464
DEFAULT_SUBJECT: str = DEFAULTS["meter_subject"]
# mitmdump's connection chatter: kept in the log file, left off the console.
_CHATTER = ("client connect", "client disconnect", "server connect", "server disconnect")
# How long each child gets after SIGTERM before SIGKILL. mitmdump's final drain is bounded by
# meter_shutdown_drain_ms (5 s by default), so it gets more than that.
_MITMDUMP_STOP_S = 20.0
_CHILD_STOP_S = 10.0
T = TypeVar("T")


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while starting up."""


class StartupError(Exception):
    """Something the demo needs could not be started; the message says what and where to look."""


@dataclass(frozen=True)
class Options:
    upstream: str | None
    nats_url: str | None
    nats_creds: str | None
    port: int | None
    listen_host: str
    spool_dir: Path
    data_dir: Path
    fixtures: Path | None
    samples: bool
    quiet: bool
    mitmdump_args: list[str]


def parse_args(argv: Sequence[str]) -> Options:
    argv = list(argv)
    # Everything after `--` belongs to mitmdump.
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run the edgemeter meter. With no arguments: an embedded JetStream "
        "nats-server and a demo upstream, so envelopes flow at once.",
        epilog="Arguments after `--` go to mitmdump, e.g. `-- --set meter_paths=/v1/,/v2/`.",
    )
    parser.add_argument(
        "--upstream", metavar="URL", help="the gateway to meter (default: start the demo upstream)"
    )
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        help="a real JetStream broker: no embedded nats-server, no stream is created",
    )
    parser.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file")
    parser.add_argument(
        "--port", type=int, help=f"proxy port (default {DEFAULT_PROXY_PORT}, or a free one)"
    )
    parser.add_argument(
        "--listen-host", metavar="HOST", default="127.0.0.1", help="proxy address to listen on"
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        default=ROOT / ".edgemeter",
        help="spool, JetStream data and logs (default .edgemeter/ in the repository)",
    )
    parser.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        help="the meter's spool (default: spool/ in the data dir)",
    )
    parser.add_argument(
        "--fixtures",
        metavar="DIR",
        type=Path,
        help="recorded responses the demo upstream replays for the x-demo-fixture header",
    )
    parser.add_argument(
        "--no-samples",
        action="store_true",
        help="do not send the two sample requests through the demo at startup",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="mitmdump's output to its log file only"
    )
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        parser.error("--port must be 1-65535")
    if args.fixtures is not None and not args.fixtures.is_dir():
        parser.error(f"--fixtures {args.fixtures}: not a directory")
    data_dir: Path = args.data_dir.resolve()
    return Options(
        upstream=args.upstream,
        nats_url=args.nats_url,
        nats_creds=args.nats_creds,
        port=args.port,
        listen_host=args.listen_host,
        spool_dir=(args.spool_dir or data_dir / "spool").resolve(),
        data_dir=data_dir,
        fixtures=args.fixtures,
        samples=not args.no_samples,
        quiet=args.quiet,
        mitmdump_args=extra,
    )


def _bind(port: int, host: str) -> int | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return None
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    return _bind(port, host) is not None


def port_or_free(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` if nothing listens there, else a free port the OS picks."""
    port = _bind(preferred, host) or _bind(0, host)
    if port is None:
        raise StartupError(f"no free port on {host}")
    return port


def venv_binary(name: str) -> str:
    try:
        return _venv_binary(name)
    except RuntimeError:
        raise StartupError(
            f"{name} not found: run scripts/run, which installs it into .venv"
        ) from None


def _echo(console: Console, name: str) -> Callable[[str], None]:
    """A child's output line, dimmed on the console (connection chatter left out)."""

    def show(line: str) -> None:
        if not any(c in line for c in _CHATTER):
            console.print(Text(f"  {name} │ {line}", style="dim"), highlight=False)

    return show


async def wait_listening(child: Process, timeout: float = 30.0) -> None:
    """Until the child accepts on its port; a StartupError naming its log if it exits first."""
    try:
        await asyncio.to_thread(child.wait_listening, timeout)
    except (RuntimeError, TimeoutError):
        raise StartupError(
            f"{child.name} does not listen on port {child.port}; its log is {child.log_path}:\n"
            + _tail(child)
        ) from None


async def stop_child(child: Process | None, timeout: float, force: asyncio.Event) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` or as soon as `force` is set (a second Ctrl-C)."""
    if child is None or child.proc is None:
        return None
    proc = child.proc
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None and loop.time() < deadline and not force.is_set():
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        return await asyncio.to_thread(child.kill)
    return await asyncio.to_thread(child.stop)


def _tail(child: Process) -> str:
    return "\n".join(f"    {line}" for line in child.tail)


# --- the envelope view ----------------------------------------------------------------------

# (header, width, justify) of each column of the envelope lines.
COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("time", 8, "left"),
    ("customer", 14, "left"),
    ("tenant", 10, "left"),
    ("model", 26, "left"),
    ("api", 18, "left"),
    ("in", 7, "right"),
    ("out", 7, "right"),
    ("amount", 11, "right"),
    ("outcome", 16, "left"),
)
_OUTCOME_STYLE = {"complete": "green", "client_aborted": "yellow", "upstream_error": "red"}


def _table(show_header: bool) -> Table:
    # One table per line with fixed widths: rows line up although each is printed on arrival.
    table = Table(box=None, show_header=show_header, show_edge=False, padding=(0, 1, 0, 0))
    for name, width, justify in COLUMNS:
        table.add_column(
            name,
            width=width,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            overflow="ellipsis",
            header_style="bold",
        )
    return table


def envelope_header() -> Table:
    return _table(show_header=True)


def envelope_row(envelope: dict[str, Any]) -> Table:
    """One envelope as one line: time, customer, tenant, model, api, tokens, amount, outcome."""
    md: dict[str, Any] = envelope.get("metadata") or {}
    try:
        when = datetime.fromisoformat(str(md.get("completed_at", "")).replace("Z", "+00:00"))
        clock = when.astimezone().strftime("%H:%M:%S")
    except ValueError:
        clock = "?"
    api = str(md.get("api", "?")) + (" ⇣" if md.get("stream") else "")
    outcome = str(md.get("outcome", "?"))
    outcome_text = Text(outcome, style=_OUTCOME_STYLE.get(outcome, "default"))
    if md.get("usage_source") == "estimated":
        outcome_text.append(" (est.)", style="yellow")
    amount = envelope.get("amount_omr")
    table = _table(show_header=False)
    table.add_row(
        clock,
        str(envelope.get("customer_id") or "-"),
        str(md.get("tenant_id") or "-"),
        str(md.get("model") or "-"),
        api,
        str(md.get("input_tokens", md.get("tokens_used", "?"))),
        str(md.get("output_tokens", "?")),
        f"{amount:.6f}" if isinstance(amount, int | float) else "?",
        outcome_text,
    )
    return table


class EnvelopeWatcher:
    """Prints each envelope that lands on the stream.

    It reads the stream through an ordered consumer from "now on", so what it shows is what the
    billing consumer will see. If that is not possible (no stream yet on a real broker, no
    permission to create consumers), it listens to the subject itself and says so.
    """

    def __init__(self, console: Console, nats_url: str, subject: str, creds: str | None) -> None:
        self.console = console
        self.nats_url = nats_url
        self.subject = subject
        self.creds = creds
        self.nc: NatsClient | None = None
        self.seen: deque[str] = deque(maxlen=4096)
        self.count = 0
        self._header_shown = False
        # Set once subscribed: envelopes published before that would not be shown.
        self.ready = asyncio.Event()

    async def run(self) -> None:
        self.nc = await self._connect()
        try:
            sub = await self.nc.jetstream().subscribe(
                self.subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
            messages = sub.messages
        except Exception as exc:  # any refusal: fall back to a plain subscription
            if isinstance(exc, NotFoundError):
                why = (
                    f"no stream binds {self.subject} yet; the meter keeps it spooled until one does"
                )
            else:
                why = f"cannot read the stream: {exc!r}"
            self.console.print(
                f"[yellow]{escape(why)}.[/] Showing what is published on "
                f"{escape(self.subject)} instead (before the broker stores it)."
            )
            messages = (await self.nc.subscribe(self.subject)).messages
        self.ready.set()
        async for msg in messages:
            self.show(msg)

    async def _connect(self) -> NatsClient:
        async def quiet(*_: object) -> None:
            # nats-py's default callbacks log tracebacks; a broker that comes and goes is normal.
            return None

        delay = 0.5
        while True:
            try:
                return await nats.connect(
                    self.nats_url,
                    user_credentials=self.creds,
                    name="edgemeter-run",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=quiet,
                    disconnected_cb=quiet,
                    reconnected_cb=quiet,
                    closed_cb=quiet,
                )
            except Exception:  # not reachable yet: the meter spools meanwhile, we wait too
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def show(self, msg: Msg) -> None:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        # A plain subscription sees a retried publish again; the stream keeps it once.
        if msg_id and msg_id in self.seen:
            return
        self.seen.append(msg_id)
        try:
            envelope = json.loads(msg.data)
        except ValueError:
            self.console.print(f"[red]not JSON on {escape(msg.subject)}:[/] {msg.data[:200]!r}")
            return
        if not isinstance(envelope, dict):
            return
        if not self._header_shown:
            self.console.print(envelope_header())
            self._header_shown = True
        self.count += 1
        self.console.print(envelope_row(envelope))

    async def close(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            # Let envelopes the broker already stored (the meter's final drain) reach us first.
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
                await self.nc.drain()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


# --- the demo's first requests and the banner -----------------------------------------------


@dataclass(frozen=True)
class Example:
    """A request the banner shows as curl and, with the demo upstream, sends at startup."""

    title: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: dict[str, Any]

    def curl(self, host: str, port: int) -> str:
        flags = "-sN" if self.body.get("stream") else "-s"
        lines = [f"curl {flags} http://{host}:{port}{self.path}"]
        lines += [f"  -H '{name}: {value}'" for name, value in self.headers]
        lines.append(f"  -d '{json.dumps(self.body, separators=(',', ':'))}'")
        return " \\\n".join(lines)


_WHO = (("x-tenant-id", "t_demo"), ("x-customer-id", "cus_demo"))
_JSON = (("content-type", "application/json"),)
EXAMPLES = (
    Example(
        "OpenAI chat, streamed",
        "/v1/chat/completions",
        (("authorization", "Bearer sk-demo"), *_JSON, *_WHO),
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
    ),
    Example(
        "Anthropic Messages",
        "/v1/messages",
        (("x-api-key", "sk-ant-demo"), ("anthropic-version", "2023-06-01"), *_JSON, *_WHO),
        {
            "model": "claude-sonnet-4-6",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Hi there"}],
        },
    ),
)


async def post_json(port: int, example: Example) -> int:
    """A minimal HTTP/1.1 POST to 127.0.0.1 (no client library at runtime); returns the status."""
    payload = json.dumps(example.body).encode()
    head = [f"POST {example.path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in example.headers]
    head.append(f"Content-Length: {len(payload)}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()  # the body, until the server closes
    finally:
        writer.close()
    return int(status_line.split()[1])


async def send_samples(console: Console, port: int, watcher: EnvelopeWatcher) -> None:
    # Only once the watcher reads the stream, or their envelopes would pass unseen.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watcher.ready.wait(), timeout=10)
    for example in EXAMPLES:
        try:
            status = await post_json(port, example)
        except (OSError, ValueError, IndexError) as exc:
            console.print(f"[yellow]sample request to {example.path} failed: {escape(str(exc))}[/]")
            continue
        if status != 200:
            console.print(f"[yellow]sample request to {example.path} answered {status}[/]")


def banner(
    console: Console,
    *,
    proxy_port: int,
    listen_host: str,
    upstream: str,
    demo: bool,
    nats_url: str,
    embedded_nats: bool,
    admin: str,
    spool_dir: Path,
    logs: list[Process],
    samples: bool,
) -> None:
    host = "127.0.0.1" if listen_host in ("0.0.0.0", "::", "") else listen_host
    console.print()
    console.rule("[bold]edgemeter is metering")
    kind = "demo upstream" if demo else "upstream"
    where = (
        f"embedded nats-server, stream {STREAM} on {', '.join(STREAM_SUBJECTS)}"
        if embedded_nats
        else "your broker; no stream was created"
    )
    rows = [
        ("proxy", f"http://{host}:{proxy_port}  [dim](send your LLM requests here)[/]"),
        (kind, escape(upstream)),
        ("NATS", f"{escape(nats_url)}  [dim]({where})[/]"),
        ("spool", escape(str(spool_dir))),
    ]
    rows += [(f"{child.name} log", escape(str(child.log_path))) for child in logs]
    for label, value in rows:
        console.print(f"  {label:<14} {value}", highlight=False)
    console.print()
    for example in EXAMPLES:
        console.print(f"Try it: {example.title}", style="bold")
        console.print(example.curl(host, proxy_port), highlight=False, markup=False)
    if demo:
        console.print(
            "[dim]The demo answers any model. The header x-demo-fixture: <file> replays a recorded "
            "response (with --fixtures DIR); x-demo-status: 429 answers an error, which bills "
            "nothing.[/]"
        )
    console.print()
    if samples:
        console.print("Sent two sample requests; their envelopes appear below.")
    console.print("Each envelope that lands on the stream is one line below. Ctrl-C stops it all.")
    console.rule()


# --- the run --------------------------------------------------------------------------------


def _option_given(args: Sequence[str], name: str) -> bool:
    return any(arg.startswith(f"{name}=") for arg in args)


def _option_value(args: Sequence[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    return values[-1] if values else None


class Runner:
    """Starts the pieces in order and stops them in reverse: mitmdump first (SIGTERM, so the
    meter does its final drain while the broker is still up), then the upstream, then NATS."""

    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.logs = options.data_dir / "logs"
        self.nats: Process | None = None
        self.mitmdump: Process | None = None
        self.demo: DemoUpstream | None = None
        self.demo_server: asyncio.Server | None = None
        self.watcher: EnvelopeWatcher | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def _watcher_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self.stop.is_set():
            self.console.print(
                f"[red]stopped showing envelopes: {escape(repr(task.exception()))}[/] "
                "[dim](the meter keeps metering)[/]"
            )

    def on_signal(self) -> None:
        if not self.stop.is_set():
            self.console.print("\n[bold]stopping…[/] [dim](Ctrl-C again to kill)[/]")
            self.stop.set()
        else:
            self.force.set()

    async def step(self, awaitable: Awaitable[T]) -> T:
        """Await a startup step, unless Ctrl-C or SIGTERM comes first."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Stopped
        return task.result()

    async def run(self) -> int:
        opts = self.options
        # Private: the logs name customers and paths, the spool holds their envelopes.
        opts.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        embedded = opts.nats_url is None
        if opts.nats_url is None:
            nats_url = await self.start_nats()
        else:
            nats_url = opts.nats_url
        if opts.upstream is None:
            # Small pieces with a pause, so a streamed answer is seen arriving (about 0.5 s).
            self.demo = DemoUpstream(opts.fixtures, chunk_size=64, delay_ms=10)
            self.demo_server = await self.demo.start("127.0.0.1", 0)
            upstream = server_url(self.demo_server)
        else:
            upstream = opts.upstream
        proxy_port, admin = await self.start_mitmdump(upstream, nats_url)

        subject = _option_value(opts.mitmdump_args, "meter_subject") or DEFAULT_SUBJECT
        self.watcher = EnvelopeWatcher(self.console, nats_url, subject, opts.nats_creds)
        watching = asyncio.create_task(self.watcher.run())
        watching.add_done_callback(self._watcher_ended)
        self.tasks.append(watching)
        samples = opts.samples and self.demo is not None
        banner(
            self.console,
            proxy_port=proxy_port,
            listen_host=opts.listen_host,
            upstream=upstream,
            demo=self.demo is not None,
            nats_url=nats_url,
            embedded_nats=embedded,
            admin=admin,
            spool_dir=opts.spool_dir,
            logs=[c for c in (self.mitmdump, self.nats) if c is not None],
            samples=samples,
        )
        if samples:
            sending = send_samples(self.console, proxy_port, self.watcher)
            self.tasks.append(asyncio.create_task(sending))
        return await self.wait_until_stopped()

    async def start_nats(self) -> str:
        store = self.options.data_dir / "jetstream"
        port = port_or_free(DEFAULT_NATS_PORT)
        args = [venv_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port)]
        log = self.logs / "nats-server.log"
        self.nats = Process("nats", [*args, "-sd", str(store)], port, log, own_session=True)
        self.nats.start()
        await self.step(wait_listening(self.nats))
        url = f"nats://127.0.0.1:{port}"
        # Like the seed's billing service: it owns the stream, the meter never creates one.
        try:
            await self.step(ensure_stream(url, STREAM, STREAM_SUBJECTS, storage="file"))
        except (Stopped, StartupError):
            raise
        except Exception as exc:
            raise StartupError(
                f"cannot create stream {STREAM}: {exc!r} (log: {self.nats.log_path})"
            ) from exc
        return url

    async def start_mitmdump(self, upstream: str, nats_url: str) -> tuple[int, str]:
        opts = self.options
        if opts.port is not None and not port_is_free(opts.port, opts.listen_host):
            # Checked here: waiting for "something listens" would find the other program.
            raise StartupError(
                f"port {opts.port} on {opts.listen_host} is in use: choose another --port, or "
                "leave --port out to use 8086 or a free port"
            )
        port = opts.port or port_or_free(DEFAULT_PROXY_PORT, opts.listen_host)
        extra = opts.mitmdump_args
        sets = [f"meter_nats_url={nats_url}", f"meter_spool_dir={opts.spool_dir}"]
        if opts.nats_creds:
            sets.append(f"meter_nats_creds={opts.nats_creds}")
        admin = _option_value(extra, "meter_admin_listen")
        if admin is None:
            # The admin endpoint's default port may be taken (another meter): move it too.
            admin = f"127.0.0.1:{port_or_free(DEFAULT_ADMIN_PORT)}"
            sets.append(f"meter_admin_listen={admin}")
        args = [venv_binary("mitmdump"), "-s", str(METER_ADDON), "--mode", f"reverse:{upstream}"]
        args += ["--listen-host", opts.listen_host, "-p", str(port)]
        for option in sets:
            args += ["--set", option]
        # The user's own arguments last, so their --set wins.
        args += extra
        echo = None if opts.quiet else _echo(self.console, "mitmdump")
        log = self.logs / "mitmdump.log"
        self.mitmdump = Process("mitmdump", args, port, log, echo=echo, own_session=True)
        self.mitmdump.start()
        await self.step(wait_listening(self.mitmdump))
        return port, admin

    async def wait_until_stopped(self) -> int:
        """Until Ctrl-C or SIGTERM (0), or until a child exits on its own (1)."""
        waiters: dict[asyncio.Future[Any], Process | None] = {
            asyncio.ensure_future(self.stop.wait()): None
        }
        for child in (self.mitmdump, self.nats):
            if child is not None and child.proc is not None:
                waiters[asyncio.ensure_future(asyncio.to_thread(child.wait))] = child
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            exited = waiters[task]
            if exited is not None and not self.stop.is_set():
                self.console.print(
                    f"[red]{exited.name} exited with {task.result()}; its log is "
                    f"{exited.log_path}[/]\n{escape(_tail(exited))}"
                )
                return 1
        return 0

    async def shutdown(self) -> None:
        self.stop.set()
        for task in self.tasks[1:]:  # the sample requests; the watcher goes last
            task.cancel()
        mitmdump = self.mitmdump
        code = await stop_child(mitmdump, _MITMDUMP_STOP_S, self.force)
        if mitmdump is not None and code not in (None, 0, -signal.SIGTERM):
            self.console.print(f"[yellow]mitmdump exited with {code}; see {mitmdump.log_path}")
        if self.demo_server is not None and self.demo is not None:
            self.demo_server.close()
            self.demo.close_connections()
            await self.demo_server.wait_closed()
        if self.watcher is not None:
            await self.watcher.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await stop_child(self.nats, _CHILD_STOP_S, self.force)
        shown = self.watcher.count if self.watcher is not None else 0
        self.console.print(f"stopped; {shown} envelope(s) shown.")


async def amain(options: Options, console: Console) -> int:
    runner = Runner(options, console)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.on_signal)
    try:
        return await runner.run()
    except Stopped:
        return 0
    except StartupError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        return 1
    finally:
        await runner.shutdown()


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    stream = out or sys.stdout
    # Not a terminal (a pipe, a log): wide enough that the envelope columns are not squeezed.
    console = Console(file=stream, soft_wrap=False, width=None if stream.isatty() else 160)
    return asyncio.run(amain(options, console))


if __name__ == "__main__":
    sys.exit(main())
