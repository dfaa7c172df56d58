"""Every error edgemeter raises on purpose: one family with short messages and structured fields
(`fields`), so callers catch `MeterError` and log or show `str(e)`.

    MeterError
    ├── SettingsError          an option value that cannot be used (fields: option, value)
    ├── ContainerError         an environment variable of the image (fields: variable, value)
    ├── PriceTableError        a price table file (meter_prices) that is not a valid table
    ├── KeyMapError            a key map file (meter_keymap) that is not a valid key map
    ├── InvalidUsage           a usage object whose counts are not counts (also a ValueError)
    ├── DecodeError            a body the meter does not decode: not parsed, never changed
    │   ├── UnsupportedEncoding    an encoding (chain) the meter cannot decode (also a ValueError)
    │   ├── CorruptEncoding        bytes that are not valid in the declared encoding
    │   ├── DecompressionLimit     decoded output outgrew its ratio: a compression bomb
    │   └── BodyTooLarge           decoded past the size it may be parsed at
    ├── AdminError             the admin endpoint cannot listen where it was asked to
    ├── WorkersError           `edgemeter serve --workers N` cannot start its group
    └── BrokerError            (edgemeter CLI) no broker, or no stream takes the subject

The spool and publisher below the meter have their own family (`spool.errors.SpoolError`), with
the same shape: a lower layer never imports the one above, and the metering wing imports no spool.
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
    """An option value that cannot be used; a secret's value is left out of `fields`."""


class ContainerError(MeterError):
    """An environment variable of the image that cannot be used."""


class PriceTableError(MeterError):
    """A price table file (`meter_prices`) that cannot be read or is not a valid table."""


class KeyMapError(MeterError):
    """A key map file (`meter_keymap`) that cannot be read or is not a valid key map."""


class InvalidUsage(MeterError, ValueError):
    """A usage object whose counts are not non-negative integers of a sane size."""


class DecodeError(MeterError):
    """A body the meter does not decode (fully): it is then not parsed, never changed."""


class UnsupportedEncoding(DecodeError, ValueError):
    """An encoding (or a chain of them) the meter cannot decode."""


class CorruptEncoding(DecodeError):
    """Bytes that are not valid in the declared encoding."""


class DecompressionLimit(DecodeError):
    """Decoded output outgrew MAX_RATIO times the input: a compression bomb."""


class BodyTooLarge(DecodeError):
    """A decoded body larger than the size it may be parsed at (meter_max_body_mb)."""


class AdminError(MeterError):
    """The admin endpoint cannot listen where it was asked to."""


class WorkersError(MeterError):
    """`edgemeter serve --workers N` cannot start its group (options, a port, a directory)."""


class BrokerError(MeterError):
    """The broker cannot be reached, or no JetStream stream takes the subject."""
