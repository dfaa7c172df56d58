"""The benchmark of issue 5 (`scripts/bench`): direct upstream, plain mitmdump, mitmdump with the
meter and the lean runner, side by side in interleaved rounds; spool drain, soak, loop health.
"""

# mypy: disallow-untyped-calls=False
# (the probe talks to mitmproxy's addon manager, which carries no annotations)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgemeter.options import DEFAULTS
from tools.harness import (
    METER_ADDON,
    MITMDUMP,
    ROOT,
    GroupAdmin,
    NatsServer,
    Process,
    child_pids,
    free_port,
)
from tools.streams import STREAM, ensure_stream

PYTHON = sys.executable

# --- the fast upstream --------------------------------------------------------------------------

# An OpenAI chat completion as gateways answer it; the meter parses it like a real one.
_CHAT_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_767_225_600,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    },
    separators=(",", ":"),
).encode()
_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: keep-alive\r\n\r\n%s" % (len(_CHAT_BODY), _CHAT_BODY)
)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Cache-Control: no-cache\r\nConnection: keep-alive\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events(events: int, pad: int = 0) -> list[bytes]:
    """The SSE events of one streamed chat completion: `events` content chunks (each with `pad`
    extra characters of content), then the usage event and [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench-model"}
    text = "tok " + "x" * pad
    out = [
        _sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        for _ in range(max(events - 1, 0))
    ]
    out.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 12, "completion_tokens": events, "total_tokens": 12 + events}
    out.append(_sse({**base, "choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


class _UpstreamProtocol(asyncio.Protocol):
    """One upstream connection: HTTP/1.1 keep-alive, Content-Length request bodies."""

    def __init__(self, server: BenchUpstream) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in self.streaming:
            handle.cancel()
        self.streaming = []
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        while not self.streaming and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = _header_int(head, b"content-length", 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.server.requests += 1
            if b'"stream":true' in body.replace(b" ", b""):
                self._stream(head)
            else:
                self.transport.write(_ANSWER)

    def _stream(self, head: bytes) -> None:
        assert self.transport is not None
        events = max(_header_int(head, b"x-bench-events", 50), 2)
        interval = _header_int(head, b"x-bench-interval-ms", 20) / 1000
        chunks = self.server.chunks(events, _header_int(head, b"x-bench-pad", 0))
        # The last content event, the usage event, [DONE] and the end go out together.
        tail = b"".join(chunks[events - 1 :]) + b"0\r\n\r\n"
        self.transport.write(_STREAM_HEAD + chunks[0])
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.streaming = [
            loop.call_at(start + i * interval, self._send, chunks[i]) for i in range(1, events - 1)
        ]
        self.streaming.append(loop.call_at(start + (events - 1) * interval, self._end, tail))

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _end(self, data: bytes) -> None:
        self.streaming = []
        self._send(data)
        self._serve()  # a request that was pipelined behind the stream


def _header_int(head: bytes, name: bytes, default: int) -> int:
    """An integer header of a lower-cased request head."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return default
    start = at + len(name) + 3
    end = head.find(b"\r\n", start)
    try:
        return int(head[start : end if end >= 0 else len(head)].strip())
    except ValueError:
        return default


class BenchUpstream:
    """A fast OpenAI-compatible upstream: one canned chat completion, or an SSE stream whose
    length and pace the request's x-bench-events / x-bench-interval-ms / x-bench-pad set."""

    def __init__(self) -> None:
        self.requests = 0
        self._chunks: dict[tuple[int, int], list[bytes]] = {}

    def chunks(self, count: int, pad: int) -> list[bytes]:
        """The events of one stream, each framed as an HTTP chunk (made once per shape)."""
        key = (count, pad)
        if key not in self._chunks:
            self._chunks[key] = [_chunk(e) for e in stream_events(count, pad)]
        return self._chunks[key]

    async def serve(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _UpstreamProtocol(self), host, port, backlog=1024)


# --- the Python load generator ------------------------------------------------------------------


class _ClientProtocol(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection that parses just enough of a response: status,
    Content-Length or chunked framing; it notes when the first body byte and the end arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, float, float, int]] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.head_done = False
        self.chunked = False
        self.remaining = 0
        self.first_body_at = 0.0
        self.body_bytes = 0
        self.chunks = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-response"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, float, float, int]]:
        """Future of (status, first body byte at, end at, body chunks)."""
        if self.transport is None:
            raise ConnectionError("connection closed")
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.buf += data
        now = time.perf_counter()
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            self.status = int(head[9:12])
            self.head_done = True
            self.chunked = b"transfer-encoding: chunked" in head
            self.remaining = _header_int(head, b"content-length", 0)
        if self.buf and not self.first_body_at:
            self.first_body_at = now
        if self.chunked:
            self._chunks(now)
        elif len(self.buf) >= self.remaining:
            self.body_bytes = self.remaining
            del self.buf[: self.remaining]
            self._finish(now)

    def _chunks(self, now: float) -> None:
        while True:
            if self.remaining:
                if len(self.buf) < self.remaining + 2:
                    return
                del self.buf[: self.remaining + 2]
                self.body_bytes += self.remaining
                self.chunks += 1
                self.remaining = 0
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(self.buf) < line_end + 4:
                    return  # no trailers are sent here: the end is "0\r\n\r\n"
                del self.buf[: line_end + 4]
                self._finish(now)
                return
            del self.buf[: line_end + 2]
            self.remaining = size

    def _finish(self, now: float) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result((self.status, self.first_body_at or now, now, self.chunks))


def http_request(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# The request the load generators send: what an SDK sends, with the attribution headers the meter
# reads. A streamed one does not ask for usage, so the meter injects and strips (its default).
BENCH_HEADERS = {
    "Authorization": "Bearer sk-bench-0123456789abcdef",
    "x-tenant-id": "t_bench",
    "x-customer-id": "cus_bench",
}
CHAT_REQUEST = json.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello."}]},
    separators=(",", ":"),
).encode()
STREAM_REQUEST = json.dumps(
    {"model": "bench-model", "messages": [{"role": "user", "content": "Count."}], "stream": True},
    separators=(",", ":"),
).encode()


@dataclass
class LoadSpec:
    port: int
    concurrency: int
    duration_s: float
    stream: bool = False
    events: int = 50
    interval_ms: int = 20
    pad: int = 0
    # Stop after this many requests in all (0: run for duration_s).
    max_requests: int = 0
    # Spread the workers' first requests over one stream's length, so streams do not all start
    # (and queue in the proxy) at the same instant.
    stagger: bool = True


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def python_load(spec: LoadSpec) -> dict[str, Any]:
    """Keep `concurrency` keep-alive connections busy for `duration_s` (streams in progress
    then finish); latency is request sent to last byte, ttfb to the first body byte."""
    loop = asyncio.get_running_loop()
    headers = dict(BENCH_HEADERS)
    if spec.stream:
        headers["x-bench-events"] = str(spec.events)
        headers["x-bench-interval-ms"] = str(spec.interval_ms)
        headers["x-bench-pad"] = str(spec.pad)
    request = http_request(spec.port, STREAM_REQUEST if spec.stream else CHAT_REQUEST, headers)
    latencies: list[float] = []
    ttfb: list[float] = []
    chunks = 0
    errors = 0
    non2xx = 0
    started = 0
    start = time.perf_counter()
    deadline = start + spec.duration_s

    async def worker(i: int) -> None:
        conn: _ClientProtocol | None = None
        if spec.stream and spec.stagger:
            await asyncio.sleep(i * spec.events * spec.interval_ms / 1000 / spec.concurrency)
        try:
            while time.perf_counter() < deadline:
                if spec.max_requests and started >= spec.max_requests:
                    return
                conn = await one(conn)
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    async def one(conn: _ClientProtocol | None) -> _ClientProtocol | None:
        nonlocal chunks, errors, non2xx, started
        started += 1
        try:
            if conn is None or conn.transport is None:
                _, conn = await loop.create_connection(_ClientProtocol, "127.0.0.1", spec.port)
            sent = time.perf_counter()
            status, first, end, n = await conn.send(request)
        except (OSError, ValueError):
            errors += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            await asyncio.sleep(0.01)
            return None
        if not 200 <= status < 300:
            non2xx += 1
        latencies.append(end - sent)
        ttfb.append(first - sent)
        chunks += n
        return conn

    await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    elapsed = time.perf_counter() - start
    ms = 1000.0
    return {
        "tool": "python",
        "requests": len(latencies),
        "errors": errors,
        "non2xx": non2xx,
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(latencies, 50) * ms,
        "p99_ms": _percentile(latencies, 99) * ms,
        "ttfb_p50_ms": _percentile(ttfb, 50) * ms,
        "ttfb_p99_ms": _percentile(ttfb, 99) * ms,
        "chunks": chunks,
    }


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"errors\\":%%d,\\"non2xx\\":%%d," ..
    "\\"p50_us\\":%%d,\\"p99_us\\":%%d}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(path: Path) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in BENCH_HEADERS.items())
    path.write_text(_WRK_SCRIPT % {"body": CHAT_REQUEST.decode(), "headers": headers})
    return path


