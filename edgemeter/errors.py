"""The one error family of edgemeter: a base error with short messages and structured fields.

Callers catch `MeterError`; each subclass names the component that failed.
"""

from __future__ import annotations


class MeterError(Exception):
    """Base of every error edgemeter raises on purpose."""

    def __init__(self, message: str = "", **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        if not self.fields:
            return self.message
        details = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{self.message} ({details})"


class SettingsError(MeterError):
    """An option value that cannot be used."""


class SpoolError(MeterError):
    """The on-disk spool cannot be opened or written."""


class SpoolFullError(SpoolError):
    """The spool holds `meter_spool_max_mb` of envelopes already: nothing more is taken."""


class PublishError(MeterError):
    """A publish to JetStream failed; the envelope stays spooled."""


class PriceTableError(MeterError):
    """A price table file (`meter_prices`) that cannot be read or is not a valid table."""
