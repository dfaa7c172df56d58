"""The demo upstream's answers on the rest of the gateway's surface (images, audio, rerank,
moderations, Gemini, a Realtime WebSocket session): canned, a word a token, checkable by eye.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import re
import secrets
import struct
import time
import wave
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tools.demo_upstream import Reply, Request

# Tokens an image of the demo costs to make (gpt-image-1's "low" 1024x1024 is 272).
IMAGE_TOKENS = 272
# One pixel, transparent: the image every generation returns.
PIXEL_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100052d0b2d0000000049454e44ae426082"
    )
).decode()
# Audio input tokens per second of audio (OpenAI counts one per 100 ms).
AUDIO_TOKENS_PER_SECOND = 10
# Speech the demo "speaks": 15 characters a second, as 8 kHz 16-bit mono WAV.
SPEECH_CHARS_PER_SECOND = 15
SPEECH_RATE = 8000
TRANSCRIPT = "The demo upstream heard every word of this audio."
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_GEMINI = re.compile(r"^/v1(?:beta)?/models/([^/:]+):(generateContent|streamGenerateContent)$")
ROUTES = {
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/rerank",
    "/v1/moderations",
}


def words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def answers(path: str) -> bool:
    """Whether this module answers a POST to `path`."""
    return path in ROUTES or _GEMINI.match(path) is not None


def answer(request: Request) -> Reply:
    """The canned answer to a POST of the surface (see `answers`)."""
    from tools.demo_upstream import BadRequest, json_reply

    path = request.path
    form = _form(request)
    if (gemini := _GEMINI.match(path)) is not None:
        return _gemini(gemini.group(1), gemini.group(2) == "streamGenerateContent", form)
    if path in ("/v1/images/generations", "/v1/images/edits"):
        return json_reply(200, images_body(form))
    if path == "/v1/audio/transcriptions":
        return _transcription(form)
    if path == "/v1/audio/translations":
        return json_reply(200, {"text": TRANSCRIPT})  # whisper's translations report nothing
    if path == "/v1/audio/speech":
        return _speech(form)
    if path == "/v1/rerank":
        return json_reply(200, rerank_body(form))
    if path == "/v1/moderations":
        return json_reply(200, moderation_body(form))
    raise BadRequest(404, f"demo upstream: no route for {path}")


# -- request bodies ------------------------------------------------------------------------------


def _form(request: Request) -> dict[str, Any]:
    """A JSON body's keys, or a multipart form's fields (text as str, files as bytes)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError:
            return {}
        return payload if isinstance(payload, dict) else {}
    boundary = ctype.split("boundary=", 1)[-1].strip('"')
    out: dict[str, Any] = {}
    for part in request.body.split(b"--" + boundary.encode())[1:]:
        head, _, data = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name is None:
            continue
        value = data.removesuffix(b"\r\n")
        is_file = b"filename=" in head
        out[name.group(1).decode()] = value if is_file else value.decode("utf-8", "replace")
    return out


def audio_seconds(data: object) -> float:
    """How long an uploaded WAV plays (other formats: one second)."""
    if isinstance(data, bytes):
        try:
            with wave.open(io.BytesIO(data)) as w:
                return float(w.getnframes() / w.getframerate())
        except (wave.Error, EOFError):
            pass
    return 1.0


# -- answers -------------------------------------------------------------------------------------


def images_body(form: dict[str, Any]) -> dict[str, Any]:
    model = str(form.get("model") or "gpt-image-1")
    n = int(form.get("n") or 1)
    body: dict[str, Any] = {"created": int(time.time()), "data": [{"b64_json": PIXEL_PNG}] * n}
    if model.startswith("dall-e"):
        return body  # per-image models report no usage
    prompt = words(form.get("prompt"))
    body.update(
        size=form.get("size") or "1024x1024",
        quality=form.get("quality") or "low",
        usage={
            "input_tokens": prompt,
            "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
            "output_tokens": IMAGE_TOKENS * n,
            "total_tokens": prompt + IMAGE_TOKENS * n,
        },
    )
    return body