def wrk_load(
    wrk: str, script: Path, port: int, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One wrk run (one thread: the machine's other core is the proxy's)."""
    args = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "-s", str(script)]
    args += ["--timeout", "10s", f"http://127.0.0.1:{port}/v1/chat/completions"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 60).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no figures:\n{out}")
    figures = json.loads(line[len("WRKJSON ") :])
    elapsed = figures["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "requests": figures["requests"],
        "errors": figures["errors"],
        "non2xx": figures["non2xx"],
        "elapsed_s": elapsed,
        "rps": figures["requests"] / elapsed if elapsed else 0.0,
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "ttfb_p50_ms": float("nan"),
        "ttfb_p99_ms": float("nan"),
        "chunks": 0,
    }


# --- processes ----------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat): whose
    work it was, the bench does not know, so its own processes are subtracted from it."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the loop probe (loaded with -s into the processes measured for event-loop health) ----------

PROBE_SCRIPT = """from tools.bench import LoopProbe

addons = [LoopProbe()]
"""


def _describe_handle(handle: asyncio.events.Handle) -> str:
    """What a loop callback ran: the coroutine of a task step, else the callback itself."""
    owner = getattr(getattr(handle, "_callback", None), "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task step of {getattr(coro, '__qualname__', coro)!s}"
    return repr(handle)[:300]


_METER_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")


class LoopProbe:
    """Measures, inside a proxy process: how late a 1 ms sleep wakes up (loop lag), the CPU time
    of every event-loop callback, and the CPU time of each meter hook and stream-callable call
    (the part of a callback that is the meter's). The bench steers it with files next to
    bench_probe_out: `.go` starts the measured window, `.stop` ends it and writes the figures."""

    def __init__(self) -> None:
        self.lag: list[float] = []
        self.callbacks: list[float] = []
        self.meter: list[float] = []
        # The same meter calls less the garbage collections that ran inside them: a collection
        # runs in whatever code allocates, and its pauses are listed apart (gc_pauses).
        self.meter_own: list[float] = []
        self.gc_pauses: list[float] = []
        self._gc_total = 0.0
        self._gc_started = 0.0
        self.active = True
        # The longest callback and what it was, for whoever has to find out why.
        self.longest: tuple[float, str] = (0.0, "")
        self._task: asyncio.Task[None] | None = None
        self._restore: list[Callable[[], None]] = []

    def load(self, loader: Any) -> None:
        loader.add_option("bench_probe_out", str, "", "Where the loop probe writes its figures.")

    def running(self) -> None:
        from mitmproxy import ctx

        self._task = asyncio.get_running_loop().create_task(self._lag(ctx.options.bench_probe_out))
        self._time_callbacks()
        self._time_meter()
        self._time_gc()

    def _time_gc(self) -> None:
        import gc

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._gc_started = time.thread_time()
            else:
                took = time.thread_time() - self._gc_started
                self._gc_total += took
                self.gc_pauses.append(took)

        gc.callbacks.append(on_gc)
        self._restore.append(lambda: gc.callbacks.remove(on_gc))

    async def _lag(self, out: str) -> None:
        go, stop = Path(out + ".go"), Path(out + ".stop")
        waiting = True
        n = 0
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lag.append(time.perf_counter() - start - 0.001)
            n += 1
            if not out or n % 64:
                continue
            if waiting and go.exists():
                # The measured window starts: forget startup and warm-up.
                waiting = False
                self.lag.clear()
                self.callbacks.clear()
                self.meter.clear()
                self.meter_own.clear()
                self.gc_pauses.clear()
                self.longest = (0.0, "")
            elif stop.exists():
                # Before shutdown: mitmproxy's own teardown is not what is measured.
                self.active = False
                Path(out).write_text(json.dumps(self.figures()))
                return

    def _time_callbacks(self) -> None:
        handle_run = asyncio.events.Handle._run
        record = self.callbacks.append
        clock = time.thread_time

        def timed(handle: asyncio.events.Handle) -> None:
            if not self.active:
                return handle_run(handle)
            start = clock()
            handle_run(handle)
            took = clock() - start
            record(took)
            if took > self.longest[0]:
                self.longest = (took, _describe_handle(handle))

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]
        self._restore.append(lambda: setattr(asyncio.events.Handle, "_run", handle_run))

    def _time_meter(self) -> None:
        from mitmproxy import ctx

        meter = ctx.master.addons.get("meter")
        if meter is None:
            return
        record, own = self.meter.append, self.meter_own.append
        clock = time.thread_time

        def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
            def timed(*args: Any) -> Any:
                start, gc_before = clock(), self._gc_total
                try:
                    return func(*args)
                finally:
                    took = clock() - start
                    record(took)
                    own(took - (self._gc_total - gc_before))

            return timed

        for name in _METER_HOOKS:
            setattr(meter, name, wrap(getattr(meter, name)))
        from edgemeter.metering.flow import FlowMeter

        call = FlowMeter.__call__
        FlowMeter.__call__ = wrap(call)  # type: ignore[method-assign]
        self._restore.append(lambda: setattr(FlowMeter, "__call__", call))

    def done(self) -> None:
        self.active = False
        if self._task is not None:
            self._task.cancel()
        for restore in self._restore:
            restore()

    def figures(self) -> dict[str, Any]:
        def summary(values: list[float]) -> dict[str, float]:
            return {
                "n": len(values),
                "p50_ms": _percentile(values, 50) * 1000,
                "p99_ms": _percentile(values, 99) * 1000,
                "p999_ms": _percentile(values, 99.9) * 1000,
                "max_ms": max(values, default=float("nan")) * 1000,
                "over_1ms": sum(1 for v in values if v > 0.001),
            }

        return {
            "loop_lag": summary(self.lag),
            "callback_cpu": summary(self.callbacks),
            "meter_cpu": summary(self.meter),
            "meter_cpu_without_gc": summary(self.meter_own),
            "gc_pauses": summary(self.gc_pauses),
            "longest_callback": self.longest[1],
        }


# --- configuration ------------------------------------------------------------------------------

SUBJECT: str = DEFAULTS["meter_subject"]
STREAM_NAME = STREAM
# The drain has a stream of its own: the proxies of the rounds may still publish the last
# envelopes of their load runs (client_aborted ones) while it counts what landed.
DRAIN_SUBJECT = "bench.drain.recorded"
DRAIN_STREAM = "BENCH_DRAIN"


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    stream: bool = False
    events: int = 50
    interval_ms: int = 20


@dataclass
class Config:
    rounds: int = 5
    duration_s: float = 2.0
    concurrencies: tuple[int, ...] = (1, 16, 64)
    # CPU per chunk and time to last byte: 50 events 20 ms apart, 16 streams at a time.
    stream_concurrency: int = 16
    stream_events: int = 50
    stream_interval_ms: int = 20
    stream_duration_s: float = 5.0
    # Time to first byte, one stream at a time (short streams: many samples per round).
    ttfb_events: int = 50
    ttfb_interval_ms: int = 2
    drain_envelopes: int = 20_000
    drain_repeats: int = 3
    soak_requests: int = 100_000
    soak_warmup: int = 10_000
    soak_chunk_s: float = 5.0
    memory_streams: int = 32
    memory_events: int = 1000
    memory_interval_ms: int = 5
    memory_pad: int = 1000
    health_duration_s: float = 5.0
    health_variants: tuple[str, ...] = ("plain", "meter", "lean")
    # `edgemeter serve --workers N` for each N here, one after the other in alternating order
    # (each needs every core it can get), as fast as clients can go against an upstream
    # faster than the proxy.
    workers: tuple[int, ...] = (1, 2)
    workers_concurrency: int = 64
    workers_duration_s: float = 5.0
    # The soak runs on a lean runner of its own; off: on the one the rounds measured.
    soak_fresh: bool = True
    # Every round after the first starts its proxies afresh: one process's CPU per chunk sits a
    # few percent off another's of the same code, for its whole life, so one set of processes
    # for every round would put that offset, not the code, into every round's ratio.
    fresh_rounds: bool = True
    # Streamed scenarios run each variant and plain mitmdump at the same time (see
    # measure_beside_plain) instead of one after the other: the machine's speed moved plain's
    # own CPU per chunk by up to 20 % between neighbouring 5 s runs, more than the budget.
    streams_beside_plain: bool = True
    diagnostics: bool = True
    load_tool: str = "auto"
    phases: tuple[str, ...] = ("rounds", "workers", "drain", "memory", "health", "soak")

    @classmethod
    def smoke(cls) -> Config:
        """A tiny run for the test suite: every phase, seconds instead of minutes."""
        return cls(
            rounds=1,
            duration_s=0.3,
            concurrencies=(1, 4),
            stream_concurrency=4,
            stream_events=5,
            stream_interval_ms=5,
            stream_duration_s=0.3,
            ttfb_events=3,
            ttfb_interval_ms=2,
            drain_envelopes=300,
            drain_repeats=1,
            soak_requests=600,
            soak_warmup=200,
            soak_chunk_s=1.0,
            memory_streams=4,
            memory_events=40,
            memory_interval_ms=5,
            memory_pad=100,
            health_duration_s=0.5,
            health_variants=("lean",),
            workers_concurrency=4,
            workers_duration_s=0.3,
            soak_fresh=False,
            diagnostics=False,
            load_tool="python",  # wrk cannot run for less than a second
        )

    def scenarios(self) -> list[Scenario]:
        out = [Scenario(f"c{c}", c) for c in self.concurrencies]
        out.append(Scenario("stream-c1", 1, True, self.ttfb_events, self.ttfb_interval_ms))
        out.append(
            Scenario(
                f"stream-c{self.stream_concurrency}",
                self.stream_concurrency,
                True,
                self.stream_events,
                self.stream_interval_ms,
            )
        )
        return out


# The variants side by side. "plain" is mitmdump with no addon (with stream_large_bodies=1 for
# the stream scenarios, or it would buffer them); "meter" is `mitmdump -s addons/meter.py`;
# "lean" is `edgemeter serve`. lean-core (the lean runner without the meter; lean-core-stream
# with stream_large_bodies=1, its streaming twin) and lean-nobroker (the meter with its broker
# unreachable: hooks and spool, no publishing) split the meter's cost; meter-stock is the meter
# under an untuned mitmdump (meter_tune_mitmproxy=false).
VARIANTS = ("direct", "plain", "meter", "lean")
DIAGNOSTIC_VARIANTS = ("lean-core", "lean-core-stream", "lean-nobroker", "meter-stock")
RATIO_VARIANTS = ("meter", "lean", *DIAGNOSTIC_VARIANTS)


class Bench:
    def __init__(self, config: Config, work: Path, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.work = work
        self.log = log
        self.wrk = shutil.which("wrk") if config.load_tool in ("auto", "wrk") else None
        if config.load_tool == "wrk" and self.wrk is None:
            raise SystemExit("--load-tool wrk: wrk is not installed (apt-get install wrk)")
        self.wrk_lua = wrk_script(work / "post.lua")
        self.results: dict[str, Any] = {}
        self._nats: Any = None
        self.upstream_port = 0
        self.procs: dict[str, Process] = {}
        # The admin endpoints of the groups of workers (`workers-N`), by process name.
        self.groups: dict[str, GroupAdmin] = {}
        self._ports: set[int] = set()

    def port(self) -> int:
        """A free loopback port no process of this run was given yet: the kernel hands a
        just-released port out again, and two proxies started together would collide."""

        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    # -- processes ---------------------------------------------------------------------------

    def proxy_args(self, kind: str, port: int, *extra: str) -> list[str]:

        base = {
            "mitmdump": [str(MITMDUMP)],
            "mitmdump-meter": [str(MITMDUMP), "-s", str(METER_ADDON)],
            "lean": [PYTHON, "-m", "edgemeter.serve"],
        }[kind]
        base += ["--mode", f"reverse:http://127.0.0.1:{self.upstream_port}"]
        base += ["--listen-host", "127.0.0.1", "-p", str(port)]
        base += ["--set", f"confdir={self.work / 'mitmproxy-conf'}"]
        return base + list(extra)

    def meter_sets(self, name: str, nats_url: str | None = None) -> list[str]:
        sets = [
            f"meter_nats_url={nats_url or self._nats.url}",
            f"meter_spool_dir={self.work / 'spools' / name}",
            "meter_admin_listen=",
        ]
        return [arg for s in sets for arg in ("--set", s)]

    def make_proc(self, name: str, probe: bool = False) -> Process:
        port = self.port()
        extra: list[str] = []
        if probe:
            script = self.work / "probe.py"
            script.write_text(PROBE_SCRIPT)
            extra = [
                "-s",
                str(script),
                "--set",
                f"bench_probe_out={self.work / (name + '.probe.json')}",
            ]
        if name.startswith("plain"):
            stream = ["--set", "stream_large_bodies=1"] if "stream" in name or probe else []
            args = self.proxy_args("mitmdump", port, *stream, *extra)
        elif name == "meter-stock":
            sets = [*self.meter_sets(name), "--set", "meter_tune_mitmproxy=false"]
            args = self.proxy_args("mitmdump-meter", port, *sets, *extra)
        elif name.startswith("meter"):
            args = self.proxy_args("mitmdump-meter", port, *self.meter_sets(name), *extra)
        elif name == "lean-core":
            args = self.proxy_args("lean", port, "--no-meter", *extra)
        elif name == "lean-core-stream":
            streaming = ["--set", "stream_large_bodies=1"]
            args = self.proxy_args("lean", port, "--no-meter", *streaming, *extra)
        elif name.startswith("workers-"):
            # `edgemeter serve --workers N`; its admin endpoint says when every worker serves.
            count = int(name.removeprefix("workers-"))
            admin = self.groups[name] = GroupAdmin(self.port())
            sets = [
                f"meter_nats_url={self._nats.url}",
                f"meter_spool_dir={self.work / 'spools' / name}",
                f"meter_admin_listen=127.0.0.1:{admin.port}",
            ]
            flags = ["--workers", str(count), *(a for v in sets for a in ("--set", v))]
            args = self.proxy_args("lean", port, *flags, *extra)
        elif name == "lean-nobroker":
            dead = f"nats://127.0.0.1:{self.port()}"
            args = self.proxy_args("lean", port, *self.meter_sets(name, dead), *extra)
        elif name.startswith("lean"):
            args = self.proxy_args("lean", port, *self.meter_sets(name), *extra)
        else:
            raise ValueError(name)
        return Process(name, args, port, self.work / f"{name}.log")

    def start(self, names: Sequence[str], probe: bool = False) -> dict[str, Process]:
        procs = {n: self.make_proc(n, probe) for n in names}
        for p in procs.values():  # in parallel: mitmdump takes a second or two to start
            p.start()
        for p in procs.values():
            p.wait_listening()
        for name in procs:
            if name in self.groups:
                count = int(name.removeprefix("workers-"))
                self.groups[name].wait_serving(count if count > 1 else 0)
        time.sleep(0.5)
        for p in procs.values():
            p.check_alive()
        self.procs.update({n: p for n, p in procs.items()})
        return procs

    def stop(self, names: Sequence[str]) -> None:
        for n in names:
            if (p := self.procs.pop(n, None)) is not None:
                p.stop()
                self.note_errors(p)

    def note_errors(self, proc: Process) -> None:
        errors = proc.log_errors()
        if errors:
            self.results.setdefault("log_errors", {})[proc.name] = errors
            self.log(f"WARNING: {errors} errors in {proc.log_path}: its figures are suspect")

    def setup(self) -> None:
        # One CA for every proxy, made before they start: processes starting at once on a fresh
        # confdir would race to create it and read each other's half-written files.
        from mitmproxy.certs import CertStore

        CertStore.from_store(self.work / "mitmproxy-conf", "mitmproxy", 2048)
        self._nats = NatsServer(store_dir=self.work / "jetstream", port=self.port())
        self._nats.start()
        asyncio.run(ensure_stream(self._nats.url, STREAM_NAME, (SUBJECT,), storage="file"))
        asyncio.run(ensure_stream(self._nats.url, DRAIN_STREAM, (DRAIN_SUBJECT,), storage="file"))
        self.upstream_port = self.port()
        upstream = Process(
            "upstream",
            [PYTHON, "-m", "tools.bench", "upstream", str(self.upstream_port)],
            self.upstream_port,
            self.work / "upstream.log",
        )
        upstream.start()
        upstream.wait_listening()
        self.procs["upstream"] = upstream

    def teardown(self) -> None:
        self.stop(list(self.procs))
        if self._nats is not None:
            self._nats.stop()

    # -- one measurement ---------------------------------------------------------------------

    def load(self, port: int, sc: Scenario, duration_s: float, **extra: Any) -> dict[str, Any]:
        if sc.stream or self.wrk is None:
            spec = _load_spec(port, sc, duration_s)
            for k, v in extra.items():
                setattr(spec, k, v)
            return asyncio.run(python_load(spec))
        return wrk_load(self.wrk, self.wrk_lua, port, sc.concurrency, duration_s)

    def measure(self, variant: str, sc: Scenario) -> dict[str, Any]:
        if variant == "direct":
            proc: Process | None = None
            port = self.upstream_port
        else:
            proc = self._proc_of(variant, sc)
            port = proc.port
        duration = self.config.stream_duration_s if sc.stream else self.config.duration_s
        before = cpu_seconds(proc.pid) if proc else 0.0
        started = time.time()
        figures = self.load(port, sc, duration)
        figures["window"] = (started, time.time())
        if proc is not None:
            self._add_cpu(figures, proc, cpu_seconds(proc.pid) - before, sc)
        return figures

    def measure_beside_plain(
        self, variant: str, sc: Scenario
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A streamed scenario through `variant` and through plain mitmdump at the same time,
        each with its own clients: (plain's figures, the variant's). The upstream paces streams,
        so neither proxy's load depends on the other's speed, and both see the same machine."""
        procs = [self._proc_of("plain", sc), self._proc_of(variant, sc)]
        specs = [_load_spec(p.port, sc, self.config.stream_duration_s) for p in procs]

        async def both() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(python_load(spec) for spec in specs)))

        before = [cpu_seconds(p.pid) for p in procs]
        started = time.time()
        runs = asyncio.run(both())
        window = (started, time.time())
        for proc, figures, cpu0 in zip(procs, runs, before, strict=True):
            figures["window"] = window
            self._add_cpu(figures, proc, cpu_seconds(proc.pid) - cpu0, sc)
        return runs[0], runs[1]

    def _proc_of(self, variant: str, sc: Scenario) -> Process:
        return self.procs["plain-stream" if variant == "plain" and sc.stream else variant]

    @staticmethod
    def _add_cpu(figures: dict[str, Any], proc: Process, cpu: float, sc: Scenario) -> None:
        proc.check_alive()
        figures["cpu_s"] = cpu
        figures["cpu_us_per_request"] = (
            cpu / figures["requests"] * 1e6 if figures["requests"] else None
        )
        # Chunks as the upstream sends them: events, the usage event and [DONE].
        chunks = figures["requests"] * (sc.events + 2) if sc.stream else 0
        figures["cpu_us_per_chunk"] = cpu / chunks * 1e6 if chunks else None
        figures["rss_mib"] = rss_mib(proc.pid)

    # -- phase 1: interleaved rounds ---------------------------------------------------------

    def warm(self, proc: Process) -> None:
        """Both kinds of traffic once, so lazy imports and first connections are not measured."""
        seconds = min(1.0, self.config.duration_s)
        self.load(proc.port, Scenario("warm", 8), seconds)
        self.load(proc.port, Scenario("warm", 4, True, 10, 5), seconds / 2)

    def round_procs(self) -> list[str]:
        names = ["plain", "plain-stream", "meter", "lean"]
        if self.config.diagnostics:
            names += list(DIAGNOSTIC_VARIANTS)
        return names

    def needed(self) -> tuple[list[str], list[str]]:
        """The processes the phases measure, and those among them with the loop probe."""
        phases = self.config.phases
        names = self.round_procs() if "rounds" in phases else []
        if "memory" in phases:
            names += [n for n in ("meter", "lean") if n not in names]
        if "soak" in phases:
            names.append("lean-soak" if self.config.soak_fresh else "lean")
        names = list(dict.fromkeys(names))
        probed = [f"{v}-probe" for v in self.config.health_variants] if "health" in phases else []
        return names, probed

    def variants(self, sc: Scenario) -> list[str]:
        names = list(VARIANTS)
        if self.config.diagnostics:
            # Without a meter to stream them, the core would buffer streams: its twin streams.
            names.append("lean-core-stream" if sc.stream else "lean-core")
            if sc.concurrency > 1:
                names.append("lean-nobroker")
            names.append("meter-stock")
        return names

    def rounds(self) -> None:
        cfg = self.config
        names = self.round_procs()
        self.log("warming up")
        for name in names:
            self.warm(self.procs[name])
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
        pids: list[dict[str, int]] = []
        for r in range(cfg.rounds):
            if r and cfg.fresh_rounds:
                self.log(f"round {r + 1}/{cfg.rounds}: starting the proxies afresh")
                self.stop(names)
                self.start(names)
                for name in names:
                    self.warm(self.procs[name])
            pids.append({n: self.procs[n].pid for n in names})
            for sc in cfg.scenarios():
                order = self.variants(sc)
                # Rotate the order each round: no variant always runs first (or last).
                order = order[r % len(order) :] + order[: r % len(order)]
                if sc.stream and cfg.streams_beside_plain:
                    self._beside_plain(r, sc, order, raw.setdefault(sc.name, {}))
                    continue
                before: dict[str, Any] | None = None  # the last plain measurement
                waiting: dict[str, Any] | None = None  # a variant waiting for the plain after it
                for variant in bracketed(order):
                    figures = self.measure(variant, sc)
                    raw.setdefault(sc.name, {}).setdefault(variant, []).append(figures)
                    if variant == "plain":
                        if waiting is not None and before is not None:
                            waiting["bracket"] = _bracket(before, figures)
                        before, waiting = figures, None
                    elif variant != "direct":
                        waiting = figures
                    self.log(
                        f"round {r + 1}/{cfg.rounds} {sc.name:>10} {variant:>13}: {_brief(figures)}"
                    )
        rss = {n: rss_mib(p.pid) for n, p in self.procs.items() if n in names}
        self.results["rounds"] = {
            "streams_beside_plain": cfg.streams_beside_plain,
            "raw": raw,
            "median": {sc: {v: _medians(runs) for v, runs in by.items()} for sc, by in raw.items()},
            "ratios": {sc.name: _ratios(raw[sc.name], sc.stream) for sc in cfg.scenarios()},
            "rss_mib_after_rounds": rss,
            "pids": pids,
        }

    def _beside_plain(
        self, r: int, sc: Scenario, order: list[str], raw: dict[str, list[dict[str, Any]]]
    ) -> None:
        """One round of a streamed scenario: each variant side by side with plain (see
        measure_beside_plain), compared with the plain run of the same seconds."""
        head = f"round {r + 1}/{self.config.rounds} {sc.name:>10}"
        for variant in order:
            if variant == "plain":
                continue
            if variant == "direct":
                figures = self.measure(variant, sc)
            else:
                plain, figures = self.measure_beside_plain(variant, sc)
                figures["bracket"] = _bracket(plain, plain)
                raw.setdefault("plain", []).append(plain)
                self.log(f"{head} {'plain':>13}: {_brief(plain)}")
            raw.setdefault(variant, []).append(figures)
            self.log(f"{head} {variant:>13}: {_brief(figures)}")

    # -- phase 2: every core: edgemeter serve --workers N -------------------------------------

    def workers(self) -> None:
        """Throughput and CPU of `edgemeter serve --workers N` for each N of the config, at
        one concurrency, in alternating order round by round, fresh processes each round. The
        CPU of every process of the group is read apart: the supervisor's, and each worker's,
        so the cost of one worker per request gives what N cores would serve."""
        cfg = self.config
        names = [f"workers-{n}" for n in cfg.workers]
        sc = Scenario(f"c{cfg.workers_concurrency}", cfg.workers_concurrency)
        raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(cfg.rounds):
            self.start(names)
            for name in names:
                self.warm(self.procs[name])
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                figures = self._measure_group(name, sc)
                raw[name].append(figures)
                self.log(
                    f"round {r + 1}/{cfg.rounds} workers {name:>10}: {_brief(figures)} "
                    f"cores {figures['cores_busy']:.2f}, helpers {figures['helper_cores']:.2f}, "
                    f"other work {figures['other_cores']:.2f}"
                )
            self.stop(names)
        self.results["workers"] = workers_summary(raw, sc.concurrency)
        summary = self.results["workers"]
        self.log(
            f"workers: {summary['scaling']} throughput; one worker "
            f"{summary['worker_cpu_us_per_request']} us CPU per request"
        )

    def _measure_group(self, name: str, sc: Scenario) -> dict[str, Any]:
        proc = self.procs[name]
        pids = [proc.pid, *child_pids(proc.pid)]
        # What serves the group: the upstream, the broker, the load generator (wrk is a child
        # waited for: its CPU lands in RUSAGE_CHILDREN; the Python one runs in this process).
        helpers = [self.procs["upstream"].pid, self._nats.process.pid]
        before = {pid: cpu_seconds(pid) for pid in pids + helpers}
        load0, machine0 = _children_cpu_seconds() + time.process_time(), machine_busy_seconds()
        started = time.time()
        figures = self.load(proc.port, sc, self.config.workers_duration_s)
        elapsed = time.time() - started
        machine = machine_busy_seconds() - machine0
        load = _children_cpu_seconds() + time.process_time() - load0
        proc.check_alive()
        cpu = {pid: cpu_seconds(pid) - before[pid] for pid in pids + helpers}
        helping = sum(cpu.pop(pid) for pid in helpers) + load
        requests = figures["requests"]
        workers = [cpu[pid] for pid in pids[1:]] or [cpu[proc.pid]]
        figures.update(
            pids=pids,
            cpu_s=sum(cpu.values()),
            cpu_us_per_request=sum(cpu.values()) / requests * 1e6 if requests else None,
            supervisor_cpu_s=cpu[proc.pid] if len(pids) > 1 else 0.0,
            worker_cpu_s=workers,
            # Each worker's CPU per request it served, assuming the requests spread as its CPU
            # did: the cost of one core's worth of metered requests.
            worker_cpu_us_per_request=sum(workers) / requests * 1e6 if requests else None,
            cores_busy=sum(cpu.values()) / elapsed if elapsed else 0.0,
            # The rest of the machine meanwhile: the group's helpers, and work not ours (the
            # noise: cores the group could not have).
            helper_cores=helping / elapsed if elapsed else 0.0,
            other_cores=max(machine - sum(cpu.values()) - helping, 0.0) / elapsed
            if elapsed
            else 0.0,
            rss_mib=sum(rss_mib(pid) for pid in pids),
            window=(started, started + elapsed),
        )
        return figures

    # -- phase 3: spool drain ----------------------------------------------------------------

    def drain(self) -> None:
        runs = [asyncio.run(self._drain_once(i)) for i in range(self.config.drain_repeats)]
        for run in runs:
            per_s = run["per_s"]
            self.log(
                f"drain: {run['envelopes']} envelopes in {run['seconds']:.2f}s = {per_s:.0f}/s"
            )
        self.results["drain"] = {
            "runs": runs,
            "per_s": statistics.median(r["per_s"] for r in runs),
            "cpu_us_per_envelope": statistics.median(r["cpu_us_per_envelope"] for r in runs),
        }

    async def _drain_once(self, i: int) -> dict[str, Any]:
        from edgemeter.ids import uuid7
        from spool.publisher import NatsConfig, Publisher
        from spool.store import Spool

        n = self.config.drain_envelopes
        spool = Spool(self.work / "drain" / str(i))
        spool.open()
        try:
            keys = [uuid7() for _ in range(n)]
            futures = [spool.submit(k, sample_envelope(k)) for k in keys]
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            before = await self._stream_messages(DRAIN_STREAM)
            publisher = Publisher(
                spool, NatsConfig(servers=(self._nats.url,), subject=DRAIN_SUBJECT)
            )
            cpu0, start = time.process_time(), time.perf_counter()
            publisher.start()
            while await asyncio.to_thread(len, spool):
                await asyncio.sleep(0.005)
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            await publisher.stop(drain_timeout=1.0)
            published = await self._stream_messages(DRAIN_STREAM) - before
        finally:
            spool.close()
        return {
            "envelopes": n,
            "seconds": seconds,
            "per_s": n / seconds,
            "cpu_us_per_envelope": cpu / n * 1e6,
            "on_stream": published,
            "envelope_bytes": len(sample_envelope(keys[0])),
        }

    async def _stream_messages(self, stream: str = STREAM_NAME) -> int:
        import nats

        nc = await nats.connect(self._nats.url, allow_reconnect=False, connect_timeout=5)
        try:
            info = await nc.jsm().stream_info(stream)
            return int(info.state.messages)
        finally:
            await nc.close()

    # -- phase 4: memory per open stream -----------------------------------------------------

    def memory(self) -> None:
        cfg = self.config
        out: dict[str, Any] = {}
        for name in ("meter", "lean"):
            proc = self.procs[name]
            self.warm(proc)
            out[name] = asyncio.run(self._memory_once(proc))
            m = out[name]
            self.log(
                f"memory {name}: {cfg.memory_streams} streams open: +{m['per_stream_kib']:.0f} KiB "
                f"each; RSS growth while {m['streamed_mib']:.1f} MiB streamed through: "
                f"{m['growth_mib']:+.2f} MiB"
            )
        self.results["memory"] = out

    async def _memory_once(self, proc: Process) -> dict[str, Any]:
        cfg = self.config
        spec = LoadSpec(
            proc.port,
            cfg.memory_streams,
            0.0,  # one stream per connection: the first request starts before any deadline check
            stream=True,
            events=cfg.memory_events,
            interval_ms=cfg.memory_interval_ms,
            pad=cfg.memory_pad,
            max_requests=cfg.memory_streams,
            stagger=False,
        )
        spec.duration_s = 0.001
        await asyncio.sleep(0.5)
        idle = rss_mib(proc.pid)
        length_s = cfg.memory_events * cfg.memory_interval_ms / 1000
        task = asyncio.ensure_future(python_load(spec))
        await asyncio.sleep(length_s * 0.1)
        early = rss_mib(proc.pid)
        await asyncio.sleep(length_s * 0.8)
        late = rss_mib(proc.pid)
        figures = await task
        event_bytes = len(stream_events(2, cfg.memory_pad)[0])
        streamed = cfg.memory_streams * cfg.memory_events * 0.8 * event_bytes / 2**20
        return {
            "streams": cfg.memory_streams,
            "events_per_stream": cfg.memory_events,
            "event_bytes": event_bytes,
            "rss_idle_mib": idle,
            "rss_at_10pct_mib": early,
            "rss_at_90pct_mib": late,
            "per_stream_kib": (early - idle) * 1024 / cfg.memory_streams,
            "growth_mib": late - early,
            "streamed_mib": streamed,
            "completed": figures["requests"],
        }

    # -- phase 5: event-loop health ----------------------------------------------------------

    def health(self) -> None:
        cfg = self.config
        names = [f"{v}-probe" for v in cfg.health_variants]
        out: dict[str, Any] = {}
        for name in names:
            proc = self.procs[name]
            self.warm(proc)
            # The probe starts counting when this file appears: warm-up and startup are left out.
            (self.work / f"{name}.probe.json.go").touch()
            time.sleep(0.3)

            async def both(port: int = proc.port) -> None:
                plain = LoadSpec(port, 16, cfg.health_duration_s)
                streams = LoadSpec(
                    port, 16, cfg.health_duration_s, True, cfg.stream_events, cfg.stream_interval_ms
                )
                await asyncio.gather(python_load(plain), python_load(streams))

            asyncio.run(both())
            path = self.work / f"{name}.probe.json"
            Path(f"{path}.stop").touch()
            deadline = time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)  # written in one call; let it land
            out[name.removesuffix("-probe")] = (
                json.loads(path.read_text()) if path.exists() else None
            )
        self.stop(names)
        for name, figures in out.items():
            if figures:
                lag, cb = figures["loop_lag"], figures["callback_cpu"]
                mc, own = figures["meter_cpu"], figures["meter_cpu_without_gc"]
                self.log(
                    f"loop {name}: lag p99 {lag['p99_ms']:.2f} ms, longest callback "
                    f"{cb['max_ms']:.2f} ms CPU, longest meter call {mc['max_ms']:.3f} ms CPU "
                    f"({own['max_ms']:.3f} ms less GC)"
                )
        self.results["health"] = out

    # -- phase 6: soak -----------------------------------------------------------------------

    def soak(self) -> None:
        cfg = self.config
        soaked = "lean-soak" if cfg.soak_fresh else "lean"
        proc = self.procs[soaked]
        # The others stop first (and drain): the stream then counts only the soak's envelopes.
        self.stop([n for n in self.procs if n not in (soaked, "upstream")])
        before = asyncio.run(self._stream_messages())
        samples: list[tuple[float, int, float]] = []
        total = ok = 0
        warm_rss: float | None = None
        start = time.perf_counter()
        nonstream = Scenario("soak", 16)
        streams = LoadSpec(proc.port, 4, cfg.soak_chunk_s, True, 20, 5)
        while total < cfg.soak_requests:
            chunk_s = cfg.soak_chunk_s

            async def chunk(chunk_s: float = chunk_s) -> list[dict[str, Any]]:
                plain = asyncio.to_thread(self.load, proc.port, nonstream, chunk_s)
                return list(await asyncio.gather(plain, python_load(streams)))

            for figures in asyncio.run(chunk()):
                total += figures["requests"]
                ok += figures["requests"] - figures["non2xx"]
            samples.append((time.perf_counter() - start, total, rss_mib(proc.pid)))
            if warm_rss is None and total >= cfg.soak_warmup:
                warm_rss = samples[-1][2]
                self.log(f"soak: warm after {total} requests, RSS {warm_rss:.1f} MiB")
        end_rss = rss_mib(proc.pid)
        # Every 2xx answer is billable: its envelope must reach the stream.
        deadline = time.monotonic() + 60
        published = 0
        while time.monotonic() < deadline:
            published = asyncio.run(self._stream_messages()) - before
            if published >= ok:
                break
            time.sleep(0.5)
        self.stop([soaked])
        assert warm_rss is not None
        self.results["soak"] = {
            "requests": total,
            "ok": ok,
            "seconds": time.perf_counter() - start,
            "rss_warm_mib": warm_rss,
            "rss_end_mib": end_rss,
            "rss_growth_pct": (end_rss / warm_rss - 1) * 100,
            "rss_samples": samples,
            "envelopes_on_stream": published,
        }
        growth = self.results["soak"]["rss_growth_pct"]
        self.log(
            f"soak: {total} requests, RSS {warm_rss:.1f} -> {end_rss:.1f} MiB ({growth:+.1f} %), "
            f"{published} envelopes on the stream"
        )

    # -- all ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.results["meta"] = machine_info(self.wrk, cfg)
        try:
            self.setup()
            names, probed = self.needed()
            self.log(f"starting {', '.join(names + probed)}")
            self.start(names)
            self.start(probed, probe=True)
            timings = self.results["meta"].setdefault("phase_seconds", {})
            for phase in cfg.phases:
                start = time.perf_counter()
                getattr(self, phase)()
                timings[phase] = round(time.perf_counter() - start, 1)
        finally:
            self.teardown()
        self.results["meta"]["loadavg_end"] = _loadavg()
        self.results["budgets"] = budgets(self.results)
        return self.results


