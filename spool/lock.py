"""The right to publish one spool directory: an exclusive lock that the publisher of a spool holds,
so two processes (a meter, a worker adopting a spool, `edgemeter drain`) never drain one spool.

Writing needs no lock (SQLite serialises writers); publishing does, because two publishers of one
spool would both send every envelope and leave the broker's dedupe window to hide it. The lock is
`flock` on `<spool>/publisher.lock`: the kernel drops it when its holder ends, however it ends, so
a lock that can be taken is a spool nobody publishes now. A lock belongs to one open file: two
`SpoolLock`s of one directory exclude each other inside one process too. The holder writes its
process id into the file, for messages and tools (`holder`); decisions never rely on it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Final

if sys.platform != "win32":
    import fcntl

LOCK_FILE: Final = "publisher.lock"


class SpoolLock:
    """The exclusive right to publish `directory` (see the module docstring); with another file
    `name`, another right of the same kind (the spool's journal: `spool.journal`)."""

    def __init__(self, directory: Path, name: str = LOCK_FILE) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire_nowait(self) -> bool:
        """Take the lock if nobody holds it (True, also when this object holds it already);
        False at once if another holder has it, or the directory is not there."""
        if self._fd is not None:
            return True
        if sys.platform == "win32":  # no flock: every publisher publishes, as before the lock
            self._fd = -1
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        with contextlib.suppress(OSError):  # only informational: a full disk must not stop it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        """Let go (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None or fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # under the lock still: nobody reads a stale holder from it
        os.close(fd)  # closing the only descriptor of the open file drops the flock

    def holder(self) -> int | None:
        """The process that holds the lock, as its holder wrote it; None when the file names
        no process that is alive (never taken, let go, or its holder died)."""
        if self._fd is not None:
            return os.getpid()
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return pid

    def __enter__(self) -> SpoolLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


__all__ = ["LOCK_FILE", "SpoolLock"]
