"""A worker's side of the group, against the installed mitmproxy's own server instances: the proxy
server of a mode serves the socket the supervisor bound (the internals it relies on, proven on
this release), takes one waiting connection per turn of the loop, and can start again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy.proxy import mode_servers
from mitmproxy.test import taddons

from edgemeter import worker
from edgemeter.worker import InheritedServer, listen_on

SPEC = "reverse:http://127.0.0.1:9"


class Manager:
    """What a server instance asks of its manager (the handlers here register nothing)."""

    def __init__(self) -> None:
        self.connections: dict[Any, Any] = {}

    @contextlib.contextmanager
    def register_connection(self, connection_id: Any, handler: Any) -> Iterator[None]:
        self.connections[connection_id] = handler
        try:
            yield
        finally:
            del self.connections[connection_id]


@pytest.fixture
def inherited() -> Iterator[socket.socket]:
    """A listening socket as the supervisor binds it, served for SPEC from now on."""
    sock = socket.create_server(("127.0.0.1", 0))
    undo = listen_on({SPEC: [sock]})
    try:
        yield sock
    finally:
        undo()
        sock.close()


def test_this_mitmproxy_is_the_release_the_workers_were_proven_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker.proven()
    monkeypatch.setattr(worker, "VERSION", "99.0.0")
    assert not worker.proven()


async def test_a_mode_serves_the_socket_it_was_given_and_again_after_a_restart(
    inherited: socket.socket,
) -> None:
    served: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.readline())
        writer.close()

    with taddons.context():
        instance: Any = mode_servers.ServerInstance.make(SPEC, Manager())
        instance.handle_stream = handle
        for attempt in (b"first\n", b"second\n"):
            await instance.start()
            assert instance.listen_addrs == (inherited.getsockname(),)
            _, writer = await asyncio.open_connection(*inherited.getsockname())
            writer.write(attempt)
            await writer.drain()
            for _ in range(200):
                if len(served) == (1 if attempt == b"first\n" else 2):
                    break
                await asyncio.sleep(0.01)
            writer.close()
            await instance.stop()  # closes its own duplicate: the supervisor's stays open
        assert inherited.fileno() >= 0
    assert served == [b"first\n", b"second\n"]


async def test_a_mode_it_was_not_given_binds_as_mitmproxy_does(inherited: socket.socket) -> None:
    with taddons.context() as tctx:
        tctx.options.listen_host = "127.0.0.1"
        tctx.options.listen_port = 0
        instance: Any = mode_servers.ServerInstance.make("reverse:http://127.0.0.1:10", Manager())
        await instance.start()
        try:
            [(host, port)] = instance.listen_addrs
            assert host == "127.0.0.1" and port not in (0, inherited.getsockname()[1])
        finally:
            await instance.stop()


async def test_a_worker_takes_one_waiting_connection_per_readiness_of_the_socket() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = socket.create_server(("127.0.0.1", 0))
    # Three connections wait in the kernel's queue before the worker looks.
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    server = InheritedServer(listener.dup(), handle)
    try:
        server._accept()  # what one readiness event of the socket runs (asyncio's: all three)
        left = 0
        while True:  # another worker looking now finds the rest
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            conn.close()
            left += 1
        assert left == 2
    finally:
        server.close()
        listener.close()
        for client in clients:
            client.close()
