"""One worker of `edgemeter serve --workers N`: the lean runner with the meter, serving the
listening sockets its supervisor bound (inherited, never bound here), with its spool worker-<i>
and its admin endpoint on the supervisor's private listener for it (edgemeter.supervisor).

A deliberate dependency on mitmproxy's internals, proven against mitmproxy 12.2.3 (PROVEN_MITMPROXY;
tests/test_worker.py): its TCP proxy servers are `AsyncioServerInstance`s whose `_start` calls
`self.listen(host, port)` for a list of objects with `sockets` and `close()`, and whose
`handle_stream(reader, writer)` serves one connection. `listen_on` replaces `listen` in the worker
process, for the proxy modes the supervisor bound, with servers over the inherited sockets.
"""

# mypy: disallow-untyped-calls=False
# (mitmproxy's server instances and main carry no annotations)
from __future__ import annotations

import asyncio
import ctypes
import errno
import inspect
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from mitmproxy.proxy import mode_servers
from mitmproxy.tools import main as mitmproxy_main
from mitmproxy.version import VERSION

from edgemeter import serve
from edgemeter.addon import Meter

logger = logging.getLogger(__name__)

PROVEN_MITMPROXY: Final = "12.2.3"
# What the supervisor hands a worker, in its environment (JSON): its index, the supervisor's
# pid, the inherited descriptors (proxy listeners by mode, its admin listener) and the runner's
# arguments, which stay off the command line (a --set password would show in `ps`).
HANDOFF_VARIABLE: Final = "_EDGEMETER_WORKER"
# Accept errors that mean "out of descriptors or memory now": stop accepting for a while (as
# asyncio's own servers do) rather than spin on a socket that stays readable.
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_PAUSE_S: Final = 1.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def proven() -> bool:
    """Whether this mitmproxy is the release `listen_on` was proven against."""
    listen = mode_servers.AsyncioServerInstance.listen
    params = list(inspect.signature(listen).parameters)
    return VERSION == PROVEN_MITMPROXY and params == ["self", "host", "port"]


class InheritedServer:
    """What mitmproxy keeps of a listener (`sockets`, `close()`), over a socket bound by the
    supervisor and shared by every worker.

    A connection is taken one per turn of the event loop, where asyncio's servers take all that
    are waiting: a busy worker then leaves new connections to an idle one (the one that gets to
    accept() first), and a burst of connections spreads over the workers instead of going to the
    first one awake."""

    def __init__(self, sock: socket.socket, handle: Handler) -> None:
        sock.setblocking(False)
        self.sockets = [sock]
        self._sock = sock
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up: nothing to do
        except OSError as e:
            if e.errno not in _RESOURCE_ERRORS:
                raise
            logger.error(f"cannot accept connections for {_ACCEPT_PAUSE_S:g}s: {e}")
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(_ACCEPT_PAUSE_S, self._resume)
            return
        conn.setblocking(False)
        task = self._loop.create_task(self._serve(conn))
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        await self._handle(reader, writer)

    def close(self) -> None:
        """Stop accepting (connections being served go on, as with asyncio's servers)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def listen_on(listeners: Mapping[str, Sequence[socket.socket]]) -> Callable[[], None]:
    """From now on, in this process, mitmproxy's proxy server of each mode (by its full spec)
    serves the given listening sockets instead of binding its own; other modes bind as usual.
    Returns the undo. Each start gets its own duplicates: a server stopped and started again
    (an option change) finds them open."""
    original = mode_servers.AsyncioServerInstance.listen

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        socks = listeners.get(self.mode.full_spec)
        if not socks:
            return await original(self, host, port)
        return [InheritedServer(sock.dup(), self.handle_stream) for sock in socks]

    mode_servers.AsyncioServerInstance.listen = listen  # type: ignore[method-assign]

    def undo() -> None:
        mode_servers.AsyncioServerInstance.listen = original  # type: ignore[method-assign]

    return undo


def worker_master(index: int, admin: socket.socket) -> type[serve.LeanMaster]:
    """The lean runner whose meter is worker `index` (its spool, its admin listener)."""

    class WorkerMaster(serve.LeanMaster):
        def make_meter(self) -> Meter:
            return Meter(worker=index, admin_socket=admin)

        async def running(self) -> None:
            await super().running()
            # An error logged during startup makes mitmproxy exit right after this (errorcheck):
            # such a worker must never tell its supervisor it serves.
            errorcheck = self.addons.get("errorcheck")
            if errorcheck is not None and errorcheck.logger.has_errored:
                return
            meter = self.addons.get("meter")
            if isinstance(meter, Meter):
                meter.serve_admin()
                spool = meter.spool.directory if meter.spool is not None else "?"
                logger.info(f"worker {index} (pid {os.getpid()}) serving; its spool: {spool}")

    WorkerMaster.__name__ = WorkerMaster.__qualname__ = f"WorkerMaster{index}"
    return WorkerMaster


def _die_with(supervisor: int) -> None:
    """Linux: SIGTERM to this worker when its supervisor ends, however it ends (SIGKILL, OOM),
    so a worker never outlives its group (it drains its spool and exits)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != supervisor:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    """A worker process: `python -m edgemeter.worker`, started by the supervisor only."""
    text = os.environ.pop(HANDOFF_VARIABLE, None)
    if text is None:
        print("edgemeter.worker is started by `edgemeter serve --workers N`", file=sys.stderr)
        return 2
    handoff = json.loads(text)
    _die_with(int(handoff["supervisor"]))
    listeners = {
        spec: [socket.socket(fileno=fd) for fd in fds] for spec, fds in handoff["listeners"].items()
    }
    listen_on(listeners)
    admin = socket.socket(fileno=handoff["admin"])
    master = worker_master(int(handoff["index"]), admin)
    mitmproxy_main.run(master, serve.make_parser, list(handoff["args"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