# The cores the workers phase projects its figures to.
PROJECTED_CORES = (1, 2, 4, 8, 16)


def workers_summary(raw: dict[str, list[dict[str, Any]]], concurrency: int) -> dict[str, Any]:
    """The workers phase's figures: medians per group size, the throughput of each against one
    worker round by round (then the median), and what N cores would serve at the CPU one worker
    spends per request in the largest group measured."""
    names = list(raw)
    medians = {}
    for name, runs in raw.items():
        medians[name] = _medians(runs) | {
            "cores_busy": _median([r["cores_busy"] for r in runs]),
            "helper_cores": _median([r.get("helper_cores") for r in runs]),
            "other_cores": _median([r.get("other_cores") for r in runs]),
            "worker_cpu_us_per_request": _median([r["worker_cpu_us_per_request"] for r in runs]),
            "supervisor_cpu_s": _median([r["supervisor_cpu_s"] for r in runs]),
            # How evenly the workers shared the work: each one's share of the workers' CPU.
            "worker_shares": [
                _median([r["worker_cpu_s"][i] / sum(r["worker_cpu_s"]) for r in runs])
                for i in range(len(runs[0]["worker_cpu_s"]))
            ]
            if all(sum(r["worker_cpu_s"]) for r in runs)
            else [],
        }
    base = names[0]
    scaling = {
        name: _median(
            [
                run["rps"] / first["rps"] if first["rps"] else None
                for run, first in zip(raw[name], raw[base], strict=True)
            ]
        )
        for name in names[1:]
    }
    largest = medians[names[-1]]
    per_request = largest["worker_cpu_us_per_request"]
    projected = {
        str(cores): cores * 1e6 / per_request if per_request else None for cores in PROJECTED_CORES
    }
    # What a worker pays per request for sharing the machine with the others, round by round:
    # less noisy than throughput when other work takes cores away from the group.
    alone = [r["worker_cpu_us_per_request"] for r in raw[base]]
    per_core = {
        name: _median(
            [
                a / r["worker_cpu_us_per_request"] if a and r["worker_cpu_us_per_request"] else None
                for a, r in zip(alone, raw[name], strict=True)
            ]
        )
        for name in names[1:]
    }
    return {
        "concurrency": concurrency,
        "raw": raw,
        "median": medians,
        "scaling": scaling,
        "per_core": per_core,
        "worker_cpu_us_per_request": per_request,
        "projected_rps": projected,
        "projected_from": names[-1],
    }


