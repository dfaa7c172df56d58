"""Reads recorded responses from ../shared/fixtures/recorded as the bytes an upstream would send."""

from __future__ import annotations

import json
import re
from pathlib import Path


def is_stream(path: Path) -> bool:
    return path.name.endswith((".sse", ".chunks.txt"))


def wire_body(path: Path) -> bytes:
    """`.chunks.txt` holds one data payload per line: frame each as an SSE event (with the
    `event:` line Anthropic sends), and end OpenAI-shaped streams with [DONE]."""
    raw = path.read_bytes()
    if not path.name.endswith(".chunks.txt"):
        return raw
    out: list[bytes] = []
    anthropic = False
    for line in raw.splitlines():
        if not line.strip():
            continue
        kind = ""
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("type"), str):
            kind = obj["type"]
            anthropic = anthropic or kind.startswith("message")
        if anthropic and kind:
            out.append(f"event: {kind}\n".encode())
        out.append(b"data: " + line + b"\n\n")
    if not anthropic and b"[DONE]" not in raw:
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def chunked(body: bytes, size: int) -> list[bytes]:
    """`size`-byte chunks; size 0: one chunk per SSE event (cut after each blank line), as
    upstreams flush a stream."""
    if size == 0:
        return [piece for piece in _AFTER_BLANK_LINE.split(body) if piece]
    return [body[i : i + size] for i in range(0, len(body), size)]


_AFTER_BLANK_LINE = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)|(?<=\r\r)")


def api_of(name: str) -> str:
    """The API shape of a recorded stream, from its file name."""
    if name.startswith(("anthropic-messages", "anthropic-compatible")):
        return "anthropic.messages"
    if "responses" in name:
        return "openai.responses"
    if "completions-legacy" in name:
        return "openai.completions"
    return "openai.chat"
