"""Shared by the subcommands of `edgemeter`: where they write (Io), exit codes, and how sizes,
ages, amounts and durations are read and shown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1  # nothing matched, or the operation failed
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for tools the signal ended


if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    SubParsers = Any


@dataclass
class Io:
    """Where a subcommand writes: data to stdout, messages to stderr (so pipes get only data)."""

    stdout: TextIO
    stderr: TextIO

    @property
    def console(self) -> Console:
        return Console(file=self.stdout, highlight=False)

    @property
    def err_console(self) -> Console:
        return Console(file=self.stderr, highlight=False)

    def say(self, message: str) -> None:
        print(message, file=self.stderr)

    def error(self, message: str) -> None:
        print(f"edgemeter: error: {message}", file=self.stderr)


Handler = Callable[[argparse.Namespace, Io], int]

log = logging.getLogger(__name__)


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def age(seconds: float) -> str:
    s = max(int(seconds), 0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def amount(micro: int) -> str:
    """Micro-units as a decimal, exactly (no float rounding)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


class _ConsoleLog(logging.Handler):
    """Log records as one line each on a rich console (above a progress bar or live table)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(f"{record.levelname.lower()}: {record.getMessage()}", markup=False)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def log_to(console: Console) -> Iterator[None]:
    handler = _ConsoleLog(console)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