def sample_envelope(request_id: str) -> bytes:
    """An envelope as the meter writes it for a chat completion (about 900 bytes)."""
    meta = {
        "tokens_used": 19,
        "model": "bench-model",
        "request_id": request_id,
        "tenant_id": "t_bench",
        "latency_ms": 3,
        "completed_at": "2026-01-01T00:00:00Z",
        "schema": "edgemeter.usage/1",
        "api": "openai.chat",
        "path": "/v1/chat/completions",
        "stream": False,
        "status_code": 200,
        "outcome": "complete",
        "usage_source": "reported",
        "input_tokens": 12,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 7,
        "reasoning_tokens": 0,
        "usage_raw": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        "price_version": "flat:156",
        "currency": "OMR",
        "client_request_id": "",
        "upstream_id": "chatcmpl-bench",
        "api_key_fingerprint": "9f86d081884c7d65",
        "ttft_ms": 3,
    }
    envelope = {
        "customer_id": "cus_bench",
        "amount_omr": -0.002964,
        "amount_micro_omr": -2964,
        "reason": "usage:newapi:bench-model",
        "metadata": meta,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


# --- figures ------------------------------------------------------------------------------------


def _brief(f: dict[str, Any]) -> str:
    text = f"{f['rps']:8.1f} req/s p50 {f['p50_ms']:7.2f} ms"
    if f.get("cpu_us_per_chunk") is not None:
        text += f" ttfb {f['ttfb_p50_ms']:6.2f} ms cpu {f['cpu_us_per_chunk']:6.1f} us/chunk"
    elif f.get("cpu_us_per_request") is not None:
        text += f" cpu {f['cpu_us_per_request']:6.0f} us/req"
    if f["errors"] or f["non2xx"]:
        text += f" errors {f['errors']} non-2xx {f['non2xx']}"
    return text


_MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "ttfb_p50_ms",
    "ttfb_p99_ms",
    "cpu_us_per_request",
    "cpu_us_per_chunk",
    "rss_mib",
)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: _median([r.get(k) for r in runs]) for k in _MEDIAN_KEYS}
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] + r["non2xx"] for r in runs)
    out["tool"] = runs[0]["tool"]
    return out


