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
    upstreams flush a stream; a negative size: the whole body in one piece."""
    if size < 0:
        return [body]
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


def wav(seconds_x10: int, rate: int = 8000) -> bytes:
    """A silent mono 16-bit WAV file of `seconds_x10` tenths of a second (an upload whose length
    is known exactly: rate * seconds frames)."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * (rate * seconds_x10 // 10))
    return out.getvalue()


BOUNDARY = "edgemeter-test-boundary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"


def form(fields: dict[str, str], file: bytes | None = None, filename: str = "audio.wav") -> bytes:
    """A multipart/form-data body (RFC 7578) with text fields and one `file` part, as the
    official SDKs upload audio and images; its Content-Type is FORM."""
    out = b""
    for name, value in fields.items():
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    if file is not None:
        out += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + file
            + b"\r\n"
        )
    return out + f"--{BOUNDARY}--\r\n".encode()
