"""How a burst of connections spreads over worker processes serving one port, three ways: one
listening socket shared, accepted as asyncio's servers do (every connection waiting, per wake-up)
or one per wake-up (edgemeter.worker.InheritedServer); or one socket per worker (SO_REUSEPORT).

    python -m tools.accept_spread [--workers 2] [--clients 64] [--trials 30] [--busy-ms 2]

Each trial opens `clients` connections at once, as wrk does when it starts, and asks each which
worker took it; a worker spends `busy-ms` of CPU per connection it takes (setting up a proxied
connection is not free). Prints the mean and worst share of the busiest worker per way
(docs/PERFORMANCE.md, "More than one core").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence

WAYS = ("shared-all", "shared-one", "reuseport")


def _busy(ms: float) -> None:
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


async def _serve(index: int, sock: socket.socket, way: str, busy_ms: float) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    def take() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            _busy(busy_ms)
            conn.setblocking(True)
            conn.sendall(bytes([index]))
            conn.close()
            if way == "shared-one":
                return  # the next one on a later turn of the loop

    loop.add_reader(sock.fileno(), take)
    await asyncio.Event().wait()


def _worker(index: int, fd: int, port: int, way: str, busy_ms: float) -> None:
    if way == "reuseport":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
    else:
        sock = socket.socket(fileno=fd)
    asyncio.run(_serve(index, sock, way, busy_ms))


async def _burst(port: int, clients: int) -> Counter[int]:
    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await reader.read(1)
        writer.close()
        return data[0]

    return Counter(await asyncio.gather(*(one() for _ in range(clients))))


def measure(way: str, workers: int, clients: int, trials: int, busy_ms: float) -> list[float]:
    """The busiest worker's share of each trial's connections."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if way == "reuseport":
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if way != "reuseport":
        listener.listen(1024)
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                _worker(index, listener.fileno(), port, way, busy_ms)
            finally:
                os._exit(0)
        pids.append(pid)
    if way == "reuseport":
        listener.close()  # bound only to hold the port until the workers bound theirs
        time.sleep(0.5)
    shares = []
    try:
        time.sleep(0.5)
        for _ in range(trials):
            counts = asyncio.run(_burst(port, clients))
            shares.append(max(counts.values()) / clients)
            time.sleep(0.05)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        listener.close()
    return shares


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.accept_spread", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--busy-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(
        f"{args.workers} workers, bursts of {args.clients} connections, {args.trials} trials, "
        f"{args.busy_ms:g} ms of CPU per connection taken; load {os.getloadavg()[0]:.2f}"
    )
    print("| way | busiest worker's share, mean | worst |")
    print("|---|---:|---:|")
    for way in WAYS:
        shares = measure(way, args.workers, args.clients, args.trials, args.busy_ms)
        print(f"| {way} | {statistics.mean(shares):.0%} | {max(shares):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