def _transcription(form: dict[str, Any]) -> Reply:
    from tools.demo_upstream import Reply, json_reply, sse_reply

    model = str(form.get("model") or "whisper-1")
    seconds = audio_seconds(form.get("file"))
    fmt = form.get("response_format") or "json"
    if fmt == "text":
        return Reply(200, "text/plain; charset=utf-8", TRANSCRIPT.encode() + b"\n")
    if model.startswith("whisper"):
        # whisper-1 reports the seconds of audio it billed.
        usage: dict[str, Any] = {"type": "duration", "seconds": math.ceil(seconds)}
    else:
        audio = round(seconds * AUDIO_TOKENS_PER_SECOND)
        usage = {
            "type": "tokens",
            "input_tokens": audio,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
            "output_tokens": words(TRANSCRIPT),
            "total_tokens": audio + words(TRANSCRIPT),
        }
    if form.get("stream") == "true":
        pieces = re.findall(r"\S+\s*", TRANSCRIPT)
        events = [(None, json.dumps({"type": "transcript.text.delta", "delta": p})) for p in pieces]
        done = {"type": "transcript.text.done", "text": TRANSCRIPT, "usage": usage}
        return sse_reply(iter([*events, (None, json.dumps(done))]))
    if fmt == "verbose_json":
        return json_reply(200, {"task": "transcribe", "duration": seconds, "text": TRANSCRIPT})
    return json_reply(200, {"text": TRANSCRIPT, "usage": usage})


def speech_wav(text: str) -> bytes:
    """Silence as long as the text takes to say (15 characters a second)."""
    frames = SPEECH_RATE * len(text) // SPEECH_CHARS_PER_SECOND
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SPEECH_RATE)
        w.writeframes(b"\0\0" * frames)
    return out.getvalue()


def _speech(form: dict[str, Any]) -> Reply:
    from tools.demo_upstream import Reply, sse_reply

    text = str(form.get("input") or "")
    audio = speech_wav(text)
    if form.get("stream_format") != "sse":
        return Reply(200, "audio/wav", audio)
    out_tokens = len(audio) // 1600  # ~ one token per 50 ms of 8 kHz audio
    usage = {
        "input_tokens": words(text),
        "output_tokens": out_tokens,
        "total_tokens": words(text) + out_tokens,
    }
    delta = {"type": "speech.audio.delta", "audio": base64.b64encode(audio[:3000]).decode()}
    done = {"type": "speech.audio.done", "usage": usage}
    return sse_reply(iter([(None, json.dumps(delta)), (None, json.dumps(done))]))


