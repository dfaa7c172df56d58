"""The fields of a request the audio and image routes bill on: a multipart/form-data upload's
parts (RFC 7578), or a JSON body's keys; bounded, open-world, never raising.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgemeter.metering.usage import json_object

# An upload names a handful of fields (file, model, prompt, response_format, ...): past this
# many parts the rest is not read.
MAX_PARTS = 64
# A text field longer than this is not a model, size or prompt the meter needs whole.
MAX_FIELD_BYTES = 64 * 1024
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;,\s]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a form: its bytes, and whether it is an uploaded file."""

    data: bytes
    is_file: bool


def parts(body: bytes, content_type: str) -> dict[str, Part]:
    """The parts of a multipart/form-data body by name (the first of a name wins); {} for a
    body that is not one."""
    if not content_type.lower().startswith("multipart/form-data"):
        return {}
    found = _BOUNDARY.search(content_type)
    if found is None:
        return {}
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    out: dict[str, Part] = {}
    # Each part sits between two delimiters: "--boundary\r\nheaders\r\n\r\ndata\r\n--boundary".
    for chunk in body.split(delimiter)[1 : MAX_PARTS + 1]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        name = _NAME.search(head)
        if name is None:
            continue
        key = name.group(1).decode("utf-8", "replace")
        if key not in out:
            out[key] = Part(data.removesuffix(b"\r\n"), _FILENAME.search(head) is not None)
    return out


def fields(body: bytes, content_type: str) -> dict[str, Any]:
    """The request's named values: a form's text fields (as str), or a JSON object's keys."""
    if content_type.lower().startswith("multipart/form-data"):
        return {
            name: part.data.decode("utf-8", "replace")
            for name, part in parts(body, content_type).items()
            if not part.is_file and len(part.data) <= MAX_FIELD_BYTES
        }
    return json_object(body) or {}


def upload(body: bytes, content_type: str, name: str = "file") -> bytes | None:
    """The bytes of the uploaded file named `name`, None if the request carries none."""
    part = parts(body, content_type).get(name)
    return part.data if part is not None and part.is_file else None
