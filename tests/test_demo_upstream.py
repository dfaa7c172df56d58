"""The demo upstream: canned answers per API shape, replay of recorded files, chunked streams,
status injection, and its command line."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tools.demo_upstream import (
    CANNED_REPLY,
    BackgroundDemo,
    DemoUpstream,
    count_words,
    frame_chunks,
)

REPLY_TOKENS = 14  # words of CANNED_REPLY: the demo counts one token per word


@pytest.fixture
def client(demo_upstream: BackgroundDemo) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=demo_upstream.url, timeout=10) as c:
        yield c


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    """(event name or None, data) per SSE event of a whole body."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw request bytes, read until the server closes (the request says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def post_raw(path: str, headers: dict[str, str], body: bytes = b"{}") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: demo", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def dechunk(body: bytes) -> list[bytes]:
    """The chunks of a Transfer-Encoding: chunked body, in order (the last empty one dropped)."""
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def _chat_usage(body: dict[str, Any]) -> tuple[int, int]:
    return body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]


def _responses_usage(body: dict[str, Any]) -> tuple[int, int]:
    return body["usage"]["input_tokens"], body["usage"]["output_tokens"]


CANNED_NONSTREAM: list[
    tuple[str, dict[str, Any], tuple[int, int], Callable[..., tuple[int, int]]]
] = [
    (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "one two three"}]},
        (3, REPLY_TOKENS),
        _chat_usage,
    ),
    ("/v1/completions", {"model": "m", "prompt": "one two"}, (2, REPLY_TOKENS), _chat_usage),
    ("/v1/responses", {"model": "m", "input": "a b c d"}, (4, REPLY_TOKENS), _responses_usage),
    (
        "/v1/messages",
        {"model": "c", "system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
        (3, REPLY_TOKENS),
        _responses_usage,
    ),
    (
        "/v1/embeddings",
        {"model": "e", "input": ["a b", "c"]},
        (3, 0),
        lambda b: (b["usage"]["prompt_tokens"], b["usage"]["total_tokens"] - 3),
    ),
]