def rerank_body(form: dict[str, Any]) -> dict[str, Any]:
    """NewAPI's /v1/rerank answer (Jina's shape): results and a usage of prompt tokens."""
    documents = form.get("documents") or []
    tokens = words(form.get("query")) + sum(words(d) for d in documents)
    results = [
        {"index": i, "relevance_score": round(1 / (i + 1), 4)} for i in range(len(documents))
    ]
    return {
        "model": form.get("model") or "rerank-demo",
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def moderation_body(form: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"modr-demo{secrets.token_hex(8)}",
        "model": form.get("model") or "omni-moderation-latest",
        "results": [{"flagged": False, "categories": {}, "category_scores": {}}],
    }


def _gemini(model: str, stream: bool, form: dict[str, Any]) -> Reply:
    from tools.demo_upstream import CANNED_REPLY, json_reply, reply_pieces, sse_reply

    prompt = max(
        1, sum(words(p.get("text")) for c in form.get("contents", []) for p in c.get("parts", []))
    )
    response_id = f"demo{secrets.token_hex(8)}"

    def chunk(text: str, produced: int, last: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        if last:
            candidate["finishReason"] = "STOP"
        return {
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": prompt,
                "candidatesTokenCount": produced,
                "totalTokenCount": prompt + produced,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            },
            "modelVersion": model,
            "responseId": response_id,
        }

    pieces = reply_pieces()
    if not stream:
        return json_reply(200, chunk(CANNED_REPLY, len(pieces), True))

    def events() -> Iterator[tuple[str | None, str]]:
        for i, piece in enumerate(pieces):
            yield None, json.dumps(chunk(piece, i + 1, i == len(pieces) - 1))

    return sse_reply(events())


# -- Realtime over a WebSocket -------------------------------------------------------------------


def is_upgrade(request: Request) -> bool:
    return (
        request.method == "GET"
        and request.path == "/v1/realtime"
        and request.headers.get("upgrade", "").lower() == "websocket"
    )


async def realtime(
    request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A Realtime session: the upgrade, session.created, then answers to the client's events
    (session.update, conversation.item.create, input_audio_buffer.append/commit,
    response.create) until the client closes."""
    key = request.headers.get("sec-websocket-key", "")
    accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
    writer.write(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    model = request.target.partition("model=")[2].split("&", 1)[0] or "gpt-realtime"
    session = Session(model)
    await _send(writer, session.event("session.created", session=session.describe()))
    while True:
        opcode, payload = await _frame(reader)
        if opcode == 8:  # close: echo it, then end
            await _write_frame(writer, 8, payload[:2])
            return
        if opcode == 9:  # ping
            await _write_frame(writer, 10, payload)
            continue
        if opcode != 1:
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        for reply in session.answer(event if isinstance(event, dict) else {}):
            await _send(writer, reply)


class Session:
    """What a demo Realtime session remembers between events."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"sess_demo{secrets.token_hex(6)}"
        self.transcriber: str | None = None
        self.text_words = 0
        self.audio_bytes = 0
        self.count = 0

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.count += 1
        return {"type": kind, "event_id": f"event_demo{self.count}", **fields}

    def describe(self) -> dict[str, Any]:
        transcription = {"model": self.transcriber} if self.transcriber else None
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": ["text"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": transcription,
                }
            },
        }

    def answer(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "session.update":
            session = event.get("session") or {}
            wanted = ((session.get("audio") or {}).get("input") or {}).get("transcription") or {}
            self.transcriber = wanted.get("model") or self.transcriber
            return [self.event("session.updated", session=self.describe())]
        if kind == "conversation.item.create":
            item = event.get("item") or {}
            self.text_words += sum(words(c.get("text")) for c in item.get("content") or [])
            return [self.event("conversation.item.added", previous_item_id=None, item=item)]
        if kind == "input_audio_buffer.append":
            self.audio_bytes += len(base64.b64decode(event.get("audio") or ""))
            return []
        if kind == "input_audio_buffer.commit":
            item_id = f"item_demo{secrets.token_hex(6)}"
            seconds = math.ceil(self.audio_bytes / 48_000) if self.audio_bytes else 1
            out = [
                self.event("input_audio_buffer.committed", previous_item_id=None, item_id=item_id)
            ]
            if self.transcriber:
                out.append(
                    self.event(
                        "conversation.item.input_audio_transcription.completed",
                        item_id=item_id,
                        content_index=0,
                        transcript=TRANSCRIPT,
                        usage={"type": "duration", "seconds": seconds},
                    )
                )
            return out
        if kind == "response.create":
            return self._respond()
        return []

    def _respond(self) -> list[dict[str, Any]]:
        from tools.demo_upstream import CANNED_REPLY, reply_pieces

        response_id = f"resp_demo{secrets.token_hex(6)}"
        # pcm16 at 24 kHz: 48,000 bytes a second, one token per 100 ms.
        audio = self.audio_bytes * AUDIO_TOKENS_PER_SECOND // 48_000
        text, self.text_words, self.audio_bytes = self.text_words, 0, 0
        base = {"object": "realtime.response", "id": response_id, "output_modalities": ["text"]}
        out = [
            self.event(
                "response.created",
                response=base | {"status": "in_progress", "output": [], "usage": None},
            )
        ]
        for piece in reply_pieces():
            out.append(
                self.event(
                    "response.output_text.delta",
                    response_id=response_id,
                    item_id="item_out",
                    output_index=0,
                    content_index=0,
                    delta=piece,
                )
            )
        produced = len(reply_pieces())
        usage = {
            "total_tokens": text + audio + produced,
            "input_tokens": text + audio,
            "output_tokens": produced,
            "input_token_details": {
                "text_tokens": text,
                "audio_tokens": audio,
                "image_tokens": 0,
                "cached_tokens": 0,
            },
            "output_token_details": {"text_tokens": produced, "audio_tokens": 0},
        }
        message = {
            "id": "item_out",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": CANNED_REPLY}],
        }
        out.append(
            self.event(
                "response.done",
                response=base | {"status": "completed", "output": [message], "usage": usage},
            )
        )
        return out


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole message from the client (continuation frames joined, masks removed)."""
    payload = b""
    opcode = 0
    while True:
        head = await reader.readexactly(2)
        fin, op = head[0] & 0x80, head[0] & 0x0F
        opcode = opcode or op
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await reader.readexactly(8))[0]
        mask = await reader.readexactly(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = await reader.readexactly(length)
        payload += bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        if fin:
            return opcode, payload


async def _send(writer: asyncio.StreamWriter, event: dict[str, Any]) -> None:
    await _write_frame(writer, 1, json.dumps(event).encode())


async def _write_frame(writer: asyncio.StreamWriter, opcode: int, payload: bytes) -> None:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    writer.write(head + payload)
    await writer.drain()
