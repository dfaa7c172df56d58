"""The spool's publisher lock: one holder across processes and within one, dropped when its holder
dies however it dies, its holder's pid readable by others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from spool.lock import LOCK_FILE, SpoolLock

HOLD = """
import sys, time
from pathlib import Path
from spool.lock import SpoolLock
lock = SpoolLock(Path(sys.argv[1]))
print("held" if lock.acquire_nowait() else "refused", flush=True)
time.sleep(60)
"""


def holding(directory: Path) -> subprocess.Popen[str]:
    """Another process that takes the lock and says so."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_locks_of_one_spool_exclude_each_other_within_one_process(tmp_path: Path) -> None:
    first, second = SpoolLock(tmp_path), SpoolLock(tmp_path)
    assert first.acquire_nowait()
    assert first.acquire_nowait()  # its own holder asks again: still held
    assert not second.acquire_nowait()
    first.release()
    assert second.acquire_nowait()
    second.release()


def test_the_lock_of_another_process_is_refused_and_names_its_holder(tmp_path: Path) -> None:
    proc = holding(tmp_path)
    try:
        lock = SpoolLock(tmp_path)
        assert not lock.acquire_nowait()
        assert lock.holder() == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_killed_leaves_the_lock_free_and_no_holder(tmp_path: Path) -> None:
    proc = holding(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = SpoolLock(tmp_path)
    # The file still names the dead process; nobody holds the lock any more.
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(proc.pid)
    assert lock.holder() is None
    assert lock.acquire_nowait()
    assert lock.holder() == os.getpid()
    lock.release()


def test_a_released_lock_names_no_holder(tmp_path: Path) -> None:
    with SpoolLock(tmp_path) as lock:
        assert lock.acquire_nowait()
    assert not lock.held
    assert SpoolLock(tmp_path).holder() is None
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600


def test_a_spool_directory_that_is_not_there_cannot_be_locked(tmp_path: Path) -> None:
    assert not SpoolLock(tmp_path / "missing").acquire_nowait()
    assert not (tmp_path / "missing").exists()
