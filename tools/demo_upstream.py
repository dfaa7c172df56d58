"""A small local OpenAI- and Anthropic-compatible upstream for demos and end-to-end tests.

Answers canned replies or replays recorded provider responses, streaming them in small chunks;
images, audio, rerank, moderations, Gemini and Realtime answers live in demo_surface.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from tools import demo_surface

# The canned answer. Completion tokens are its words, so a reader can check the usage by eye.
CANNED_REPLY = "Hello from the edgemeter demo upstream. Every word of this reply is one token."

# Routes that answer POST with a model response, and the API shape each one speaks.
POST_ROUTES = {
    "/v1/chat/completions": "openai.chat",
    "/v1/completions": "openai.completions",
    "/v1/embeddings": "openai.embeddings",
    "/v1/responses": "openai.responses",
    "/v1/messages": "anthropic.messages",
}
DEMO_MODELS = ("demo-chat", "demo-embed", "claude-demo")
EMBEDDING_DIMENSIONS = 8
MAX_BODY_BYTES = 16 * 1024 * 1024
_ERROR_FIXTURE_STATUS = re.compile(r"-error-(\d{3})\.")
_SOURCE_STATUS = re.compile(r"^response status:\s*(\d{3})\s*$", re.MULTILINE)
_WORD = re.compile(r"\S+\s*")


class BadRequest(Exception):
    """A request the demo refuses; answered with `status` and an API-shaped error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    """One parsed HTTP/1.1 request; header names are lower-cased, the last value wins."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


@dataclass(frozen=True)
class Reply:
    """What the demo answers: a whole body, sent with Content-Length or chunked as a stream."""

    status: int
    content_type: str
    body: bytes
    stream: bool = False
    # Per-request pacing of a stream (x-demo-chunk-size, x-demo-delay-ms); None: the server's.
    chunk_size: int | None = None
    delay_ms: int | None = None


@dataclass
class DemoUpstream:
    """The demo upstream: canned answers, replay of recorded files, status injection.

    Request headers steer it: `x-demo-fixture: <file>` replays a file of `fixtures_dir`,
    `x-demo-status: <code>` answers that status (an API-shaped error body unless a fixture is
    named), `x-demo-chunk-size` and `x-demo-delay-ms` pace one stream. `received` keeps the last
    requests so tests can check what a proxy forwarded.
    """

    fixtures_dir: Path | None = None
    chunk_size: int = 7
    delay_ms: int = 0
    received: deque[Request] = field(default_factory=lambda: deque(maxlen=256))
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if self.delay_ms < 0:
            raise ValueError("delay_ms must not be negative")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Listen on host:port (0 picks a free port) and return the running server."""
        # A larger line limit than asyncio's 64 KiB: SDKs send long header blocks on occasion.
        return await asyncio.start_server(self.handle_connection, host, port, limit=1 << 20)

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve requests on one connection until the client closes it (HTTP/1.1 keep-alive)."""
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await read_request(reader)
                except BadRequest as exc:
                    await write_reply(writer, error_reply("", exc.status, exc.message), False)
                    return
                if request is None:
                    return
                self.received.append(request)
                if demo_surface.is_upgrade(request):
                    # A Realtime WebSocket: the connection is the session's until it closes.
                    await demo_surface.realtime(request, reader, writer)
                    return
                reply = self.answer(request)
                chunk_size = reply.chunk_size or self.chunk_size
                delay_ms = self.delay_ms if reply.delay_ms is None else reply.delay_ms
                await write_reply(
                    writer,
                    reply,
                    request.keep_alive,
                    chunk_size=chunk_size,
                    delay_s=delay_ms / 1000,
                )
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            # A client that goes away mid-stream is normal (that is what client_aborted meters).
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def close_connections(self) -> None:
        """Drop open keep-alive connections; Python 3.12's Server.wait_closed() waits for them."""
        for writer in list(self._writers):
            writer.close()

    def answer(self, request: Request) -> Reply:
        """Route one request to its reply; every failure becomes an API-shaped error reply."""
        try:
            chunk_size = _header_int(request, "x-demo-chunk-size", 1, MAX_BODY_BYTES)
            delay_ms = _header_int(request, "x-demo-delay-ms", 0, 60_000)
            reply = self.route(request)
        except BadRequest as exc:
            return error_reply(request.path, exc.status, exc.message)
        return replace(reply, chunk_size=chunk_size, delay_ms=delay_ms)

    def route(self, request: Request) -> Reply:
        """The reply a request's path, method and x-demo-* headers ask for."""
        path = request.path
        status = _injected_status(request)
        fixture = request.headers.get("x-demo-fixture")
        if fixture:
            return self.replay(fixture, status)
        if path in ("/v1/models", "/api/status"):
            _require_method(request, "GET")
            body = models_body() if path == "/v1/models" else status_body()
            return json_reply(status or 200, body)
        if demo_surface.answers(path):
            _require_method(request, "POST")
            if status is not None and not 200 <= status < 300:
                return error_reply(path, status, f"demo upstream: injected status {status}")
            return replace(demo_surface.answer(request), status=status or 200)
        if path not in POST_ROUTES:
            raise BadRequest(404, f"demo upstream: no route for {path}")
        _require_method(request, "POST")
        if status is not None and not 200 <= status < 300:
            return error_reply(path, status, f"demo upstream: injected status {status}")
        reply = canned_reply(POST_ROUTES[path], _json_object(request.body))
        return replace(reply, status=status or reply.status)

    def replay(self, name: str, status: int | None) -> Reply:
        """Answer with a recorded file, shaped by its suffix (.json, .sse, .chunks.txt)."""
        if self.fixtures_dir is None:
            raise BadRequest(400, "demo upstream: x-demo-fixture needs --fixtures DIR")
        # Only plain names inside the fixtures directory: the header must not read other files.
        if not name or name != Path(name).name or name.startswith("."):
            raise BadRequest(400, f"demo upstream: bad fixture name {name!r}")
        path = self.fixtures_dir / name
        if not path.is_file():
            raise BadRequest(400, f"demo upstream: no fixture named {name!r}")
        data = path.read_bytes()
        status = status or recorded_status(path)
        if name.endswith(".json"):
            return Reply(status, "application/json", data)
        if name.endswith(".sse"):
            return Reply(status, "text/event-stream; charset=utf-8", data, stream=True)
        if name.endswith(".chunks.txt"):
            return Reply(status, "text/event-stream; charset=utf-8", frame_chunks(data), True)
        raise BadRequest(400, f"demo upstream: cannot replay {name!r} (.json, .sse, .chunks.txt)")


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request; None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest(400, "demo upstream: truncated request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise BadRequest(431, "demo upstream: request head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise BadRequest(400, "demo upstream: malformed request line") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, "demo upstream: malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise BadRequest(400, "demo upstream: bad Content-Length") from exc
        if not 0 <= length <= MAX_BODY_BYTES:
            raise BadRequest(413, "demo upstream: body too large")
        body = await reader.readexactly(length)
    return Request(method.upper(), target, version, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise BadRequest(400, "demo upstream: bad chunk size") from exc
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        if len(body) + size > MAX_BODY_BYTES:
            raise BadRequest(413, "demo upstream: body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def write_reply(
    writer: asyncio.StreamWriter,
    reply: Reply,
    keep_alive: bool,
    *,
    chunk_size: int = 7,
    delay_s: float = 0.0,
) -> None:
    """Send a reply; a stream goes out in `chunk_size` pieces so SSE events split anywhere."""
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Unknown"
    head = [
        f"HTTP/1.1 {reply.status} {phrase}",
        "Server: edgemeter-demo",
        f"Content-Type: {reply.content_type}",
        f"x-request-id: req_{secrets.token_hex(12)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    if reply.stream:
        head += ["Transfer-Encoding: chunked", "Cache-Control: no-cache"]
    else:
        head.append(f"Content-Length: {len(reply.body)}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not reply.stream:
        writer.write(reply.body)
        await writer.drain()
        return
    await writer.drain()
    for start in range(0, len(reply.body), chunk_size):
        piece = reply.body[start : start + chunk_size]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        # Yield even without a delay so each piece tends to leave as its own TCP segment.
        await asyncio.sleep(delay_s)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def frame_chunks(data: bytes) -> bytes:
    """Frame a .chunks.txt file (one SSE data payload per line) as the provider sent it.

    Payloads with a string "type" (Anthropic Messages and the OpenAI Responses API) get an
    `event: <type>` line, as those providers send; the others are OpenAI chat/completions
    chunks, which end with `data: [DONE]` (added when the file lacks it).
    """
    out = bytearray()
    typed = False
    saw_done = False
    for raw_line in data.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        event_type = _payload_type(line)
        if event_type is not None:
            typed = True
            out += b"event: " + event_type.encode() + b"\n"
        saw_done = saw_done or line == b"[DONE]"
        out += b"data: " + line + b"\n\n"
    if not typed and not saw_done:
        out += b"data: [DONE]\n\n"
    return bytes(out)


def _payload_type(line: bytes) -> str | None:
    try:
        payload = json.loads(line)
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) and kind else None


def recorded_status(path: Path) -> int:
    """The status a recorded file was answered with: its .source says, else its name, else 200."""
    source = path.with_name(path.name + ".source")
    if source.is_file():
        found = _SOURCE_STATUS.search(source.read_text(encoding="utf-8", errors="replace"))
        if found:
            return int(found.group(1))
    by_name = _ERROR_FIXTURE_STATUS.search(path.name)
    return int(by_name.group(1)) if by_name else 200


def _injected_status(request: Request) -> int | None:
    value = request.headers.get("x-demo-status")
    if value is None:
        return None
    try:
        status = int(value)
    except ValueError as exc:
        raise BadRequest(400, f"demo upstream: bad x-demo-status {value!r}") from exc
    if not 200 <= status <= 599:
        raise BadRequest(400, f"demo upstream: x-demo-status out of range: {status}")
    return status


def _header_int(request: Request, name: str, low: int, high: int) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError as exc:
        raise BadRequest(400, f"demo upstream: bad {name} {value!r}") from exc
    if not low <= number <= high:
        raise BadRequest(400, f"demo upstream: {name} must be {low}..{high}")
    return number


def _require_method(request: Request, method: str) -> None:
    if request.method != method:
        raise BadRequest(405, f"demo upstream: {request.path} answers {method} only")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        raise BadRequest(400, "demo upstream: request body is not JSON") from exc
    if not isinstance(payload, dict):
        raise BadRequest(400, "demo upstream: request body must be a JSON object")
    return payload


def _dumps(value: object) -> bytes:
    # Compact like the providers' own wire format.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_reply(status: int, body: object) -> Reply:
    return Reply(status, "application/json", _dumps(body))


def error_reply(path: str, status: int, message: str) -> Reply:
    """An error body in the shape of the API the path belongs to (Anthropic or OpenAI)."""
    if path == "/v1/messages":
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return json_reply(status, {"type": "error", "error": {"type": kind, "message": message}})
    kind = {
        401: "invalid_api_key",
        404: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return json_reply(status, {"error": error})


def models_body() -> dict[str, Any]:
    created = int(time.time())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "edgemeter-demo"}
        for m in DEMO_MODELS
    ]
    return {"object": "list", "data": data}


def status_body() -> dict[str, Any]:
    # Shaped like NewAPI's /api/status: an admin surface the meter must not bill.
    return {"success": True, "message": "", "data": {"system_name": "edgemeter demo upstream"}}


def count_words(value: object) -> int:
    """Approximate tokens of a request: words of every string, plus pre-tokenised int arrays."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return sum(count_words(v) for k, v in value.items() if k in _TEXT_KEYS)
    return 0


# Keys under which a request carries text the model reads (chat, completions, embeddings,
# Responses, Anthropic); other keys (model, role, type, ...) are not prompt text.
_TEXT_KEYS = frozenset({"messages", "content", "text", "prompt", "input", "system", "instructions"})


def reply_pieces(text: str = CANNED_REPLY) -> list[str]:
    """The reply split into tokens (a word and the whitespace after it); they join to `text`."""
    return _WORD.findall(text)


def canned_reply(api: str, payload: dict[str, Any]) -> Reply:
    """The built-in answer for one API shape, streamed when the request says `"stream": true`."""
    stream = payload.get("stream") is True
    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    prompt_tokens = max(1, count_words({k: v for k, v in payload.items() if k in _TEXT_KEYS}))
    default_model = "claude-demo" if api == "anthropic.messages" else "demo-chat"
    model = str(payload.get("model") or default_model)
    if api == "openai.embeddings":
        return json_reply(200, embeddings_body(model, payload))
    if api == "openai.chat":
        if stream:
            return sse_reply(chat_chunks(model, prompt_tokens, include_usage))
        return json_reply(200, chat_body(model, prompt_tokens))
    if api == "openai.completions":
        if stream:
            return sse_reply(completion_chunks(model, prompt_tokens, include_usage))
        return json_reply(200, completion_body(model, prompt_tokens))
    if api == "openai.responses":
        if stream:
            return sse_reply(responses_events(model, prompt_tokens))
        return json_reply(200, response_object(model, "completed", prompt_tokens))
    if stream:
        return sse_reply(anthropic_events(model, prompt_tokens))
    return json_reply(200, anthropic_body(model, prompt_tokens))


def sse_reply(events: Iterator[tuple[str | None, str]]) -> Reply:
    """A text/event-stream body from (event name or None, data) pairs."""
    out = bytearray()
    for name, data in events:
        if name is not None:
            out += f"event: {name}\n".encode()
        out += f"data: {data}\n\n".encode()
    return Reply(200, "text/event-stream; charset=utf-8", bytes(out), stream=True)


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def chat_body(model: str, prompt_tokens: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": CANNED_REPLY, "refusal": None}
    return {
        "id": f"chatcmpl-demo{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": openai_usage(prompt_tokens, len(reply_pieces())),
        "system_fingerprint": "fp_demo",
    }


def chat_chunks(
    model: str, prompt_tokens: int, include_usage: bool
) -> Iterator[tuple[str | None, str]]:
    base: dict[str, Any] = {
        "id": f"chatcmpl-demo{secrets.token_hex(8)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_demo",
    }
    # Like OpenAI: with include_usage every chunk carries "usage": null until the last one.
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _dumps(base | {"choices": [choice]} | extra).decode()

    yield None, chunk({"role": "assistant", "content": ""}, None)
    for piece in reply_pieces():
        yield None, chunk({"content": piece}, None)
    yield None, chunk({}, "stop")
    if include_usage:
        usage = openai_usage(prompt_tokens, len(reply_pieces()))
        yield None, _dumps(base | {"choices": [], "usage": usage}).decode()
    yield None, "[DONE]"


def completion_body(model: str, prompt_tokens: int) -> dict[str, Any]:
    choice = {"text": CANNED_REPLY, "index": 0, "logprobs": None, "finish_reason": "stop"}
    return {
        "id": f"cmpl-demo{secrets.token_hex(8)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": openai_usage(prompt_tokens, len(reply_pieces())),
    }


def completion_chunks(
    model: str, prompt_tokens: int, include_usage: bool
) -> Iterator[tuple[str | None, str]]:
    base: dict[str, Any] = {
        "id": f"cmpl-demo{secrets.token_hex(8)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    pieces = reply_pieces()
    for i, piece in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        choice = {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}
        yield None, _dumps(base | {"choices": [choice]} | extra).decode()
    if include_usage:
        usage = openai_usage(prompt_tokens, len(pieces))
        yield None, _dumps(base | {"choices": [], "usage": usage}).decode()
    yield None, "[DONE]"


def embedding_vector(text: str) -> list[float]:
    """A deterministic unit vector per input, so equal inputs embed equally."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIMENSIONS]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


def embeddings_body(model: str, payload: dict[str, Any]) -> dict[str, Any]:
    raw_input = payload.get("input", "")
    # One embedding per input string (or per token array); a bare string or array is one input.
    if isinstance(raw_input, list) and raw_input and not isinstance(raw_input[0], int):
        inputs: list[Any] = raw_input
    else:
        inputs = [raw_input]
    as_base64 = payload.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs):
        vector = embedding_vector(json.dumps(item))
        embedding: Any = vector
        if as_base64:
            # OpenAI's base64 form: little-endian float32s (the openai SDK asks for it).
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = max(1, count_words(inputs))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def responses_usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def _output_message(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    status = "in_progress" if text is None else "completed"
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def response_object(
    model: str,
    status: str,
    prompt_tokens: int,
    response_id: str | None = None,
    item_id: str | None = None,
) -> dict[str, Any]:
    """A Responses API `response`; output and usage only once it is completed."""
    done = status == "completed"
    output = [_output_message(item_id or f"msg_demo{secrets.token_hex(8)}", CANNED_REPLY)]
    return {
        "id": response_id or f"resp_demo{secrets.token_hex(8)}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": responses_usage(prompt_tokens, len(reply_pieces())) if done else None,
        "user": None,
        "metadata": {},
    }


def responses_events(model: str, prompt_tokens: int) -> Iterator[tuple[str | None, str]]:
    response_id = f"resp_demo{secrets.token_hex(8)}"
    item_id = f"msg_demo{secrets.token_hex(8)}"
    sequence = 0

    def event(kind: str, body: dict[str, Any]) -> tuple[str, str]:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence} | body
        sequence += 1
        return kind, _dumps(payload).decode()

    in_progress = response_object(model, "in_progress", prompt_tokens, response_id, item_id)
    yield event("response.created", {"response": in_progress})
    yield event("response.in_progress", {"response": in_progress})
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event(
        "response.output_item.added", {"output_index": 0, "item": _output_message(item_id, None)}
    )
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", where | {"part": empty_part})
    for piece in reply_pieces():
        yield event("response.output_text.delta", where | {"delta": piece, "logprobs": []})
    yield event("response.output_text.done", where | {"text": CANNED_REPLY, "logprobs": []})
    yield event("response.content_part.done", where | {"part": empty_part | {"text": CANNED_REPLY}})
    done_item = _output_message(item_id, CANNED_REPLY)
    yield event("response.output_item.done", {"output_index": 0, "item": done_item})
    completed = response_object(model, "completed", prompt_tokens, response_id, item_id)
    yield event("response.completed", {"response": completed})


def anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def anthropic_body(model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": f"msg_demo{secrets.token_hex(8)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": CANNED_REPLY}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": anthropic_usage(prompt_tokens, len(reply_pieces())),
    }


def anthropic_events(model: str, prompt_tokens: int) -> Iterator[tuple[str | None, str]]:
    def event(body: dict[str, Any]) -> tuple[str, str]:
        return str(body["type"]), _dumps(body).decode()

    # message_start reports the prompt and one output token; message_delta is cumulative.
    message = anthropic_body(model, prompt_tokens) | {
        "content": [],
        "stop_reason": None,
        "usage": anthropic_usage(prompt_tokens, 1),
    }
    yield event({"type": "message_start", "message": message})
    block = {"type": "text", "text": ""}
    yield event({"type": "content_block_start", "index": 0, "content_block": block})
    yield event({"type": "ping"})
    for piece in reply_pieces():
        text_delta = {"type": "text_delta", "text": piece}
        yield event({"type": "content_block_delta", "index": 0, "delta": text_delta})
    yield event({"type": "content_block_stop", "index": 0})
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    usage = anthropic_usage(prompt_tokens, len(reply_pieces()))
    yield event({"type": "message_delta", "delta": delta, "usage": usage})
    yield event({"type": "message_stop"})


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    fixtures_dir: Path | None = None,
    chunk_size: int = 7,
    delay_ms: int = 0,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run a demo upstream until cancelled; `on_listening` gets its base URL once it listens."""
    upstream = DemoUpstream(fixtures_dir, chunk_size=chunk_size, delay_ms=delay_ms)
    server = await upstream.start(host, port)
    async with server:
        if on_listening is not None:
            on_listening(server_url(server))
        await server.serve_forever()


def server_url(server: asyncio.Server) -> str:
    """http://host:port of the first socket a server listens on."""
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


class BackgroundDemo:
    """A demo upstream on its own event loop in a daemon thread, for tests and embedding."""

    def __init__(self, upstream: DemoUpstream, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self._host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("demo upstream not started")
        return server_url(self._server)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self) -> BackgroundDemo:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            self.upstream.start(self._host, self._port), self._loop
        )
        self._server = started.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            server = self._server
            self._server = None

            async def close() -> None:
                server.close()
                self.upstream.close_connections()
                await server.wait_closed()

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BackgroundDemo:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo_upstream",
        description="A local OpenAI/Anthropic-compatible upstream with canned or recorded answers.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument(
        "--fixtures", type=Path, help="recorded responses, selected by the x-demo-fixture header"
    )
    parser.add_argument("--chunk-size", type=int, default=7, help="bytes per streamed chunk")
    parser.add_argument("--delay-ms", type=int, default=0, help="pause between streamed chunks")
    args = parser.parse_args(argv)
    if args.fixtures is not None and not args.fixtures.is_dir():
        parser.error(f"--fixtures {args.fixtures}: not a directory")
    if args.chunk_size < 1 or args.delay_ms < 0:
        parser.error("--chunk-size must be >= 1 and --delay-ms >= 0")

    def announce(url: str) -> None:
        fixtures = f" (replaying from {args.fixtures})" if args.fixtures else ""
        print(f"edgemeter demo upstream listening on {url}{fixtures}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.host,
                args.port,
                fixtures_dir=args.fixtures,
                chunk_size=args.chunk_size,
                delay_ms=args.delay_ms,
                on_listening=announce,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
