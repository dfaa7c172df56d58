"""`edgemeter serve --workers N`: a supervisor process and N workers (edgemeter.worker), each the
lean runner on one core, serving one listening socket the supervisor bound; one admin endpoint.

mitmproxy serves every connection from one event loop, so one process uses one core. The
supervisor reads the options as the runner does, binds the proxy's listening sockets (a port
taken fails here, before any worker starts) and hands them to every worker, which accept from
them directly: the kernel's accept queue is shared, so a worker that dies loses no connection
waiting there. Each worker has its own spool, `<meter_spool_dir>/worker-<i>`; a spool nobody
publishes (its worker gone, N lowered, a single meter's before the group) is adopted by a worker
that runs (edgemeter.adoption). A worker that exits is started again, after a backoff that
grows while it keeps failing. SIGTERM goes to every worker, each finishes its requests and
drains its spool (meter_shutdown_grace_ms + meter_shutdown_drain_ms), and the supervisor exits 0.

Its admin endpoint (meter_admin_listen) speaks for the group: /metrics sums the workers'
(edgemeter.aggregate; /metrics?worker=I is one worker's own), /healthz and /readyz list every
worker. It asks each worker's own endpoint, served on a private loopback listener the
supervisor bound for it and hands over with the proxy's sockets.
"""

# mypy: disallow-untyped-calls=False
# (mitmproxy's options, addon manager and command-line helpers carry no annotations)
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST

from edgemeter import aggregate, worker
from edgemeter.admin import Endpoint, Response, bind
from edgemeter.aggregate import Families, Family
from edgemeter.errors import MeterError, SettingsError, WorkersError
from edgemeter.options import OPTIONS
from edgemeter.serve import WORKERS_FLAG
from edgemeter.settings import Settings, parse_settings

logger = logging.getLogger("edgemeter.supervisor")

# The proxy's listening sockets: the kernel's queue of connections not accepted yet, shared by
# the workers (asyncio's servers ask for 100).
_BACKLOG: Final = 1024
# Each worker's own admin endpoint is asked this often (/readyz: its answer is its liveness
# too), and given this long to answer.
_POLL_S: Final = 1.0
_ASK_TIMEOUT_S: Final = 3.0
# /healthz fails once a worker slot has not answered for this long: a worker that hangs, or one
# that keeps failing to start (the restart backoff is capped well below it).
_LIVENESS_S: Final = 60.0
_BACKOFF_FIRST_S: Final = 0.5
_BACKOFF_CAP_S: Final = 15.0
# A worker that ran this long before it exited starts again after the first backoff.
_STABLE_S: Final = 30.0
# On SIGTERM, beyond the workers' grace and drain: mitmproxy's own teardown, and the slack of
# a machine under load.
_EXIT_MARGIN_S: Final = 10.0
_TEXT: Final = "text/plain; charset=utf-8"


def take_workers(args: Sequence[str]) -> tuple[int, list[str]]:
    """`--workers N` (or `--workers=N`) taken out of the runner's arguments; 1 when absent."""
    rest: list[str] = []
    count = 1
    items = iter(args)
    for arg in items:
        if arg == WORKERS_FLAG or arg.startswith(WORKERS_FLAG + "="):
            value = arg.partition("=")[2] if "=" in arg else next(items, "")
            if not value.isdigit() or int(value) < 1:
                raise WorkersError(f"{WORKERS_FLAG} takes a positive integer", value=value)
            count = int(value)
        else:
            rest.append(arg)
    return count, rest


# --- what the group runs: the options, read as the runner reads them ------------------------


@dataclass(frozen=True)
class Plan:
    """The proxy modes to bind, where, and the meter's settings, from the runner's arguments
    and the confdir's config.yaml, as a worker will read them."""

    modes: tuple[Any, ...]  # mitmproxy ProxyMode
    listen_host: str | None
    listen_port: int | None
    settings: Settings


class _MeterOptions:
    """The meter's options declared, and nothing else: the supervisor only reads them."""

    def load(self, loader: Any) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.one_paragraph)


