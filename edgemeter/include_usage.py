"""`meter_stream_usage`: ask the upstream for stream usage (`stream_options.include_usage`) when
the client did not, and take exactly that added usage back out of the client's stream.
"""

from __future__ import annotations

import json
import re

from edgemeter.usage import json_object

_LINE_END = re.compile(rb"\r\n|\r|\n")
_PREFIX = b'{"stream_options":{"include_usage":true},'


def inject(body: bytes) -> bytes | None:
    """The request body asking for stream usage, or None when it must stay as it is: not a
    streamed request, usage already asked for, or not a JSON object (never rewrite those)."""
    if b'"stream"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is None and "stream_options" not in obj:
        # Splice instead of re-serialising: the client's bytes stay as they were, and a large
        # prompt is not encoded again. The body is a non-empty object (it has "stream").
        start = body.index(b"{") + 1
        return _PREFIX + body[start:]
    obj["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete raw events (each with its blank line) and the incomplete rest of `buf`."""
    events: list[bytes] = []
    event_start = line_start = 0
    for m in _LINE_END.finditer(buf):
        if m.group() == b"\r" and m.end() == len(buf):
            break  # may be the first half of \r\n: wait for the next byte
        if m.start() == line_start and line_start > event_start:
            events.append(buf[event_start : m.end()])
            event_start = m.end()
        elif m.start() == line_start:
            event_start = m.end()  # a stray blank line between events: pass it on as its own
            events.append(buf[line_start : m.end()])
        line_start = m.end()
    return events, buf[event_start:]


def strip_event(raw: bytes) -> bytes:
    """The event as the client should see it: usage the client did not ask for removed.

    A usage-only chunk (no choices) is dropped; a chunk that also carries choices keeps them
    and loses only its `usage` key."""
    if b'"usage":{' not in raw and b'"usage": {' not in raw:
        return raw  # "usage":null rides on every include_usage chunk and is spec-valid
    lines = raw.splitlines(keepends=True)
    out: list[bytes] = []
    for line in lines:
        if not line.startswith(b"data:"):
            out.append(line)
            continue
        content = line.rstrip(b"\r\n")
        ending = line[len(content) :]
        payload = content[5:].lstrip(b" ")
        obj = json_object(payload)
        if obj is None or not isinstance(obj.get("usage"), dict):
            out.append(line)
            continue
        if not obj.get("choices"):
            return b""
        del obj["usage"]
        out.append(b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())
        out.append(ending)
    return b"".join(out)
