"""The errors of the spool and its publisher: a family of their own, below edgemeter's, with short
messages and structured fields (`fields`); `describe` is how any exception is shown in one line.

    SpoolError            the on-disk spool cannot be opened, read or written (fields: path, ...)
    ├── SpoolFullError    the spool holds max_bytes of envelopes: nothing more is taken
    ├── PublishError      a publish, or the publisher's configuration, failed; envelopes stay
    └── RouteError        a routed value (spool.routing) cannot be packed, or read back
"""

from __future__ import annotations


class SpoolError(Exception):
    """Base of every error the spool and the publisher raise on purpose."""

    def __init__(self, message: str = "", **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        if not self.fields:
            return self.message
        details = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{self.message} ({details})"


class SpoolFullError(SpoolError):
    """The spool holds its most bytes of envelopes already: nothing more is taken."""


class PublishError(SpoolError):
    """A publish to JetStream (or the publisher's configuration) failed; envelopes stay spooled."""


class RouteError(SpoolError):
    """A routed value cannot be packed (a subject or header NATS cannot carry) or read back (its
    framing is damaged): the publisher sets such a value aside, never sends it elsewhere."""


def describe(exc: BaseException) -> str:
    """An exception in one line: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