@contextlib.contextmanager
def _offline_master() -> Iterator[None]:
    """Masters built here are read, never run: what they change of mitmproxy's global context
    and of the root logger (handlers forwarding to their loop, closed by then) is put back."""
    from mitmproxy import ctx

    saved = {n: getattr(ctx, n) for n in ("master", "options", "log") if hasattr(ctx, n)}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        for name, value in saved.items():
            setattr(ctx, name, value)


def read_plan(args: Sequence[str]) -> Plan:
    """The runner's options, parsed as mitmproxy's main parses them for the lean runner, with
    no addon acting on them; WorkersError for what a worker would refuse at startup."""
    from mitmproxy import exceptions, optmanager
    from mitmproxy import options as mitmproxy_options
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.tools import main as mitmproxy_main

    from edgemeter import serve

    async def read() -> Any:
        opts = mitmproxy_options.Options()
        master = serve.CoreMaster(opts)
        # Options are only read here: no addon configures itself (no script is loaded, no
        # spool opened); the workers do that.
        opts.changed.disconnect(master.addons._configure_all)
        master.addons.add(_MeterOptions())
        parser = serve.make_parser(opts)
        parsed = parser.parse_args(list(args))
        opts.set(*parsed.setoptions, defer=True)
        optmanager.load_paths(
            opts,
            os.path.join(opts.confdir, "config.yaml"),
            os.path.join(opts.confdir, "config.yml"),
        )
        mitmproxy_main.process_options(parser, opts, parsed)
        return opts

    with _offline_master():
        try:
            opts = asyncio.run(read())
        except exceptions.OptionsError as e:
            raise WorkersError(str(e)) from None
    try:
        modes = tuple(ProxyMode.parse(spec) for spec in opts.mode)
    except ValueError as e:
        raise WorkersError(f"not a proxy mode: {e}") from None
    for mode in modes:
        if mode.transport_protocol != "tcp":
            raise WorkersError(
                "workers share TCP listeners only: run this mode with one process",
                mode=mode.full_spec,
            )
    try:
        settings = parse_settings({o.name: getattr(opts, o.name) for o in OPTIONS})
    except SettingsError as e:
        option = e.fields.get("option", "meter")
        shown = f"{option}={e.fields['value']!r}" if "value" in e.fields else str(option)
        raise WorkersError(f"{shown}: {e.message}") from None
    return Plan(modes, opts.listen_host, opts.listen_port, settings)


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host:port` as asyncio's servers (and so mitmproxy) bind them: one
    per address of the host ("" every interface: IPv4 and IPv6), one port for all of them."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # the port the first one was given
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:  # the family is not enabled (as asyncio)
                    socks.pop().close()
                    continue
                raise
            sock.listen(_BACKLOG)
        if not socks:
            raise OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


# --- the group ------------------------------------------------------------------------------


@dataclass
class Slot:
    """Worker `index`: its process now, what it last said, what its predecessors counted."""

    index: int
    # Its own admin endpoint's listener, bound by the supervisor, inherited by each incarnation.
    admin: socket.socket
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    # Monotonic time of its last answer (0: none since the supervisor started).
    answered_at: float = 0.0
    # Answered since its last start; ready by its last answer, and why not.
    up: bool = False
    ready: bool = False
    reasons: str = ""
    ever_up: bool = False
    restarts: int = 0
    last_exit: str = ""
    # Its last /metrics, and the cumulative figures of its incarnations that are gone.
    last: Families | None = None
    retired: Families = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def admin_port(self) -> int:
        return int(self.admin.getsockname()[1])

    def retire(self) -> None:
        """Its process ended: keep what it counted, forget what it said."""
        if self.last is not None:
            self.retired = aggregate.combine([], [self.retired, self.last])
        self.last = None
        self.up = self.ready = False


async def ask(port: int, path: str, timeout: float = _ASK_TIMEOUT_S) -> tuple[int, bytes]:
    """GET one path of a worker's admin endpoint on loopback: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            data = await reader.read()  # the endpoint closes after one answer
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(status_line[1]), body


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class GroupEndpoint(Endpoint):
    """The group's admin endpoint: the supervisor answers for its workers."""

    def __init__(self, sock: socket.socket, supervisor: Supervisor) -> None:
        super().__init__(sock)
        self.supervisor = supervisor

    async def respond(self, method: str, path: str) -> Response:
        path, _, query = path.partition("?")
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"only GET\n"
        if path == "/healthz":
            return self.supervisor.health()
        if path == "/readyz":
            return self.supervisor.readiness()
        if path == "/metrics":
            one = dict(p.partition("=")[::2] for p in query.split("&") if p).get("worker")
            if one is not None:
                return await self.supervisor.worker_metrics(one)
            return 200, CONTENT_TYPE_LATEST, await self.supervisor.metrics()
        return 404, _TEXT, b"not found: try /healthz, /readyz, /metrics (?worker=I)\n"


class Supervisor:
    def __init__(
        self,
        count: int,
        args: Sequence[str],
        plan: Plan,
        listeners: dict[str, list[socket.socket]],
        admin: socket.socket | None,
        worker_admins: list[socket.socket],
    ) -> None:
        self.count = count
        self.args = list(args)
        self.plan = plan
        self.listeners = listeners
        self.slots = [Slot(i, sock) for i, sock in enumerate(worker_admins)]
        self.endpoint = GroupEndpoint(admin, self) if admin is not None else None
        self.exit_code = 0
        # Every slot has had a worker serving once: from then on a worker that exits is
        # restarted; before, it failed to start, and the group stops.
        self.started = False
        self.stopping = False
        self._stop = asyncio.Event()
        self._began = 0.0

    def stop(self) -> None:
        self.stopping = True
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self._began = time.monotonic()
        if self.endpoint is not None:
            await self.endpoint.start()
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        poller = asyncio.create_task(self._poll())
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            for task in (*keepers, poller):
                task.cancel()
            await asyncio.gather(*keepers, poller, return_exceptions=True)
            if self.endpoint is not None:
                await self.endpoint.stop()
        return self.exit_code

    # -- workers -----------------------------------------------------------------------------

    def _handoff(self, slot: Slot) -> dict[str, Any]:
        return {
            "index": slot.index,
            "supervisor": os.getpid(),
            "listeners": {
                spec: [sock.fileno() for sock in socks] for spec, socks in self.listeners.items()
            },
            "admin": slot.admin.fileno(),
            "args": self.args,
        }

    async def _start(self, slot: Slot) -> None:
        fds = [s.fileno() for socks in self.listeners.values() for s in socks]
        env = dict(os.environ) | {worker.HANDOFF_VARIABLE: json.dumps(self._handoff(slot))}
        slot.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgemeter.worker",
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=[*fds, slot.admin.fileno()],
        )
        slot.started_at = time.monotonic()
        slot.up = slot.ready = False
        logger.info(f"worker {slot.index} started (pid {slot.process.pid})")

    async def _keep(self, slot: Slot) -> None:
        """Keep worker `slot` running until the group stops."""
        backoff = _BACKOFF_FIRST_S
        while not self.stopping:
            try:
                await self._start(slot)
            except OSError as e:  # no process now (out of memory or pids): try again later
                slot.process, slot.last_exit = None, f"start failed: {e}"
                slot.started_at = time.monotonic()
                logger.error(f"worker {slot.index} cannot start: {e}")
            else:
                assert slot.process is not None
                code = await slot.process.wait()
                slot.retire()
                slot.last_exit = _exit_text(code)
            if self.stopping:
                return
            pid = f"pid {slot.process.pid}" if slot.process is not None else "no process"
            if not self.started and not slot.ever_up:
                logger.error(
                    f"worker {slot.index} ({pid}) failed to start ({slot.last_exit}): "
                    "stopping the group"
                )
                self.exit_code = 1
                self.stop()
                return
            if time.monotonic() - slot.started_at >= _STABLE_S:
                backoff = _BACKOFF_FIRST_S
            logger.warning(
                f"worker {slot.index} ({pid}) exited ({slot.last_exit}); "
                f"starting it again in {backoff:g}s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_CAP_S)
            if not self.stopping:
                slot.restarts += 1

    async def _poll(self) -> None:
        while True:
            await asyncio.gather(*(self._check(s) for s in self.slots if s.running))
            await asyncio.sleep(_POLL_S)

    async def _check(self, slot: Slot) -> None:
        process = slot.process
        try:
            status, body = await ask(slot.admin_port, "/readyz")
        except (OSError, TimeoutError, ValueError):
            return
        if slot.process is not process or not slot.running:
            return  # an answer of a worker that is gone since
        slot.answered_at = time.monotonic()
        slot.ready = status == 200
        slot.reasons = body.decode("utf-8", "replace").strip().removeprefix("not ready: ")
        if not slot.up:
            slot.up = slot.ever_up = True
            assert process is not None
            logger.info(f"worker {slot.index} (pid {process.pid}) is serving")
            if not self.started and all(s.ever_up for s in self.slots):
                self.started = True
                logger.info(f"all {self.count} workers are serving")

    async def _shutdown(self) -> None:
        settings = self.plan.settings
        allowed = (settings.shutdown_grace_ms + settings.shutdown_drain_ms) / 1000
        running = [s for s in self.slots if s.running]
        logger.info(
            f"stopping {len(running)} workers: requests in flight get "
            f"{settings.shutdown_grace_ms / 1000:g}s, the spools' drain "
            f"{settings.shutdown_drain_ms / 1000:g}s"
        )
        for slot in running:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGTERM)
        waits = {s.index: asyncio.ensure_future(s.process.wait()) for s in running if s.process}
        if waits:
            await asyncio.wait(waits.values(), timeout=allowed + _EXIT_MARGIN_S)
        for slot in running:
            assert slot.process is not None
            if slot.process.returncode is None:
                logger.error(
                    f"worker {slot.index} (pid {slot.process.pid}) did not exit within "
                    f"{allowed + _EXIT_MARGIN_S:g}s: killing it (its spool keeps what is left)"
                )
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
                await slot.process.wait()
                self.exit_code = 1
                continue
            code = slot.process.returncode
            # Stopped before it served: it had nothing to finish (its spool keeps its own).
            cut_short = code == -signal.SIGTERM and not slot.up
            if code != 0 and not cut_short:
                logger.error(f"worker {slot.index} ended with {_exit_text(code)}")
                self.exit_code = 1

    # -- what the admin endpoint says --------------------------------------------------------

    def _state(self, slot: Slot) -> str:
        pid = f"pid {slot.process.pid}" if slot.running and slot.process else "no process"
        if slot.up:
            state = "ready" if slot.ready else f"not ready: {slot.reasons}"
        elif slot.running:
            state = "starting"
        else:
            state = f"restarting after {slot.last_exit}" if slot.last_exit else "stopped"
        restarted = f", restarted {slot.restarts}x" if slot.restarts else ""
        return f"worker {slot.index} ({pid}{restarted}): {state}"

    def health(self) -> Response:
        now = time.monotonic()
        silent = [
            (slot, now - max(slot.answered_at, self._began))
            for slot in self.slots
            if now - max(slot.answered_at, self._began) > _LIVENESS_S
        ]
        lines = "".join(self._state(slot) + "\n" for slot in self.slots)
        if silent:
            why = "; ".join(f"worker {s.index} has not answered for {t:.0f}s" for s, t in silent)
            return 503, _TEXT, f"not healthy: {why}\n{lines}".encode()
        return 200, _TEXT, f"ok\n{lines}".encode()

    def readiness(self) -> Response:
        up = [slot for slot in self.slots if slot.up]
        reasons = [f"worker {slot.index}: {slot.reasons}" for slot in up if not slot.ready]
        if not up:
            reasons.append("no worker is serving yet" if not self.started else "no worker serves")
        lines = "".join(self._state(slot) + "\n" for slot in self.slots)
        if reasons:
            return 503, _TEXT, f"not ready: {'; '.join(reasons)}\n{lines}".encode()
        return 200, _TEXT, f"ready\n{lines}".encode()

    async def metrics(self) -> bytes:
        serving = [slot for slot in self.slots if slot.up]
        answers = await asyncio.gather(
            *(ask(slot.admin_port, "/metrics") for slot in serving), return_exceptions=True
        )
        for slot, answer in zip(serving, answers, strict=True):
            if isinstance(answer, BaseException) or answer[0] != 200:
                continue  # its last figures stand in (a counter never goes down)
            with contextlib.suppress(ValueError):
                slot.last = aggregate.parse(answer[1].decode("utf-8", "replace"))
        families = aggregate.combine(
            [slot.last for slot in self.slots if slot.up and slot.last is not None],
            [slot.retired for slot in self.slots],
        )
        families.update(self._own_families())
        return aggregate.render(families)

    def _own_families(self) -> Families:
        def one(name: str, kind: str, help_text: str, sample: str, value: float) -> Family:
            return Family(name, kind, help_text, {(sample, ()): float(value)})

        restarts = sum(slot.restarts for slot in self.slots)
        up = sum(1 for slot in self.slots if slot.up)
        return {
            "edgemeter_workers": one(
                "edgemeter_workers",
                "gauge",
                "Workers of the group (edgemeter serve --workers).",
                "edgemeter_workers",
                self.count,
            ),
            "edgemeter_workers_serving": one(
                "edgemeter_workers_serving",
                "gauge",
                "Workers answering their supervisor now.",
                "edgemeter_workers_serving",
                up,
            ),
            "edgemeter_worker_restarts": one(
                "edgemeter_worker_restarts",
                "counter",
                "Workers started again after they exited.",
                "edgemeter_worker_restarts_total",
                restarts,
            ),
        }

    async def worker_metrics(self, which: str) -> Response:
        slot = next((s for s in self.slots if str(s.index) == which), None)
        if slot is None:
            return 404, _TEXT, f"no worker {which}: workers are 0 to {self.count - 1}\n".encode()
        if not slot.up:
            return 503, _TEXT, (self._state(slot) + "\n").encode()
        try:
            status, body = await ask(slot.admin_port, "/metrics")
        except (OSError, TimeoutError, ValueError) as e:
            return 503, _TEXT, f"worker {slot.index} did not answer: {e!r}\n".encode()
        return status, CONTENT_TYPE_LATEST, body


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s.%(msecs)03d] supervisor: %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def supervise(count: int, args: Sequence[str]) -> int:
    """Run the group until SIGTERM/SIGINT; the exit code (1: it could not start, or a worker
    did not stop cleanly)."""
    _log_to_stderr()
    if not worker.proven():
        from mitmproxy.version import VERSION

        logger.error(
            f"{WORKERS_FLAG} needs mitmproxy {worker.PROVEN_MITMPROXY} (installed: {VERSION}): "
            "its workers serve sockets through mitmproxy internals proven on that release"
        )
        return 1
    sockets: list[socket.socket] = []
    try:
        plan = read_plan(args)
        root = plan.settings.spool_dir
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise WorkersError(
                "cannot create the spool directory", path=str(root), error=str(e)
            ) from None
        listeners: dict[str, list[socket.socket]] = {}
        for mode in plan.modes:
            host = mode.listen_host(plan.listen_host)
            port = mode.listen_port(plan.listen_port)
            try:
                listeners[mode.full_spec] = bind_tcp(host, port)
            except OSError as e:
                raise WorkersError(
                    f"cannot listen on {host or '*'}:{port}: {e.strerror or e}",
                    mode=mode.full_spec,
                ) from None
            sockets += listeners[mode.full_spec]
        admin = bind(*plan.settings.admin_listen) if plan.settings.admin_listen else None
        if admin is not None:
            sockets.append(admin)
        worker_admins = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        sockets += worker_admins
    except MeterError as e:
        logger.error(f"edgemeter serve {WORKERS_FLAG} {count}: {e}")
        for sock in sockets:
            sock.close()
        return 1
    where = ", ".join(
        f"{spec} on " + " and ".join(str(s.getsockname()[:2]) for s in socks)
        for spec, socks in listeners.items()
    )
    logger.info(f"{count} workers: {where}; spools under {root}")
    supervisor = Supervisor(count, args, plan, listeners, admin, worker_admins)
    try:
        return asyncio.run(supervisor.run())
    finally:
        for sock in sockets:
            sock.close()


__all__ = ["WORKERS_FLAG", "Plan", "Supervisor", "bind_tcp", "read_plan", "supervise"]
