"""CPU per envelope of a Spool and its Publisher against a real nats-server (file-storage
JetStream), old tree against new in alternated rounds (docs/PERFORMANCE.md).

    python tools/publish_cost.py --old /tmp/old-tree [--rounds 4] [--modes c1,cycle,c16]

Each round runs one child process per tree (PYTHONPATH=<tree>, so `spool` is that tree's) and
reads `time.process_time` (all threads: the loop, nats-py, the spool's writer) around N envelopes
of ~800 bytes, from the first submit until the last delete has committed. Modes:
  c1     one envelope at a time, its commit awaited, then `--pace-ms` idle (a client's pace);
         the default linger gathers them into batches
  cycle  linger 0, one envelope at a time, its commit and then its ack awaited: every envelope
         its own publish, ack and delete
  c16    16 envelopes at a time, their commits awaited, default linger
`--callgrind` runs each child under valgrind and reports instructions (Ir) per envelope of the
measured section instead (toggled with callgrind_control, the broker outside valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
SUBJECT = "catalyst.usage.recorded"
FLOOR = Path("floor")


def _key(n: int) -> str:
    # A uuid7-shaped, time-ordered key of the same length as the meter's request ids.
    ms = time.time_ns() // 1_000_000
    return f"{ms & 0xFFFFFFFF:08x}-{ms >> 32:04x}-7{os.getpid() % 4096:03x}-8000-{n:012x}"


def _envelope(key: str) -> bytes:
    head = b'{"specversion":"1.0","id":"%s","type":"catalyst.usage.recorded",' % key.encode()
    return head + b'"data":{"pad":"' + b"x" * (800 - len(head) - 20) + b'"}}'


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    from spool import NatsConfig, Publisher, Spool

    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # as mitmproxy runs its loop
    linger = 0 if args.mode == "cycle" else 250
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp) / "spool")
        spool.open()
        config = NatsConfig(servers=(args.url,), subject=SUBJECT, linger_ms=linger)
        publisher = Publisher(spool, config)
        acked = 0
        waiter: asyncio.Future[None] | None = None
        target = 0

        def on_ack(_seconds: float) -> None:
            nonlocal acked, waiter
            acked += 1
            if waiter is not None and acked >= target and not waiter.done():
                waiter.set_result(None)

        publisher.on_ack = on_ack
        if not args.floor:
            publisher.start()
        counter = 0

        async def run(count: int) -> None:
            nonlocal counter, waiter, target
            if args.mode == "c16":
                for _ in range(count // 16):
                    keys = [_key(counter + i) for i in range(16)]
                    counter += 16
                    await asyncio.gather(*(spool.enqueue(k, _envelope(k)) for k in keys))
                    if args.pace_ms:
                        await asyncio.sleep(args.pace_ms / 1000)
            else:
                for _ in range(count):
                    key = _key(counter)
                    counter += 1
                    if args.mode == "cycle" and not args.floor:
                        target = acked + 1
                        waiter = loop.create_future()
                        await spool.enqueue(key, _envelope(key))
                        await waiter
                    else:
                        await spool.enqueue(key, _envelope(key))
                        if args.pace_ms:
                            await asyncio.sleep(args.pace_ms / 1000)
            target = counter
            if args.floor:
                return
            if acked < target:
                waiter = loop.create_future()
                await waiter
            while spool.held_bytes:
                await asyncio.sleep(0.02)

        await run(args.warmup)
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True)
        profile = None
        if args.profile:
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        began_cpu, began = time.process_time(), time.perf_counter()
        await run(args.count)
        cpu, wall = time.process_time() - began_cpu, time.perf_counter() - began
        if profile is not None:
            import pstats

            profile.disable()
            stats = pstats.Stats(profile, stream=sys.stderr)
            stats.sort_stats(args.profile).print_stats(45)
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True)
        left = await publisher.stop(1.0) if not args.floor else 0
        spool.close()
    return {
        "cpu_us": cpu / args.count * 1e6,
        "wall_s": wall,
        "left": left,
        "duplicates": publisher.stats.duplicates,
    }


def _run_child(tree: Path, mode: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(HERE), "--child", "--mode", mode, "--url", url]
    command += ["--count", str(args.count), "--warmup", str(args.warmup)]
    command += ["--pace-ms", str(args.pace_ms if mode == "c1" else 0)]
    if tree == FLOOR:
        command += ["--floor"]
        env["PYTHONPATH"] = str(args.new)
    out_file = None
    if args.callgrind:
        out_file = Path(tempfile.mkdtemp()) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_file}",
            *command,
            "--callgrind",
        ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if out_file is not None:
        total = 0
        for line in out_file.read_text().splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
        result["ir"] = total / args.count
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path, help="the tree to compare against")
    parser.add_argument("--new", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="c1,cycle,c16")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--pace-ms", type=float, default=1.0)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--with-floor", action="store_true", help="also run without a publisher")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--profile", default="", help="child: cProfile, sorted by this key")
    parser.add_argument("--floor", action="store_true", help="spool writes only, no publisher")
    parser.add_argument("--mode", default="c1")
    parser.add_argument("--url", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args))))
        return

    sys.path.insert(0, str(ROOT))
    from tools.harness import NatsServer
    from tools.streams import ensure_stream

    trees = {"new": args.new} if args.old is None else {"old": args.old, "new": args.new}
    if args.with_floor:
        trees["floor"] = FLOOR
    metric = "ir" if args.callgrind else "cpu_us"
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "js")
        server.start()
        try:
            asyncio.run(ensure_stream(server.url))
            for mode in args.modes.split(","):
                seen: dict[str, list[float]] = {name: [] for name in trees}
                for _ in range(args.rounds):
                    for name, tree in trees.items():
                        result = _run_child(tree, mode, server.url, args)
                        if result["left"]:
                            raise RuntimeError(f"{name} {mode}: {result}")
                        seen[name].append(result[metric])
                        print(f"  {mode} {name}: {result}", file=sys.stderr, flush=True)
                summary = ", ".join(
                    f"{name} {statistics.median(values):,.0f}" for name, values in seen.items()
                )
                print(f"{mode}: {metric} per envelope, median of {args.rounds}: {summary}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
