"""Spooled values that carry their own subject and headers: whoever spooled a message decides where
it goes, and every publisher of the spool (after a crash, a restart, a drain) sends it there.

A plain value is published as it is, on the publisher's subject with only `Nats-Msg-Id`. A routed
value is `ROUTED`, a subject line ("" for the publisher's subject), `Name: value` lines, an empty
line, then the message body: text framing, so a value stays readable in the spool's database.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from spool.errors import RouteError

# No JSON text, and no other text a spool is likely to hold, starts with a NUL byte.
ROUTED: Final = b"\x00route/1\n"
_ROUTED_TEXT: Final = ROUTED.decode("ascii")
# The publisher sets this one itself (the key of the value): a route cannot replace it.
MSG_ID_HEADER: Final = "Nats-Msg-Id"
# A NATS subject to publish on: dot-separated tokens of printable ASCII without wildcards.
_TOKEN: Final = r"[^\x00-\x20\x7f-\U0010ffff*>.]+"
_SUBJECT: Final = re.compile(rf"{_TOKEN}(\.{_TOKEN})*")
# RFC 9110 token characters (NATS headers follow HTTP's), and values in printable ASCII.
_NAME_CHARS: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE_CHARS: Final = r"[!-~](?:[ -~]*[!-~])?"
_NAME: Final = re.compile(_NAME_CHARS)
_VALUE: Final = re.compile(_VALUE_CHARS)
_LINE: Final = re.compile(f"({_NAME_CHARS}): ({_VALUE_CHARS})")
# Subjects and header names routes used before: they repeat, and need checking once (measured:
# a value with a subject and eight headers packs in 3.7 µs, 8.2 µs checking every name).
_GOOD_SUBJECTS: set[str] = set()
_GOOD_NAMES: set[str] = set()
_GOOD_MAX: Final = 1024


@dataclass(frozen=True, slots=True)
class Route:
    """Where one message goes: its subject ("" for the publisher's own) and extra headers."""

    subject: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


def pack(route: Route, body: bytes) -> bytes:
    """The spool value of `body` sent along `route`. RouteError for a subject that cannot be
    published on, or a header NATS cannot carry (values must be printable ASCII: encode them)."""
    subject = route.subject
    if subject and subject not in _GOOD_SUBJECTS:
        if not _SUBJECT.fullmatch(subject):
            raise RouteError("not a subject to publish on", subject=subject)
        _remember(_GOOD_SUBJECTS, subject)
    lines = [_ROUTED_TEXT, subject, "\n"]
    for name, value in route.headers.items():
        if name not in _GOOD_NAMES:
            if not _NAME.fullmatch(name) or name.lower() == MSG_ID_HEADER.lower():
                raise RouteError("not a header a route may set", header=name)
            _remember(_GOOD_NAMES, name)
        if not _VALUE.fullmatch(value):
            raise RouteError("header value is not printable ASCII", header=name)
        lines += (name, ": ", value, "\n")
    lines.append("\n")
    # Every piece is checked ASCII: one encode of the whole block.
    return "".join(lines).encode("ascii") + body


def _remember(good: set[str], text: str) -> None:
    if len(good) >= _GOOD_MAX:  # a bound, should they ever vary without end
        good.clear()
    good.add(text)


def unpack(value: bytes) -> tuple[Route, bytes]:
    """The route and body of a spool value: a plain value is the body itself, on the
    publisher's subject. RouteError for a routed value whose framing is damaged."""
    if not value.startswith(ROUTED):
        return _PLAIN, value
    start = len(ROUTED)
    end = value.find(b"\n\n", start)
    if end < 0:
        raise RouteError("routed value without the end of its header block")
    try:
        subject, *lines = value[start:end].decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise RouteError("routed value with non-ASCII headers") from None
    headers: dict[str, str] = {}
    for line in lines:
        found = _LINE.fullmatch(line)
        if found is None:
            raise RouteError("routed value with a malformed header line")
        headers[found[1]] = found[2]
    if subject and not _SUBJECT.fullmatch(subject):
        raise RouteError("routed value with a malformed subject")
    return Route(subject, headers), value[end + 2 :]


_PLAIN: Final = Route()


__all__ = ["MSG_ID_HEADER", "ROUTED", "Route", "pack", "unpack"]