def _load_spec(port: int, sc: Scenario, duration_s: float) -> LoadSpec:
    return LoadSpec(port, sc.concurrency, duration_s, sc.stream, sc.events, sc.interval_ms)


def bracketed(order: Sequence[str]) -> list[str]:
    """The measurements of one scenario in one round: every variant compared with plain
    mitmdump (all but plain and direct) between two plain measurements, so each is compared
    with plain measured seconds before and after it, not minutes away while the shared
    machine's speed drifts."""
    out = ["plain"]
    for variant in order:
        if variant == "plain":
            continue
        out.append(variant)
        if variant != "direct":
            out.append("plain")
    return out


def _bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """The mean of the two plain measurements around a variant's, figure by figure."""
    out: dict[str, float | None] = {}
    for key in ("rps", "p50_ms", "ttfb_p50_ms", "cpu_us_per_request", "cpu_us_per_chunk"):
        a, b = before.get(key), after.get(key)
        out[key] = (a + b) / 2 if a is not None and b is not None else None
    return out


def _ratios(by_variant: dict[str, list[dict[str, Any]]], stream: bool) -> dict[str, float | None]:
    """Each figure of a variant against the mean of the plain measurements just before and
    after it (its bracket), then the median over rounds."""
    cpu = "cpu_us_per_chunk" if stream else "cpu_us_per_request"
    out: dict[str, float | None] = {}
    for variant in RATIO_VARIANTS:
        runs = by_variant.get(variant)
        if not runs:
            continue
        pairs = [(run, run["bracket"]) for run in runs if "bracket" in run]

        def ratio(key: str, pairs: list[Any] = pairs) -> float | None:
            return _median(
                [a[key] / b[key] if a.get(key) and b.get(key) else None for a, b in pairs]
            )

        def diff(key: str, pairs: list[Any] = pairs) -> float | None:
            return _median([a[key] - b[key] for a, b in pairs])

        out[f"{variant}/plain cpu"] = ratio(cpu)
        out[f"{variant}/plain rps"] = ratio("rps")
        out[f"{variant}-plain p50_ms"] = diff("p50_ms")
        if stream:
            out[f"{variant}-plain ttfb_p50_ms"] = diff("ttfb_p50_ms")
    return out


