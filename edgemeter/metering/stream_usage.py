"""`meter_stream_usage`: ask the upstream for stream usage (`stream_options.include_usage`) when
the client did not, and take exactly that added usage back out of the client's stream.
"""

from __future__ import annotations

import json

from edgemeter.metering.usage import json_object

_PREFIX = b'{"stream_options":{"include_usage":true},'


def inject(body: bytes) -> bytes | None:
    """The request body asking for stream usage, or None when it must stay as it is: not a
    streamed request, usage already asked for, or not a JSON object in UTF-8 (RFC 8259; never
    rewrite anything else, including what Python's json also reads: UTF-16, a BOM, CESU-8)."""
    if b'"stream"' not in body:
        return None
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
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
    return _dumps(obj)


def _dumps(obj: object) -> bytes | None:
    """Compact JSON keeping non-ASCII text as it came; escaped where the text cannot be UTF-8
    (lone surrogates from \\ud800-style escapes); None where it cannot be written at all."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        return None


def strip_event(raw: bytes) -> bytes:
    """The event as the client should see it: usage the client did not ask for removed.

    A usage-only chunk (no choices) is dropped; a chunk that also carries choices keeps them
    and loses only its `usage` key."""
    if raw.find(b'"usage":{') < 0 and raw.find(b'"usage": {') < 0:  # find: see SSEDecoder.whole
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
        if (stripped := _dumps(obj)) is None:
            out.append(line)
            continue
        out.append(b"data: " + stripped)
        out.append(ending)
    return b"".join(out)
