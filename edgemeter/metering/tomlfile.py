"""Hand-edited TOML files the meter keeps current (the price table, the key map): read them
bounded, report errors with file and line, and reload them on change, keeping the last good value.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemeter.errors import MeterError

# A file whose mtime is this close to the moment it was read may still be rewritten within the
# same timestamp tick (same size, same inode): re-read its content until it is older than that.
_RACY_NS = 2_000_000_000


# -- reading and parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """What changes when a file is edited: replaced (inode), truncated or grown (size), or
    rewritten in place (mtime)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read(path: Path, max_bytes: int) -> tuple[bytes, Signature]:
    """The file's bytes (at most max_bytes + 1, so an oversized file is recognised as such) and
    the signature of what was read."""
    with path.open("rb") as f:
        signature = Signature.of(os.fstat(f.fileno()))
        return f.read(max_bytes + 1), signature


def load_toml(
    data: str | bytes, *, source: str, max_bytes: int, error: type[MeterError]
) -> tuple[dict[str, Any], str]:
    """The TOML document and its text; `error` names the file, and the line and column when
    the text is not TOML."""
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise error(f"larger than {max_bytes} bytes", file=source)
        try:
            # utf-8-sig: an editor's byte-order mark is not a reason to reject a file.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise error("not UTF-8 text", file=source, offset=e.start) from None
    else:
        text = data
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        at = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if at is None:
            raise error(f"not valid TOML: {message}", file=source) from None
        raise error(
            f"not valid TOML: {message[: at.start()].strip()}",
            file=source,
            line=int(at.group(1)),
            column=int(at.group(2)),
        ) from None


def did_you_mean(key: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def line_of(text: str, table: str, entry: str | None, key: str | None) -> int | None:
    """Best effort: the line of a `[table."entry"]` header, of a key in it, or of a top-level
    key (tomllib reports no lines for valid TOML)."""
    lines = text.splitlines()

    def first(pattern: str, start: int = 0, stop_at_header: bool = False) -> int | None:
        regex = re.compile(pattern)
        for i in range(start, len(lines)):
            if stop_at_header and lines[i].lstrip().startswith("["):
                return None
            if regex.match(lines[i]):
                return i
        return None

    def name(word: str) -> str:
        quoted = re.escape(word)
        return rf"""(?:"{quoted}"|'{quoted}'|{quoted})"""

    if entry is None:
        if key is None:
            return None
        # A top-level key precedes every table header; a misspelt table is a header itself.
        found = first(rf"^\s*{name(key)}\s*=", stop_at_header=True)
        if found is None:
            found = first(rf"^\s*\[\s*{name(key)}\s*[\].]")
        return None if found is None else found + 1
    header = first(rf"^\s*\[\s*{re.escape(table)}\s*\.\s*{name(entry)}\s*[\].]")
    if header is None:
        return None
    if key is not None:
        found = first(rf"^\s*{name(key)}\s*=", header + 1, stop_at_header=True)
        if found is not None:
            return found + 1
    return header + 1


# -- the live value ---------------------------------------------------------------------------


class Watched[T]:
    """The value parsed from a file, re-parsed when the file changes.

    `get` checks the file's signature at most once per `check_interval_s`, on the caller's
    thread, so no task or thread is needed; a file whose signature is unchanged is only
    statted. A file that cannot be read or parsed at construction raises (startup stops); later,
    a bad, unreadable or deleted file keeps the last good value and logs one ERROR per distinct
    problem, never per call, and `get` never raises. `parse` raises a MeterError for content
    that is not valid."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], T],
        *,
        what: str,
        doing: str,
        describe: Callable[[T], str],
        logger: logging.Logger,
        error: type[MeterError],
        max_bytes: int,
        on_reload: Callable[[T, T], None] | None = None,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`what` names the file in log lines ("price table"), `doing` what the meter goes on
        doing with the last good value ("pricing"), `describe` a value ("version v1");
        `on_reload(old, new)` may log more about a change."""
        if check_interval_s < 0:
            raise error("check interval must not be negative", value=check_interval_s)
        self.path = path
        self._parse = parse
        self._what, self._doing, self._describe = what, doing, describe
        self._log, self._on_reload = logger, on_reload
        self._max_bytes = max_bytes
        self._interval = check_interval_s
        self._clock = clock
        self._next_check = clock() + check_interval_s
        self._bad_digest: bytes | None = None  # of the last content that failed to parse
        self._problem: object = None  # what was last logged, so it is logged once
        try:
            data, signature = read(path, max_bytes)
        except (OSError, ValueError) as e:
            raise error(f"cannot read the {what}: {e}", file=str(path)) from None
        self.value = parse(data)
        self._digest = hashlib.sha256(data).digest()  # of the content `value` was parsed from
        self._signature: Signature | None = signature
        self._racy = _is_racy(signature)

    def get(self) -> T:
        """The current value, after reloading the file if it changed and the interval passed."""
        try:
            self._maybe_reload()
        except Exception as e:
            # Callers must go on whatever the file system does; the value stays as it was.
            self._report(("unexpected", repr(e)), f"unexpected error while checking: {e!r}")
        return self.value

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval
        try:
            signature = Signature.of(os.stat(self.path))
        except (OSError, ValueError) as e:
            self._signature = None  # whatever appears there next is read
            self._report(("stat", type(e).__name__), f"cannot read the file ({e})")
            return
        if signature == self._signature and not self._racy:
            return
        try:
            data, signature = read(self.path, self._max_bytes)
        except (OSError, ValueError) as e:
            self._signature = None
            self._report(("read", type(e).__name__), f"cannot read the file ({e})")
            return
        self._signature, self._racy = signature, _is_racy(signature)
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            # Touched, re-read while racy, or restored to what is loaded: nothing to reload.
            if self._problem is not None:
                self._log.info(
                    "%s %s is good again, %s", self._what, self.path, self._describe(self.value)
                )
            self._problem = self._bad_digest = None
            return
        if digest == self._bad_digest:
            return
        try:
            value = self._parse(data)
        except MeterError as e:
            self._bad_digest = digest
            self._report(("bad", digest), str(e))
            return
        old, self.value, self._digest = self.value, value, digest
        self._problem = self._bad_digest = None
        if self._on_reload is not None:
            self._on_reload(old, value)
        self._log.info("%s %s reloaded: %s", self._what, self.path, self._describe(value))

    def _report(self, problem: object, detail: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        self._log.error(
            "%s %s not reloaded, still %s with %s: %s",
            self._what,
            self.path,
            self._doing,
            self._describe(self.value),
            detail,
        )


def _is_racy(signature: Signature) -> bool:
    return signature.mtime_ns > time.time_ns() - _RACY_NS