def _over(ratios: dict[str, float | None], variant: str, base: str) -> float | None:
    """`variant`'s CPU against `base`'s, both taken against the same plain measurements."""
    a, b = ratios.get(f"{variant}/plain cpu"), ratios.get(f"{base}/plain cpu")
    return a / b if a and b else None


@dataclass(frozen=True)
class Budget:
    name: str
    measured: float | None
    limit: float
    higher_is_better: bool = False
    unit: str = ""

    @property
    def met(self) -> bool:
        if self.measured is None or self.measured != self.measured:
            return False
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


def budgets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's budgets against what was measured; a phase that did not run is left out."""
    out: list[Budget] = []
    rounds = results.get("rounds")
    if rounds:
        ratios = rounds["ratios"]
        nonstream = [s for s in ratios if not s.startswith("stream")]
        streams = [s for s in ratios if s.startswith("stream")]
        busy = [s for s in nonstream if s != "c1"]
        # Each budget for the meter under mitmdump and in the lean runner (the same addon).
        for v in ("meter", "lean"):
            for s in nonstream:
                out.append(
                    Budget(
                        f"{s}: {v} CPU/request vs plain mitmdump",
                        ratios[s].get(f"{v}/plain cpu"),
                        1.10,
                        unit="x",
                    )
                )
            if "c1" in ratios:
                out.append(
                    Budget(
                        f"c1: latency p50 {v} adds to plain mitmdump",
                        ratios["c1"].get(f"{v}-plain p50_ms"),
                        0.5,
                        unit="ms",
                    )
                )
            if streams:
                first, busiest = streams[0], streams[-1]
                out.append(
                    Budget(
                        f"{first}: first byte, {v} vs plain streaming mitmdump (p50)",
                        ratios[first].get(f"{v}-plain ttfb_p50_ms"),
                        1.0,
                        unit="ms",
                    )
                )
                out.append(
                    Budget(
                        f"{busiest}: {v} CPU/chunk vs plain",
                        ratios[busiest].get(f"{v}/plain cpu"),
                        1.10,
                        unit="x",
                    )
                )
        # Issue 19: the meter's own cost, the lean runner against its bare core (both measured
        # against the same plain bracket, so their ratio is the meter's share).
        for s, limit in (("c16", 1.20), ("c1", 1.30)):
            if s in ratios:
                out.append(
                    Budget(
                        f"{s}: lean CPU/request vs the bare lean core",
                        _over(ratios[s], "lean", "lean-core"),
                        limit,
                        unit="x",
                    )
                )
        for s in streams:
            out.append(
                Budget(
                    f"{s}: lean CPU/chunk vs the bare lean core streaming",
                    _over(ratios[s], "lean", "lean-core-stream"),
                    1.05,
                    unit="x",
                )
            )
        for s in busy:
            out.append(
                Budget(
                    f"{s}: lean runner throughput vs plain mitmdump",
                    ratios[s].get("lean/plain rps"),
                    1.5,
                    True,
                    "x",
                )
            )
    if "workers" in results:
        w = results["workers"]
        for name, ratio in w["scaling"].items():
            count = int(name.removeprefix("workers-"))
            out.append(
                Budget(
                    f"c{w['concurrency']}: edgemeter serve --workers {count} throughput vs "
                    "--workers 1",
                    ratio,
                    0.8 * count,
                    True,
                    "x",
                )
            )
    if "drain" in results:
        out.append(Budget("spool drain", results["drain"]["per_s"], 10_000, True, "envelopes/s"))
    if "soak" in results:
        out.append(
            Budget(
                "soak: RSS growth after warm-up",
                abs(results["soak"]["rss_growth_pct"]),
                10.0,
                unit="%",
            )
        )
    for name, m in results.get("memory", {}).items():
        # A meter that kept bodies would grow by all of them; 10 % of it is noise at most.
        out.append(
            Budget(
                f"{name}: RSS growth while streams progress, share of bytes streamed",
                m["growth_mib"] / m["streamed_mib"] * 100,
                10.0,
                unit="%",
            )
        )
    for name, h in results.get("health", {}).items():
        if h and name != "plain":
            out.append(
                Budget(
                    f"{name}: longest meter call on the event loop (CPU, less GC pauses)",
                    h["meter_cpu_without_gc"]["max_ms"],
                    1.0,
                    unit="ms",
                )
            )
    return [{**asdict(b), "met": b.met} for b in out]


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0:3].__str__()