@pytest.mark.parametrize(("path", "payload", "tokens", "usage_of"), CANNED_NONSTREAM)
def test_canned_answers_count_words_as_tokens(
    client: httpx2.Client,
    path: str,
    payload: dict[str, Any],
    tokens: tuple[int, int],
    usage_of: Callable[[dict[str, Any]], tuple[int, int]],
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    body = response.json()
    assert usage_of(body) == tokens
    assert body["model"] == payload["model"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_canned_chat_stream_ends_with_usage_only_when_asked(
    client: httpx2.Client, include_usage: bool
) -> None:
    payload: dict[str, Any] = {
        "model": "demo-chat",
        "stream": True,
        "messages": [{"role": "user", "content": "say something nice"}],
    }
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    response = client.post("/v1/chat/completions", json=payload)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = sse_events(response.content)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == CANNED_REPLY
    usages = [c["usage"] for c in chunks if c.get("usage")]
    if include_usage:
        assert usages == [
            {
                "prompt_tokens": 3,
                "completion_tokens": REPLY_TOKENS,
                "total_tokens": 3 + REPLY_TOKENS,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            }
        ]
        assert chunks[-1]["choices"] == []
    else:
        assert usages == []
        assert all("usage" not in c for c in chunks)


def test_canned_anthropic_stream_names_each_event(client: httpx2.Client) -> None:
    payload = {
        "model": "claude-demo",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    events = sse_events(client.post("/v1/messages", json=payload).content)
    parsed = [(name, json.loads(data)) for name, data in events]
    assert all(name == body["type"] for name, body in parsed)
    names = [name for name, _ in parsed]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start_usage = parsed[0][1]["message"]["usage"]
    assert (start_usage["input_tokens"], start_usage["output_tokens"]) == (2, 1)
    assert parsed[-2][1]["usage"]["output_tokens"] == REPLY_TOKENS
    text = "".join(b["delta"]["text"] for n, b in parsed if n == "content_block_delta")
    assert text == CANNED_REPLY


def test_canned_responses_stream_completes_with_usage(client: httpx2.Client) -> None:
    payload = {"model": "demo-chat", "stream": True, "input": "one two three four five"}
    events = sse_events(client.post("/v1/responses", json=payload).content)
    parsed = [(name, json.loads(data)) for name, data in events]
    assert all(name == body["type"] for name, body in parsed)
    assert [b["sequence_number"] for _, b in parsed] == list(range(len(parsed)))
    assert parsed[0][0] == "response.created"
    assert parsed[-1][0] == "response.completed"
    usage = parsed[-1][1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (5, REPLY_TOKENS)
    deltas = "".join(b["delta"] for n, b in parsed if n == "response.output_text.delta")
    assert deltas == CANNED_REPLY
    # The Responses API sends no [DONE] sentinel.
    assert all(data != "[DONE]" for _, data in events)


def test_official_sdks_read_canned_answers(demo_upstream: BackgroundDemo) -> None:
    oai = openai.OpenAI(base_url=f"{demo_upstream.url}/v1", api_key="sk-test-demo", max_retries=0)
    messages: Any = [{"role": "user", "content": "two words"}]
    chat = oai.chat.completions.create(model="demo-chat", messages=messages)
    assert chat.choices[0].message.content == CANNED_REPLY
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (2, REPLY_TOKENS)

    stream = oai.chat.completions.create(
        model="demo-chat", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    streamed = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert streamed == CANNED_REPLY
    assert usage is not None
    assert usage.total_tokens == 2 + REPLY_TOKENS

    # The SDK asks for base64 embeddings and decodes them into floats.
    embedded = oai.embeddings.create(model="demo-embed", input=["alpha beta", "gamma"])
    assert [len(e.embedding) for e in embedded.data] == [8, 8]
    assert embedded.usage.prompt_tokens == 3

    response = oai.responses.create(model="demo-chat", input="three little words")
    assert response.output_text == CANNED_REPLY
    assert response.usage is not None
    assert response.usage.input_tokens == 3

    claude = anthropic.Anthropic(base_url=demo_upstream.url, api_key="sk-test-demo", max_retries=0)
    message = claude.messages.create(
        model="claude-demo", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == CANNED_REPLY
    assert message.usage.output_tokens == REPLY_TOKENS
    with claude.messages.stream(
        model="claude-demo", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as message_stream:
        assert "".join(message_stream.text_stream) == CANNED_REPLY
        final = message_stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens) == (1, REPLY_TOKENS)


def test_embeddings_are_deterministic_in_both_encodings(client: httpx2.Client) -> None:
    floats = client.post("/v1/embeddings", json={"model": "e", "input": "same text"}).json()
    encoded = client.post(
        "/v1/embeddings", json={"model": "e", "input": "same text", "encoding_format": "base64"}
    ).json()
    vector = floats["data"][0]["embedding"]
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)
    assert sum(x * x for x in vector) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("openai-chat-nonstream.json", "application/json"),
        ("anthropic-messages-nonstream.json", "application/json"),
        ("openai-chat-stream-tool-call-usage.raw.sse", "text/event-stream; charset=utf-8"),
        ("anthropic-messages-stream-simple.raw.sse", "text/event-stream; charset=utf-8"),
        ("anthropic-openai-compat-raw.sse", "text/event-stream; charset=utf-8"),
    ],
)
def test_replay_sends_recorded_bytes_unchanged(
    client: httpx2.Client, recorded: Path, name: str, content_type: str
) -> None:
    response = client.post("/v1/chat/completions", json={}, headers={"x-demo-fixture": name})
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == (recorded / name).read_bytes()


def test_replay_ignores_what_the_request_asks_for(client: httpx2.Client, recorded: Path) -> None:
    # The fixture decides the shape: a streamed request still gets a recorded JSON body.
    name = "openai-chat-nonstream.json"
    response = client.post(
        "/v1/chat/completions", json={"stream": True}, headers={"x-demo-fixture": name}
    )
    assert response.content == (recorded / name).read_bytes()


def test_replay_frames_openai_chunk_files_with_done(client: httpx2.Client, recorded: Path) -> None:
    name = "openai-chat-stream-include-usage.chunks.txt"
    lines = (recorded / name).read_text().splitlines()
    response = client.post("/v1/chat/completions", json={}, headers={"x-demo-fixture": name})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = sse_events(response.content)
    assert events == [(None, line) for line in lines] + [(None, "[DONE]")]
    assert response.content.endswith(b"}\n\ndata: [DONE]\n\n")


def test_replay_frames_anthropic_chunk_files_with_event_lines(
    client: httpx2.Client, recorded: Path
) -> None:
    name = "anthropic-messages-stream-text.chunks.txt"
    lines = (recorded / name).read_text().splitlines()
    response = client.post("/v1/messages", json={}, headers={"x-demo-fixture": name})
    expected = [(json.loads(line)["type"], line) for line in lines]
    assert sse_events(response.content) == expected
    assert response.content.startswith(b"event: message_start\ndata: {")
    assert b"[DONE]" not in response.content


@pytest.mark.parametrize(
    ("data", "framed"),
    [
        (b'{"id":"a"}\n{"id":"b"}', b'data: {"id":"a"}\n\ndata: {"id":"b"}\n\ndata: [DONE]\n\n'),
        (b'{"id":"a"}\n[DONE]\n', b'data: {"id":"a"}\n\ndata: [DONE]\n\n'),
        (
            b'{"type":"message_start"}\n\n{"type":"ping"}\n',
            b'event: message_start\ndata: {"type":"message_start"}\n\n'
            b'event: ping\ndata: {"type":"ping"}\n\n',
        ),
        (
            b'{"type":"response.completed","response":{}}',
            b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n',
        ),
    ],
)
def test_chunk_lines_are_framed_as_sse(data: bytes, framed: bytes) -> None:
    assert frame_chunks(data) == framed


def test_streams_go_out_in_small_chunks(demo_upstream: BackgroundDemo, recorded: Path) -> None:
    name = "anthropic-messages-stream-simple.raw.sse"
    expected = (recorded / name).read_bytes()
    reply = raw_exchange(
        demo_upstream.port,
        post_raw("/v1/messages", {"x-demo-fixture": name, "Connection": "close"}),
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    chunks = dechunk(body)
    assert b"".join(chunks) == expected
    assert {len(c) for c in chunks[:-1]} == {7}
    assert 1 <= len(chunks[-1]) <= 7
    assert len(chunks) == -(-len(expected) // 7)


def test_headers_pace_one_stream(demo_upstream: BackgroundDemo, recorded: Path) -> None:
    name = "anthropic-messages-stream-simple.raw.sse"
    size = (recorded / name).stat().st_size
    headers = {"x-demo-fixture": name, "x-demo-chunk-size": "100", "Connection": "close"}
    reply = raw_exchange(demo_upstream.port, post_raw("/v1/messages", headers))
    chunks = dechunk(reply.partition(b"\r\n\r\n")[2])
    assert [len(c) for c in chunks] == [100] * (size // 100) + [size % 100]


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-demo-chunk-size", "0"), ("x-demo-chunk-size", "big"), ("x-demo-delay-ms", "-1")],
)
def test_bad_pacing_headers_are_refused(client: httpx2.Client, name: str, value: str) -> None:
    response = client.post("/v1/chat/completions", json={"stream": True}, headers={name: value})
    assert response.status_code == 400
    assert name in response.json()["error"]["message"]


def test_delay_spaces_out_streamed_chunks(recorded: Path) -> None:
    name = "anthropic-messages-stream-simple.raw.sse"
    size = (recorded / name).stat().st_size
    with BackgroundDemo(DemoUpstream(recorded, chunk_size=200, delay_ms=30)) as slow:
        started = time.monotonic()
        reply = raw_exchange(
            slow.port, post_raw("/v1/messages", {"x-demo-fixture": name, "Connection": "close"})
        )
        elapsed = time.monotonic() - started
    chunks = dechunk(reply.partition(b"\r\n\r\n")[2])
    assert [len(c) for c in chunks] == [200] * (size // 200) + [size % 200]
    # One pause follows every chunk: a lower bound holds on any machine.
    assert elapsed >= len(chunks) * 0.030


@pytest.mark.parametrize(
    ("path", "status", "payload", "error_of"),
    [
        ("/v1/chat/completions", 429, {}, lambda b: b["error"]["type"] == "rate_limit_error"),
        (
            "/v1/chat/completions",
            500,
            {"stream": True},
            lambda b: b["error"]["type"] == "server_error",
        ),
        ("/v1/embeddings", 401, {}, lambda b: b["error"]["type"] == "invalid_api_key"),
        (
            "/v1/messages",
            429,
            {"stream": True},
            lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error",
        ),
        ("/v1/messages", 529, {}, lambda b: b["error"]["type"] == "overloaded_error"),
    ],
)
def test_injected_status_answers_an_api_shaped_error(
    client: httpx2.Client,
    path: str,
    status: int,
    payload: dict[str, Any],
    error_of: Callable[[dict[str, Any]], bool],
) -> None:
    response = client.post(path, json=payload, headers={"x-demo-status": str(status)})
    assert response.status_code == status
    # Even a streamed request gets its error as JSON, as the providers do.
    assert response.headers["content-type"] == "application/json"
    assert error_of(response.json())


@pytest.mark.parametrize(
    ("name", "headers", "status"),
    [
        ("openrouter-error-429.json", {}, 429),  # from its .source
        ("openai-chat-error-400.json", {}, 400),  # from its name
        ("openai-chat-error-400.json", {"x-demo-status": "503"}, 503),
        ("openai-chat-nonstream.json", {}, 200),
    ],
)
def test_recorded_responses_keep_their_status(
    client: httpx2.Client, recorded: Path, name: str, headers: dict[str, str], status: int
) -> None:
    response = client.post(
        "/v1/chat/completions", json={}, headers={"x-demo-fixture": name, **headers}
    )
    assert response.status_code == status
    assert response.content == (recorded / name).read_bytes()


@pytest.mark.parametrize(
    "name", ["../SPEC.md", "nope.json", ".hidden", "INDEX.txt", "sub/openai-chat-nonstream.json"]
)
def test_unusable_fixture_names_are_refused(client: httpx2.Client, name: str) -> None:
    response = client.post("/v1/chat/completions", json={}, headers={"x-demo-fixture": name})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("demo upstream:")


def test_fixture_header_needs_a_fixtures_dir() -> None:
    with BackgroundDemo(DemoUpstream()) as bare, httpx2.Client(base_url=bare.url) as c:
        response = c.post(
            "/v1/chat/completions",
            json={},
            headers={"x-demo-fixture": "openai-chat-nonstream.json"},
        )
    assert response.status_code == 400
    assert "--fixtures" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/models", 200),
        ("GET", "/api/status", 200),
        ("GET", "/v1/nothing-here", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
    ],
)
def test_routes_answer_their_methods(
    client: httpx2.Client, method: str, path: str, status: int
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    body = response.json()
    if status == 200:
        assert body.get("object") == "list" or body.get("success") is True
    else:
        assert "error" in body


def test_models_lists_the_demo_models(client: httpx2.Client) -> None:
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["demo-chat", "demo-embed", "claude-demo"]


def test_bad_request_bodies_are_refused(client: httpx2.Client) -> None:
    not_json = client.post("/v1/chat/completions", content=b"{nope")
    not_object = client.post("/v1/chat/completions", json=[1, 2])
    bad_status = client.post("/v1/chat/completions", json={}, headers={"x-demo-status": "abc"})
    assert [r.status_code for r in (not_json, not_object, bad_status)] == [400, 400, 400]


def test_one_connection_serves_several_requests(demo_upstream: BackgroundDemo) -> None:
    body = json.dumps({"model": "m", "prompt": "a"}).encode()
    with socket.create_connection(("127.0.0.1", demo_upstream.port), timeout=10) as sock:
        answers = []
        for _ in range(3):
            sock.sendall(post_raw("/v1/completions", {}, body))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Connection: keep-alive" in head
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            payload = b""
            while len(payload) < length:
                payload += sock.recv(length - len(payload))
            answers.append(json.loads(payload))
    assert [a["object"] for a in answers] == ["text_completion"] * 3


def test_chunked_request_bodies_are_read(demo_upstream: BackgroundDemo) -> None:
    body = json.dumps({"model": "m", "prompt": "one two three four"}).encode()
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:])) + b"0\r\n\r\n"
    head = "POST /v1/completions HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n"
    head += "Connection: close\r\n\r\n"
    reply = raw_exchange(demo_upstream.port, head.encode() + framed)
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["prompt_tokens"] == 4


def test_received_requests_are_kept_for_inspection(
    client: httpx2.Client, demo_upstream: BackgroundDemo
) -> None:
    client.post("/v1/completions", json={"prompt": "x"}, headers={"x-customer-id": "cus_seen"})
    seen = [
        r for r in demo_upstream.upstream.received if r.headers.get("x-customer-id") == "cus_seen"
    ]
    assert len(seen) == 1
    assert seen[0].path == "/v1/completions"
    assert json.loads(seen[0].body) == {"prompt": "x"}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("one two  three", 3),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}]}]}, 2),
        ({"model": "ignored words here", "prompt": ["a", "b c"]}, 3),
        ({"input": [[1, 2, 3], [4]]}, 4),
        ({"system": "s", "instructions": "i j", "stream": True}, 3),
    ],
)
def test_prompt_words_are_counted_as_tokens(value: object, words: int) -> None:
    assert count_words(value) == words


def test_command_line_serves_until_interrupted(recorded: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.demo_upstream", "--port", "0", "--fixtures", str(recorded)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        response = httpx2.post(
            f"{found.group(1)}/v1/messages",
            json={},
            headers={"x-demo-fixture": "anthropic-messages-nonstream.json"},
        )
        assert response.content == (recorded / "anthropic-messages-nonstream.json").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
