"""The spool's write-ahead journal: an envelope is durable once one `write` appended it here, and
the spool's writer thread moves what was appended into the database in batches, later.

An append is one system call on the event loop's thread, against an SQLite transaction (~50 µs,
~8 system calls) per envelope that nothing else could share. Durability is the WAL's under
`synchronous=NORMAL`: the bytes are in the kernel once `write` returns, so a crash of the process
loses nothing; a crash of the machine may lose the last ones (`sync_full` spools keep no journal).

Appends go to the current segment (`journal-<n>.log`). The writer takes the envelopes appended so
far and starts a new segment in one step (`take`), commits them to the database, and only then
removes the old segment (`settle`) and lets the publisher hear of them. The commit also names the
segment in the database (spool.store), so a segment still on disk after it (a crash before the
removal, a removal the disk refused) is skipped by the replay, and any other segment holds only
envelopes nobody has published: a replay after a crash inserts them without publishing one twice.
One process journals a directory: `journal.lock` (flock) says which.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from spool.lock import SpoolLock

JOURNAL_LOCK: Final = "journal.lock"
_PREFIX: Final = "journal-"
_SUFFIX: Final = ".log"
# A record: payload length and CRC-32 of the payload, then the payload (key length, key, value).
_HEADER: Final = struct.Struct("<II")
_KEY_LENGTH: Final = struct.Struct("<H")
MAX_KEY_BYTES: Final = 0xFFFF


def frame(key: str, data: bytes) -> bytes:
    """One record, as appended."""
    raw = key.encode()
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError("journal keys are at most 65535 bytes")
    payload = _KEY_LENGTH.pack(len(raw)) + raw + data
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def records(blob: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """The whole records of a segment's bytes, in order, and how many bytes after them are not
    one (a record cut short by a full disk, or damaged): everything from there on is left."""
    out: list[tuple[str, bytes]] = []
    at, end = 0, len(blob)
    while end - at >= _HEADER.size:
        length, crc = _HEADER.unpack_from(blob, at)
        start = at + _HEADER.size
        payload = blob[start : start + length]
        if len(payload) != length or length < _KEY_LENGTH.size or zlib.crc32(payload) != crc:
            break
        (size,) = _KEY_LENGTH.unpack_from(payload)
        if _KEY_LENGTH.size + size > length:
            break
        try:
            key = payload[_KEY_LENGTH.size : _KEY_LENGTH.size + size].decode()
        except UnicodeDecodeError:
            break
        out.append((key, payload[_KEY_LENGTH.size + size :]))
        at = start + length
    return out, end - at


def number_of(path: Path) -> int:
    """The number in a segment's name."""
    return int(path.name[len(_PREFIX) : -len(_SUFFIX)])


def segments(directory: Path) -> list[Path]:
    """The segments in `directory`, oldest first."""
    found = []
    for path in directory.glob(f"{_PREFIX}*{_SUFFIX}"):
        number = path.name[len(_PREFIX) : -len(_SUFFIX)]
        if number.isascii() and number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


@dataclass(slots=True)
class Taken:
    """What the writer took: the envelopes appended to `path`, and their bytes."""

    path: Path | None
    entries: list[tuple[str, bytes]] = field(default_factory=list)
    size: int = 0

    @property
    def empty(self) -> bool:
        """Nothing taken: no envelopes, and no segment to settle."""
        return self.path is None and not self.entries


class Journal:
    """The journal of one spool directory, held by one process (see the module docstring).

    `append` runs on the event loop's thread, `take` and `settle` on the writer's; a lock
    guards the current segment and what was appended to it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = SpoolLock(self.directory, JOURNAL_LOCK)
        self._guard = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._number = 0
        self._offset = 0
        self._entries: list[tuple[str, bytes]] = []
        self._size = 0
        self._closed = False
        self._started = False

    def claim(self) -> bool:
        """Become the journal's holder (False: another process or object holds it, or there
        is no flock to tell: a second holder would replay segments still being written)."""
        if sys.platform == "win32":
            return False
        return self._lock.acquire_nowait()

    def leftovers(self) -> list[tuple[Path, list[tuple[str, bytes]], int]]:
        """The segments a holder before us left (it ended before settling them): each with its
        envelopes and the bytes at its end that are no record. Only for the holder."""
        assert self._lock.held
        found = []
        for path in segments(self.directory):
            entries, torn = records(path.read_bytes())
            found.append((path, entries, torn))
            self._number = max(self._number, number_of(path))
        return found

    def start(self) -> None:
        """Open a fresh segment for appends (the holder, after replaying the leftovers)."""
        assert self._lock.held
        with self._guard:
            self._started = True
            self._open_segment()

    @property
    def appended(self) -> int:
        """Envelope bytes appended and not taken yet."""
        return self._size

    def append(self, key: str, data: bytes) -> bool:
        """Append one envelope; True once it is durable. False, with nothing appended, when the
        journal is closed or the write failed (the caller spools it another way)."""
        try:
            record = frame(key, data)
        except ValueError:
            return False  # a key too long for a record: the writer thread takes it
        with self._guard:
            fd = self._fd
            if fd is None:
                return False
            try:
                written = os.write(fd, record)
            except OSError:
                written = -1
            if written != len(record):
                # A record cut short would end every replay of this segment there: cut it off.
                try:
                    os.ftruncate(fd, self._offset)
                except OSError:
                    self._close_segment()  # its records so far are whole; take() settles them
                return False
            self._offset += written
            self._entries.append((key, data))
            self._size += len(data)
            return True

    def take(self) -> Taken:
        """The envelopes appended so far, with their segment; appends go to a new segment from
        now on. The caller settles the segment once they are committed.

        The files are opened and closed outside the lock that appends take: a slow disk keeps
        this thread, not an append on the loop's, waiting."""
        with self._guard:
            if not self._entries and (self._fd is not None or not self._started):
                return Taken(None)
            self._number += 1
            number, closed = self._number, self._closed
        fd, path = (None, None) if closed else self._open(number)
        with self._guard:
            taken = Taken(self._path, self._entries, self._size)
            self._entries, self._size = [], 0
            old = self._fd
            if self._closed and fd is not None:
                # Closed meanwhile (rare): no appends; the empty file goes with the next take.
                self._close(fd)
                fd = None
            self._fd, self._path, self._offset = fd, path, 0
        self._close(old)
        return taken

    @property
    def count(self) -> int:
        """Envelopes appended and not taken yet."""
        return len(self._entries)

    def settle(self, path: Path | None) -> None:
        """The envelopes of this segment are committed elsewhere: remove it."""
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        """No more appends; take() still hands over what was appended. The lock stays held
        until release()."""
        with self._guard:
            self._closed = True
            self._close_segment()

    def release(self) -> None:
        """Let another holder take the journal (and replay what is left of it)."""
        self._lock.release()

    def _open_segment(self) -> None:
        self._number += 1
        self._fd, self._path = self._open(self._number)
        self._offset = 0

    def _open(self, number: int) -> tuple[int | None, Path | None]:
        """A new, empty segment (O_EXCL: never one a holder before us left); (None, None)
        when the disk refuses it: appends then fail over until the next take."""
        path = self.directory / f"{_PREFIX}{number:08d}{_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600), path
        except OSError:
            return None, None

    def _close_segment(self) -> None:
        fd, self._fd = self._fd, None
        self._close(fd)

    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


__all__ = ["JOURNAL_LOCK", "Journal", "Taken", "frame", "number_of", "records", "segments"]