def machine_info(wrk: str | None, config: Config) -> dict[str, Any]:
    import mitmproxy.version

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "load_tool": "wrk (non-streamed), python (streams)" if wrk else "python",
        "loadavg_start": _loadavg(),
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "config": asdict(config),
    }


# --- the report ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def report(results: dict[str, Any]) -> str:
    """The results as Markdown: the tables docs/PERFORMANCE.md shows."""
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; Python {meta['python']}, "
        f"mitmproxy {meta['mitmproxy']}; load: {meta['load_tool']}; "
        f"load average {meta['loadavg_start']} at the start, "
        f"{meta.get('loadavg_end', '?')} at the end.",
        "",
    ]
    rounds = results.get("rounds")
    if rounds:
        n = meta["config"]["rounds"]
        lines += [
            f"Medians of {n} interleaved round(s). CPU is the proxy process's (all threads), per "
            "request, or per upstream chunk for streams.",
            "",
            "| scenario | variant | req/s | p50 ms | p99 ms | TTFB p50 ms | CPU µs | RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for sc, by in rounds["median"].items():
            for variant, m in by.items():
                cpu = "cpu_us_per_chunk" if sc.startswith("stream") else "cpu_us_per_request"
                stream = sc.startswith("stream")
                ttfb = _fmt(m["ttfb_p50_ms"], 2) if stream else ""
                lines.append(
                    f"| {sc} | {variant} | {_fmt(m['rps'])} | {_fmt(m['p50_ms'], 2)} | "
                    f"{_fmt(m['p99_ms'], 2)} | {ttfb} | {_fmt(m[cpu], 1 if stream else 0)} | "
                    f"{_fmt(m['rss_mib'])} |"
                )
        paired = (
            "; streams against the plain run of the same seconds, side by side"
            if rounds.get("streams_beside_plain")
            else ""
        )
        lines += [
            "",
            "Ratios against plain mitmdump: each run against the mean of the plain runs just "
            f"before and after it{paired}, then the median over rounds:",
            "",
            "| scenario | variant | CPU ratio | throughput ratio | added p50 ms | added TTFB ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for sc, ratios in rounds["ratios"].items():
            for variant in RATIO_VARIANTS:
                if f"{variant}/plain cpu" not in ratios:
                    continue
                lines.append(
                    f"| {sc} | {variant} | {_fmt(ratios[f'{variant}/plain cpu'], 2)} | "
                    f"{_fmt(ratios[f'{variant}/plain rps'], 2)} | "
                    f"{_fmt(ratios[f'{variant}-plain p50_ms'], 2)} | "
                    f"{_fmt(ratios.get(f'{variant}-plain ttfb_p50_ms'), 2)} |"
                )
        lines.append("")
    if "workers" in results:
        w = results["workers"]
        n = meta["config"]["rounds"]
        lines += [
            f"`edgemeter serve --workers N` at {w['concurrency']} clients, medians of {n} "
            "round(s) in alternating order, fresh processes each round; CPU of every process "
            "of the group (supervisor and workers), per request; cores busy: that CPU over "
            "the seconds measured; helpers: the upstream, the broker and the load generator; "
            "other work: the rest of the machine's busy cores meanwhile (not ours):",
            "",
            "| workers | req/s | p50 ms | p99 ms | CPU µs/request | one worker's CPU µs/request "
            "| supervisor CPU s | cores busy | helpers, cores | other work, cores "
            "| workers' shares of the CPU | throughput vs 1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for name, m in w["median"].items():
            shares = " / ".join(f"{share:.0%}" for share in m["worker_shares"])
            lines.append(
                f"| {name.removeprefix('workers-')} | {_fmt(m['rps'])} | {_fmt(m['p50_ms'], 2)} "
                f"| {_fmt(m['p99_ms'], 2)} | {_fmt(m['cpu_us_per_request'], 0)} "
                f"| {_fmt(m['worker_cpu_us_per_request'], 0)} | {_fmt(m['supervisor_cpu_s'], 3)} "
                f"| {_fmt(m['cores_busy'], 2)} | {_fmt(m['helper_cores'], 2)} "
                f"| {_fmt(m['other_cores'], 2)} | {shares or '-'} "
                f"| {_fmt(w['scaling'].get(name, 1.0), 2)} |"
            )
        projected = ", ".join(
            f"{cores} cores {_fmt(rps, 0)}/s" for cores, rps in w["projected_rps"].items()
        )
        for name, efficiency in w.get("per_core", {}).items():
            count = int(name.removeprefix("workers-"))
            lines += [
                "",
                f"With {count} workers one worker served {_fmt(efficiency, 2)} x the requests per "
                f"second of CPU that one worker alone did (median of the rounds' ratios): "
                f"{count} cores of their own would serve {_fmt((efficiency or 0) * count, 2)} x "
                "one core's throughput.",
            ]
        lines += [
            "",
            f"Projected (one worker per core, {_fmt(w['worker_cpu_us_per_request'], 0)} µs of "
            f"CPU per request as measured with {w['projected_from'].removeprefix('workers-')} "
            "workers, upstream, broker and clients on other cores): " + projected + ".",
            "",
        ]
    if "drain" in results:
        d = results["drain"]
        run = d["runs"][0]
        lines += [
            f"Spool drain: {run['envelopes']:,} envelopes of {run['envelope_bytes']} bytes "
            "spooled, "
            f"broker up, file-storage stream: **{d['per_s']:,.0f} envelopes/s** (median of "
            f"{len(d['runs'])}), {d['cpu_us_per_envelope']:.0f} µs CPU per envelope; "
            f"{run['on_stream']:,} landed on the stream.",
            "",
        ]
    if "memory" in results:
        for name, m in results["memory"].items():
            lines.append(
                f"Memory per stream ({name}): {m['streams']} streams of {m['events_per_stream']} "
                f"events of {m['event_bytes']} bytes open at once cost "
                f"{m['per_stream_kib']:.0f} KiB each; while {m['streamed_mib']:.1f} MiB streamed "
                f"through them RSS moved {m['growth_mib']:+.2f} MiB "
                f"({m['rss_at_10pct_mib']:.1f} → {m['rss_at_90pct_mib']:.1f} MiB)."
            )
        lines.append("")
    if results.get("health"):
        lines += [
            "Event-loop health under load (16 non-streamed + 16 streaming clients), measured "
            "inside the process: lag of a 1 ms sleep, CPU time of each loop callback, of each "
            "garbage collection, and of each meter hook and stream-callable call (also less the "
            "collections that ran inside it):",
            "",
            "| process | lag p50 ms | lag p99 ms | lag max ms | callback p99.9 ms | "
            "callback max ms | callbacks > 1 ms | GC pause max ms | meter call max ms | "
            "meter call max, less GC ms | meter calls > 1 ms less GC |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, h in results["health"].items():
            if not h:
                continue
            lag, cb, mc = h["loop_lag"], h["callback_cpu"], h["meter_cpu"]
            own, gcp = h["meter_cpu_without_gc"], h["gc_pauses"]
            meter_max = _fmt(mc["max_ms"], 3) if mc["n"] else "-"
            own_max = _fmt(own["max_ms"], 3) if own["n"] else "-"
            own_over = own["over_1ms"] if own["n"] else "-"
            lines.append(
                f"| {name} | {_fmt(lag['p50_ms'], 2)} | {_fmt(lag['p99_ms'], 2)} | "
                f"{_fmt(lag['max_ms'], 2)} | {_fmt(cb['p999_ms'], 3)} | {_fmt(cb['max_ms'], 2)} | "
                f"{cb['over_1ms']} of {cb['n']:,} | {_fmt(gcp['max_ms'], 2)} | {meter_max} | "
                f"{own_max} | {own_over} |"
            )
        lines.append("")
    if "soak" in results:
        s = results["soak"]
        lines += [
            f"Soak through the lean runner: {s['requests']:,} requests (streams included) in "
            f"{s['seconds']:.0f} s; RSS {s['rss_warm_mib']:.1f} MiB after warm-up, "
            f"{s['rss_end_mib']:.1f} MiB at the end ({s['rss_growth_pct']:+.1f} %); "
            f"{s['envelopes_on_stream']:,} envelopes on the stream for {s['ok']:,} answered "
            "requests (the few more are requests in flight when a load run stopped: the upstream "
            "answered them, so they are billed, as client_aborted).",
            "",
        ]
    for name, count in results.get("log_errors", {}).items():
        lines += [f"**WARNING: {count} errors in the log of {name}: its figures are suspect.**", ""]
    if results.get("budgets"):
        lines += ["| budget | measured | limit | met |", "|---|---:|---:|---|"]
        for b in results["budgets"]:
            sign = "≥" if b["higher_is_better"] else "≤"
            met = "met" if b["met"] else "**NOT MET**"
            lines.append(
                f"| {b['name']} | {_fmt(b['measured'], 2)} {b['unit']} | "
                f"{sign} {_fmt(b['limit'], 2)} {b['unit']} | {met} |"
            )
        lines.append("")
    return "\n".join(lines)


# --- entry points -------------------------------------------------------------------------------


def load_main(argv: Sequence[str]) -> int:
    """`python -m tools.bench load '<LoadSpec as JSON>'`: one load run, its figures as JSON."""
    spec = LoadSpec(**json.loads(argv[0]))
    print(json.dumps(asyncio.run(python_load(spec))), flush=True)
    return 0


def upstream_main(argv: Sequence[str]) -> int:
    """`python -m tools.bench upstream PORT`: the bench upstream until SIGTERM."""
    port = int(argv[0])

    async def run() -> None:
        server = await BenchUpstream().serve("127.0.0.1", port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def parse_args(argv: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark the meter against plain mitmdump and the upstream itself "
        "(docs/PERFORMANCE.md). Prints a Markdown report and writes every figure as JSON.",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every phase (seconds)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=float, help="seconds per non-streamed measurement")
    parser.add_argument(
        "--concurrencies",
        help="comma-separated concurrencies of the non-streamed rounds (default 1,16,64)",
    )
    parser.add_argument(
        "--phases",
        help="comma-separated subset of rounds,workers,drain,memory,health,soak (default: all)",
    )
    parser.add_argument("--soak-requests", type=int, help="requests in the soak (default 100000)")
    parser.add_argument(
        "--workers",
        help="comma-separated worker counts of the workers phase, the first the baseline "
        "(default 1,2)",
    )
    parser.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="non-streamed load: wrk if installed (auto), or the Python load generator",
    )
    parser.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="leave out lean-core, lean-nobroker and meter-stock",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / ".edgemeter" / "bench-results.json",
        help="where every figure goes as JSON (default: .edgemeter/bench-results.json)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep logs and spools here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    config = Config.smoke() if args.smoke else Config()
    if args.load_tool != "auto" or not args.smoke:
        config.load_tool = args.load_tool
    if args.rounds is not None:
        config.rounds = args.rounds
    if args.duration is not None:
        config.duration_s = args.duration
    if args.concurrencies:
        try:
            levels = tuple(int(c) for c in args.concurrencies.split(",") if c.strip())
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            parser.error("--concurrencies: positive integers, comma-separated (e.g. 1,16)")
        config.concurrencies = levels
    if args.workers:
        try:
            counts = tuple(int(c) for c in args.workers.split(",") if c.strip())
        except ValueError:
            counts = ()
        if len(counts) < 2 or min(counts) < 1:
            parser.error("--workers: two or more positive integers, comma-separated (e.g. 1,2)")
        config.workers = counts
    if args.soak_requests is not None:
        config.soak_requests = args.soak_requests
        config.soak_warmup = min(config.soak_warmup, args.soak_requests // 10)
    if args.phases:
        phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
        unknown = set(phases) - set(Config.phases)
        if unknown:
            parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
        config.phases = phases
    if args.no_diagnostics:
        config.diagnostics = False
    return config, args


def bench_main(argv: Sequence[str]) -> int:
    config, args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="edgemeter-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = Bench(config, work, log).run()
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(report(results))
    print(f"(figures written to {args.out})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["load"]:
        return load_main(args[1:])
    if args[:1] == ["upstream"]:
        return upstream_main(args[1:])
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
