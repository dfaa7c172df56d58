"""Write-ahead spool: usage envelopes are committed to disk here before anything is published.

Keys are request ids (UUIDv7 strings, so key order is time order); values are the envelope bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import diskcache

from spool.errors import SpoolError, SpoolFullError
from spool.journal import Journal, Taken, number_of

log = logging.getLogger(__name__)

# Envelopes are a few KiB. diskcache moves values of at least disk_min_file_size into separate
# files; raising the threshold well above any envelope keeps every value inline in SQLite, so one
# transaction covers data and index, and read_page can fetch values with a single query.
MAX_VALUE_SIZE: Final = 16 * 1024 * 1024
_DISK_MIN_FILE_SIZE: Final = MAX_VALUE_SIZE + 1

# diskcache's Disk.store() marks bytes kept inline in the Cache table with mode 1 (MODE_RAW).
_MODE_RAW: Final = 1

# Keyset query on diskcache's own table, used by read_page (the drain loop calls it per page).
# Measured with 900-byte values: ~560k rows/s, against ~80k rows/s for one pass of the public API
# (iterkeys() then get() per key: a second query per row). Worse, iterkeys() cannot start after a
# key, so keyset paging through it rescans from the start on every page (~30k rows/s at 5k rows
# and falling). Valid because Spool stores only str keys (kept raw: raw=1) and bytes values inline
# (mode=1, see _DISK_MIN_FILE_SIZE); any other row falls back to the public API.
# tests/test_store.py pins the schema this relies on, so a diskcache upgrade that changes it fails.
_PAGE_SQL: Final = (
    "SELECT key, mode, value FROM Cache WHERE key > ? AND raw = 1 ORDER BY key LIMIT ?"
)
_OLDEST_SQL: Final = "SELECT key FROM Cache WHERE raw = 1 ORDER BY key LIMIT 1"
# length() of a blob is read from the record header: the values themselves are not loaded.
_BYTES_SQL: Final = "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM Cache"
# Bytes held are recounted from the table at most this often (by a delete, in a worker thread):
# another process (the operator CLI requeueing dead letters) may have added rows.
_RECOUNT_INTERVAL_S: Final = 5.0
# After a failed commit, how long until a probe write may tell the disk is back.
_PROBE_INTERVAL_S: Final = 1.0
# Deletes of published envelopes (discard) wait up to this long for the next commit and ride
# in its transaction: at a trickle of requests a transaction of its own per delete doubled the
# writer's work. They wait only while envelopes are being written (a backlog draining has no
# commits to ride in), and never for more than this many keys.
_DISCARD_DELAY_S: Final = 0.1
_DISCARD_NOW_KEYS: Final = 256
# Envelopes appended to the journal reach the database this long after the first of them (or
# at once, max_batch of them): one transaction for all of them, whose envelopes the publisher
# hears of then. Its own linger is longer (publisher._LINGER_S).
_JOURNAL_FLUSH_S: Final = 0.02
# A spool that found its journal held by another (a worker restarted while another one adopts
# its spool) asks for it again this often, from the writer thread, once the holder lets go.
_CLAIM_RETRY_S: Final = 1.0
# Commits made on the event loop's thread (see _commit_here) do not checkpoint the WAL
# themselves (a checkpoint copies pages and syncs: milliseconds the loop must not spend); the
# writer thread checkpoints after every this many envelopes committed there (SQLite's own
# auto-checkpoint is at 1,000 pages, ~4 envelopes a page).
_CHECKPOINT_EVERY: Final = 1000
# _HERE_SLOW_RUN commits on the loop's thread in a row slower than _HERE_SLOW_S hand them to
# the writer thread for _HERE_PAUSE_S: a slow disk stalls a thread, not the loop. One slow
# commit is not enough: on a busy machine the loop's thread is preempted now and then.
_HERE_SLOW_S: Final = 0.002
_HERE_SLOW_RUN: Final = 3
_HERE_PAUSE_S: Final = 5.0


# Rows are written with one statement into diskcache's table instead of Cache.set (a SELECT,
# an INSERT and a cull check per row, all in Python while holding the GIL the event loop needs):
# the same row Cache.set writes for a str key and inline bytes (raw=1, mode=1, no file, no
# expiry), diskcache's triggers keep its count and size settings. tests/test_store.py checks
# diskcache's public API reads these rows back.
_ROW_SQL: Final = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, 0, 1, NULL, ?)"
)
_INSERT_SQL: Final = (
    _ROW_SQL + " ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " access_time = excluded.access_time, value = excluded.value"
)
_DELETE_SQL: Final = "DELETE FROM Cache WHERE key = ? AND raw = 1"
# The journal's segments whose envelopes are committed, named in the commit's own transaction:
# a replay skips them (their envelopes may be published and deleted since), and a segment's row
# goes once its file is gone (in the next commit).
_SETTLED_TABLE_SQL: Final = (
    "CREATE TABLE IF NOT EXISTS EdgemeterJournal (segment INTEGER PRIMARY KEY)"
)
_SETTLED_SQL: Final = "INSERT OR IGNORE INTO EdgemeterJournal(segment) VALUES (?)"
_GONE_SQL: Final = "DELETE FROM EdgemeterJournal WHERE segment = ?"
# A journal replayed after a crash: an envelope already in the table stays as it is.
_RECOVER_SQL: Final = _ROW_SQL + " ON CONFLICT(key, raw) DO NOTHING"

# A waiter for the writer thread's answer: a concurrent future (any thread), or an asyncio
# future with its loop (settled there, one hand-off per batch and loop).
_Waiter = concurrent.futures.Future[Any] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


@dataclass(slots=True)
class _Write:
    key: str
    data: bytes
    waiter: _Waiter | None  # None: journaled, nobody waits


@dataclass(slots=True)
class _Delete:
    sizes: Mapping[str, int]  # the keys, with the lengths of the values published
    waiter: _Waiter


@dataclass(slots=True)
class _Scan:
    after: str
    limit: int
    waiter: _Waiter


@dataclass(slots=True)
class _Barrier:
    """Answered once the writer has done everything queued before it."""

    waiter: _Waiter


@dataclass(frozen=True, slots=True)
class Scanned:
    """A page read by the writer thread (`Spool.scan_async`): `spooled` as in `scan`, and
    `seq`, the number of the last commit the page reflects (see `Spool.listen`)."""

    page: list[tuple[str, bytes]]
    spooled: int | None
    seq: int


_STOP: Final = object()
# Wakes the writer for the deletes waiting (see discard); carries nothing itself.
_FLUSH: Final = object()
# Asks the writer to checkpoint the WAL that the loop's commits filled (see _CHECKPOINT_EVERY).
_CHECKPOINT: Final = object()


class _Settlements:
    """The answers of one writer batch: concurrent futures are settled in the writer thread,
    asyncio futures and the listener's call go to their loop in one hand-off per loop."""

    __slots__ = ("by_loop", "entries")

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        self.entries: list[tuple[str, bytes]] = []

    def add(self, waiter: _Waiter | None, result: Any) -> None:
        if waiter is None:
            return
        if isinstance(waiter, concurrent.futures.Future):
            if not waiter.done():
                waiter.set_result(result)
            return
        loop, future = waiter
        self.by_loop.setdefault(loop, []).append(lambda: _set(future, result, None))

    def fail(self, waiter: _Waiter | None, exc: BaseException) -> None:
        if waiter is None:
            return
        if isinstance(waiter, concurrent.futures.Future):
            if not waiter.done():
                waiter.set_exception(exc)
            return
        loop, future = waiter
        self.by_loop.setdefault(loop, []).append(lambda: _set(future, None, exc))

    def notify(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[int, list[tuple[str, bytes]]], None],
        seq: int,
        entries: list[tuple[str, bytes]],
    ) -> None:
        # First in the loop's list: the listener hears of a commit before anyone resumes.
        self.by_loop.setdefault(loop, []).insert(0, lambda: _notify(callback, seq, entries))

    def committed(self, writes: list[_Write], deletes: list[_Delete]) -> None:
        """Answer the waiters of a commit that succeeded; its envelopes are the entries."""
        items: list[_Write | _Delete] = [*writes, *deletes]
        for item in items:
            self.add(item.waiter, None)
        self.entries = [(write.key, write.data) for write in writes]

    def run_here(self, loop: asyncio.AbstractEventLoop) -> None:
        """Settle what belongs to `loop` now (the caller runs on it), send the rest."""
        calls = self.by_loop.pop(loop, None)
        if calls is not None:
            _run_all(calls)
        self.send()

    def send(self) -> None:
        for loop, calls in self.by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits there
                loop.call_soon_threadsafe(_run_all, calls)


def _set(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled by its waiter
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _notify(
    callback: Callable[[int, list[tuple[str, bytes]]], None],
    seq: int,
    entries: list[tuple[str, bytes]],
) -> None:
    try:
        callback(seq, entries)
    except Exception as exc:
        log.warning("spool commit listener failed: %r", exc)
        log.debug("spool commit listener failed", exc_info=True)


def _write_rows(con: sqlite3.Connection, writes: list[_Write], deletes: list[_Delete]) -> int:
    """Insert the envelopes and delete the discarded keys, in the caller's transaction; the
    bytes freed (only what was there: another process may have deleted it)."""
    if writes:
        now = time.time()
        con.executemany(_INSERT_SQL, [(write.key, now, now, write.data) for write in writes])
    freed = 0
    for delete in deletes:
        for key, size in delete.sizes.items():
            if con.execute(_DELETE_SQL, (key,)).rowcount:
                freed += size
    return freed


def _name_settled(con: sqlite3.Connection, segments: list[Taken], gone: list[int]) -> None:
    """In the caller's transaction: these segments' envelopes are committed; those files are
    gone."""
    named = [(number_of(t.path),) for t in segments if t.path is not None and t.entries]
    if named:
        con.executemany(_SETTLED_SQL, named)
    if gone:
        con.executemany(_GONE_SQL, [(number,) for number in gone])


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


@dataclass(slots=True)
class _Probe:
    """A write transaction without data: tells whether the disk takes writes again."""


class Spool:
    """Durable, key-ordered spool of envelope bytes backed by diskcache (SQLite, WAL).

    With max_bytes set, submit() refuses envelopes (SpoolFullError) while the envelopes held
    (committed and queued) reach it. A failed commit (disk full, I/O error) marks the spool
    failing until a commit or a probe write succeeds; `accepting` says whether it takes writes.
    """

    def __init__(
        self,
        directory: Path,
        *,
        sync_full: bool = False,
        max_batch: int = 256,
        max_bytes: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.sync_full = sync_full
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        # (loop, callback) told of every commit of envelopes: see listen().
        self._listener: (
            tuple[asyncio.AbstractEventLoop, Callable[[int, list[tuple[str, bytes]]], None]] | None
        ) = None
        # Commits done by the writer thread (only it writes this).
        self._seq = 0
        self._cache: diskcache.Cache | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Envelope bytes committed or queued; guarded by _lock. An estimate between recounts.
        self._bytes = 0
        self._last_recount = 0.0
        # Monotonic time of the last failed commit, 0.0 when the last write succeeded.
        self._failed_at = 0.0
        self._probing = False
        self._thread: threading.Thread | None = None
        # Guards the closed flag together with enqueueing, so nothing lands behind the stop marker.
        self._lock = threading.Lock()
        self._closed = False
        # Envelopes enqueued on an event loop during its current turn (see enqueue); touched
        # only by that loop's thread.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
        self._pending_bytes = 0
        # Deletes waiting for a transaction to ride in (see discard); guarded by _lock.
        self._discards: list[_Delete] = []
        self._discard_keys = 0
        self._discards_since = 0.0
        # Monotonic time of the last commit of envelopes.
        self._written_at = -math.inf
        # The write-ahead journal, when this spool holds it (see open); a flush of it is
        # scheduled on the loop (touched only by the loop's thread).
        self._journal: Journal | None = None
        self._flush_at: asyncio.TimerHandle | None = None
        # Segments taken from the journal whose commit failed: retried by the writer (only it
        # touches this).
        self._unsettled: list[Taken] = []
        self._claim_again_at = 0.0
        # Numbers of settled segments whose files are gone: their rows go in the next commit
        # (under _db_lock).
        self._gone: list[int] = []
        # Held by whoever commits or scans (the writer thread waits for it, the loop never:
        # see _commit_here), so commits are numbered in order and a scan's page reflects
        # exactly the commits up to its seq.
        self._db_lock = threading.Lock()
        # The event loop thread's own connection (timeout 0: a locked database hands the
        # commit to the writer thread instead of waiting).
        self._here: sqlite3.Connection | None = None
        self._here_paused_until = 0.0
        self._slow_run = 0
        self._since_checkpoint = 0
        # Writer-thread commits whose listener call has not run on its loop yet: until it has,
        # a commit on the loop would be heard of first (guarded by _lock).
        self._unheard = 0
        # Envelopes journaled; commits on the loop's thread, and by the writer thread.
        self.journaled = 0
        self.loop_commits = 0
        self.thread_commits = 0

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        if self._cache is not None:
            return
        directory = self.directory
        cache: diskcache.Cache | None = None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask and ignored for an existing directory.
            directory.chmod(0o700)
            # SQLite creates the -wal and -shm files with the main file's permissions, so
            # creating the database file 0600 first covers all three without touching the
            # process-wide umask (mitmproxy runs other threads).
            db = directory / "cache.db"
            if not db.exists():
                os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
            # diskcache writes its settings while opening, so a read-only database or
            # directory fails here rather than on the first envelope.
            cache = diskcache.Cache(
                str(directory),
                eviction_policy="none",
                size_limit=2**62,
                cull_limit=0,
                sqlite_synchronous=2 if self.sync_full else 1,
                disk_min_file_size=_DISK_MIN_FILE_SIZE,
            )
            # The directory itself must take new files (WAL, shm), also when the database
            # file already existed and is writable.
            with tempfile.TemporaryFile(dir=directory):
                pass
            for path in directory.iterdir():
                if path.is_file():
                    path.chmod(0o600)
            journal, _ = self._claim_journal(cache)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            if cache is not None:
                cache.close()
            message = "spool directory is not writable"
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                exc, sqlite3.OperationalError
            ):
                message = "spool database is unreadable"  # e.g. not an SQLite file
            raise SpoolError(message, path=str(directory), error=str(exc)) from exc
        # Segments a commit failed for before a close are on disk: the replay above took them.
        self._journal, self._unsettled, self._claim_again_at = journal, [], 0.0
        self._gone, self._flush_at = [], None
        self._cache = cache
        self._closed = False
        self._bytes = self._count_bytes(cache)
        self._last_recount = time.monotonic()
        self._failed_at = 0.0
        self._thread = threading.Thread(
            target=self._write_loop, name="edgemeter-spool-writer", daemon=True
        )
        self._thread.start()

    def _claim_journal(
        self, cache: diskcache.Cache
    ) -> tuple[Journal | None, list[tuple[str, bytes]]]:
        """Hold the directory's journal: replay what a holder before us left, then journal
        (unless sync_full: an append is not synced); with the envelopes replayed. None: another
        process journals here, so its segments are not ours to replay (our envelopes go
        through the writer thread)."""
        journal = Journal(self.directory)
        if not journal.claim():
            return None, []
        replayed: list[tuple[str, bytes]] = []
        try:
            cache._sql(_SETTLED_TABLE_SQL)
            settled = {number for (number,) in cache._sql("SELECT segment FROM EdgemeterJournal")}
            for path, entries, torn in journal.leftovers():
                if number_of(path) in settled:
                    journal.settle(path)  # committed before the crash: maybe published since
                    continue
                if entries:
                    now = time.time()
                    with cache.transact(retry=True):
                        cache._con.executemany(
                            _RECOVER_SQL, [(key, now, now, data) for key, data in entries]
                        )
                replayed += entries
                if torn:
                    log.warning(
                        "spool journal %s: %d bytes at its end are no whole envelope"
                        " (cut short by a full disk?); left out",
                        path.name,
                        torn,
                    )
                journal.settle(path)
            # Every leftover is gone: new segments may take any number again.
            cache._sql("DELETE FROM EdgemeterJournal")
            if replayed:
                log.info("spool journal replayed: %d envelopes", len(replayed))
            if not self.sync_full:
                journal.start()
        except BaseException:
            journal.release()
            raise
        return journal, replayed

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closed or self._cache is None:
                self._closed = True
                return
            self._closed = True
            self._queue.put(_STOP)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                # The writer is stuck in the disk. Closing the cache under it would fail the
                # transaction it is in; leave it running (a daemon thread) so whatever it still
                # manages to commit is kept, and report it.
                log.warning("spool writer did not finish within %.1fs", timeout)
                return
        with self._db_lock:
            if self._here is not None:
                self._here.close()
                self._here = None
        log.debug(
            "spool closed: %d envelopes journaled; %d commits on the loop's thread, %d by the"
            " writer",
            self.journaled,
            self.loop_commits,
            self.thread_commits,
        )
        cache = self._cache
        self._cache = None
        self._thread = None
        if cache is not None:
            # Closes this thread's connection; connections that worker threads opened go away
            # with the Cache object (they live in its thread-local storage).
            cache.close()

    # -- writes ----------------------------------------------------------------------------

    def submit(self, key: str, data: bytes) -> concurrent.futures.Future[None]:
        """Queue one envelope for the writer thread; the future resolves once it is committed."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._enqueue(key, data, future)
        return future

    def enqueue(self, key: str, data: bytes) -> asyncio.Future[None]:
        """`submit` for the event loop: an asyncio future, settled on this loop.

        With the journal (see open), the envelope is durable once appended to it, here: the
        future comes back done, and the journal's envelopes move into the database in one
        transaction a little later (_JOURNAL_FLUSH_S; on this thread when the database is free,
        see _flush_journal). In process, one envelope each 0.7 ms (a client's pace; the least
        of 3 runs of 5 rounds): 44 µs of CPU per envelope committed alone on this thread, as
        before the journal, against 26 journaled.

        Without it (another process journals this directory, sync_full, a failing disk), the
        envelopes a turn of the loop enqueues reach the writer together at the end of that
        turn (one hand-off per turn, not per envelope), and the future is settled once the
        writer committed them."""
        self._check(key, data)
        loop = asyncio.get_running_loop()
        if self._closed or self._cache is None:
            raise SpoolError("spool is not open", path=str(self.directory))
        journal = self._journal
        held = self._bytes + self._pending_bytes + (journal.appended if journal else 0)
        if self.max_bytes is not None and held >= self.max_bytes:
            raise SpoolFullError("spool is full", path=str(self.directory), bytes=held)
        future: asyncio.Future[None] = loop.create_future()
        if journal is not None and not self._failed_at and journal.append(key, data):
            self.journaled += 1
            future.set_result(None)
            if journal.count >= self.max_batch:
                self._flush_journal()
            elif self._flush_at is None:
                self._flush_at = loop.call_later(_JOURNAL_FLUSH_S, self._flush_journal)
            return future
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(_Write(key, data, (loop, future)))
        self._pending_bytes += len(data)
        return future

    async def flush(self) -> None:
        """Commit what the journal holds now instead of at its time; returns once it is in the
        database (for tools and tests: the meter never needs to wait for it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._flush_then((loop, future))
        await future

    def drain_journal(self, timeout: float = 10.0) -> None:
        """`flush`, blocking: for tools and tests on the loop's thread (or without a loop)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._flush_then(future)
        future.result(timeout)

    def _flush_then(self, waiter: _Waiter) -> None:
        """Flush the journal, then answer `waiter` once the writer has done all queued before."""
        self._flush_journal()
        with self._lock:
            if self._closed or self._cache is None:
                raise SpoolError("spool is not open", path=str(self.directory))
            self._queue.put(_Barrier(waiter))

    def _flush_journal(self) -> None:
        """Commit what the journal holds: here, on the loop's thread, when the database is
        free (one transaction, no thread hand-off); else by the writer thread."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        journal = self._journal
        if journal is None or self._closed:
            return
        if self._failed_at or time.monotonic() < self._here_paused_until:
            # The writer takes the journal itself: the loop's thread keeps off a failing or
            # slow disk, the segments' files included.
            with self._lock:
                if not self._closed:
                    self._queue.put(_FLUSH)
            return
        started = time.perf_counter()
        taken = journal.take()
        if taken.empty:
            return
        with self._lock:
            self._bytes += taken.size
        if self._commit_here(taken, started):
            return
        with self._lock:
            if not self._closed:
                self._queue.put(taken)
                return
        self._unsettled.append(taken)  # the writer takes it on its way out (see _write_loop)

    def _commit_here(self, taken: Taken, started: float) -> bool:
        """Commit a segment's envelopes (and the deletes waiting) right here, on the loop's
        thread; False, having changed nothing, when the writer thread must do it: the database
        is busy (the writer, another process). Flushes slower than _HERE_SLOW_S from
        `started` (the segment's files included) pause this for _HERE_PAUSE_S."""
        if not self._db_lock.acquire(blocking=False):
            return False
        try:
            if self._closed or self._unheard:
                return False
            con = self._here if self._here is not None else self._connect_here()
            if con is None:
                return False
            writes = [_Write(key, data, None) for key, data in taken.entries]
            deletes = self._take_discards()
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    freed = _write_rows(con, writes, deletes)
                    _name_settled(con, [taken], self._gone)
                    con.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                # The writer thread tries again, and reports what fails there.
                log.debug("spool commit handed to the writer: %s", exc)
                self._return_discards(deletes)
                return False
            self._gone = []
            self._journal_settle(taken)  # before anyone hears of them: see spool.journal
            if time.perf_counter() - started <= _HERE_SLOW_S:
                self._slow_run = 0
            else:
                self._slow_run += 1
                if self._slow_run >= _HERE_SLOW_RUN:
                    self._slow_run = 0
                    self._here_paused_until = time.monotonic() + _HERE_PAUSE_S
            self._seq += 1
            seq = self._seq
            self._written_at = time.monotonic()
            self.loop_commits += 1
            self._since_checkpoint += len(writes)
            checkpoint = self._since_checkpoint >= _CHECKPOINT_EVERY
            if checkpoint:
                self._since_checkpoint = 0
        finally:
            self._db_lock.release()
        with self._lock:
            self._bytes = max(self._bytes - freed, 0)
            if checkpoint and not self._closed:
                self._queue.put(_CHECKPOINT)
        settle = _Settlements()
        settle.committed(writes, deletes)
        listener = self._listener
        if listener is not None and settle.entries:
            _notify(listener[1], seq, settle.entries)
        settle.send()
        return True

    def _connect_here(self) -> sqlite3.Connection | None:
        try:
            con = sqlite3.connect(
                self.directory / "cache.db",
                timeout=0,
                isolation_level=None,
                check_same_thread=False,  # closed by close(), under _db_lock
            )
            con.execute("PRAGMA synchronous = 1")
            con.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            log.debug("no spool connection on the loop's thread: %s", exc)
            self._here_paused_until = time.monotonic() + _HERE_PAUSE_S
            return None
        self._here = con
        return con

    def _return_discards(self, deletes: list[_Delete]) -> None:
        if not deletes:
            return
        with self._lock:
            self._discards[:0] = deletes
            self._discard_keys += sum(len(delete.sizes) for delete in deletes)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        writes = self._pending.pop(loop, [])
        size = sum(len(write.data) for write in writes)
        self._pending_bytes -= size
        with self._lock:
            if not self._closed and self._cache is not None:
                self._bytes += size
                self._queue.put(writes)
                return
        error = SpoolError("spool is not open", path=str(self.directory))
        for write in writes:
            _set(write.waiter[1], None, error)  # type: ignore[index]

    async def put(self, key: str, data: bytes) -> None:
        """Spool one envelope through the writer thread, not the journal: returns once it is
        in the database. Never blocks the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(key, data, (loop, future))
        await future

    @staticmethod
    def _check(key: str, data: bytes) -> None:
        # Exact types: diskcache pickles anything else (str subclasses, bytearray, ...).
        if type(key) is not str or not key:
            raise TypeError("spool keys must be non-empty str")
        if type(data) is not bytes:
            raise TypeError(f"spool values must be bytes, not {type(data).__name__}")
        if len(data) > MAX_VALUE_SIZE:
            raise SpoolError("envelope too large for the spool", key=key, size=len(data))

    def _enqueue(self, key: str, data: bytes, waiter: _Waiter) -> None:
        self._check(key, data)
        with self._lock:
            if self._closed or self._cache is None:
                raise SpoolError("spool is not open", path=str(self.directory))
            # Checked before adding: a spool just under the limit takes one more envelope, so
            # the limit is exceeded by at most one envelope per concurrent writer.
            if self.max_bytes is not None and self._bytes >= self.max_bytes:
                raise SpoolFullError("spool is full", path=str(self.directory), bytes=self._bytes)
            self._bytes += len(data)
            self._queue.put(_Write(key, data, waiter))

    def listen(self, callback: Callable[[int, list[tuple[str, bytes]]], None] | None) -> None:
        """Call `callback(seq, entries)` on the running loop after every commit of envelopes
        (None: stop). `seq` numbers the commits; `scan_async` pages say which commit they
        reflect, so a listener can tell the entries a page already holds from newer ones."""
        with self._lock:
            self._listener = (asyncio.get_running_loop(), callback) if callback else None

    @property
    def listening(self) -> bool:
        """Whether a commit listener is set."""
        return self._listener is not None

    def unlisten(self, callback: Callable[[int, list[tuple[str, bytes]]], None]) -> None:
        """Stop calling `callback`, if it is still the listener (a newer one stays)."""
        with self._lock:
            if self._listener is not None and self._listener[1] == callback:
                self._listener = None

    def discard(self, sizes: Mapping[str, int]) -> asyncio.Future[None]:
        """`delete` of the keys of `sizes` (the lengths of their values, which keep the
        held-bytes account without reading them back), done by the writer thread instead of a
        second connection, in the transaction of the next commit if one comes within
        _DISCARD_DELAY_S (else in one of its own then); settled on the running loop. A crash
        meanwhile leaves the envelopes to be published again: the broker dedupes them by
        Nats-Msg-Id."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        item = _Delete(sizes, (loop, future))
        with self._lock:
            if self._closed or self._cache is None:
                raise SpoolError("spool is not open", path=str(self.directory))
            at = time.monotonic()
            if not self._discards:
                self._discards_since = at
            self._discards.append(item)
            self._discard_keys += len(sizes)
            now = (
                self._discard_keys >= _DISCARD_NOW_KEYS or at - self._written_at > _DISCARD_DELAY_S
            )
            if now:
                self._queue.put(_FLUSH)
        if not now:
            loop.call_later(_DISCARD_DELAY_S, self._flush_discards)
        return future

    def _flush_discards(self) -> None:
        """Wake the writer for deletes that waited their time and found no commit to ride in."""
        with self._lock:
            if self._closed or not self._discards:
                return
            if time.monotonic() - self._discards_since >= _DISCARD_DELAY_S * 0.9:
                self._queue.put(_FLUSH)

    def _take_discards(self) -> list[_Delete]:
        with self._lock:
            taken, self._discards, self._discard_keys = self._discards, [], 0
        return taken

    def scan_async(self, after: str, limit: int) -> asyncio.Future[Scanned]:
        """`scan`, done by the writer thread between commits, so the page reflects exactly the
        commits numbered up to its `seq` (see `listen`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Scanned] = loop.create_future()
        self._request(_Scan(after, limit, (loop, future)))
        return future

    def _request(self, item: _Scan) -> None:
        with self._lock:
            if self._closed or self._cache is None:
                raise SpoolError("spool is not open", path=str(self.directory))
            self._queue.put(item)

    @property
    def held_bytes(self) -> int:
        """Envelope bytes committed or queued (recounted from disk every few seconds)."""
        return self._bytes

    @property
    def accepting(self) -> bool:
        """Whether a new envelope would be taken now: not full, and the last write succeeded.

        While failing, asks the writer for a probe write at most once per probe interval, so a
        disk that has room again is noticed even when nothing else is written."""
        with self._lock:
            if self._closed or self._cache is None:
                return False
            if self.max_bytes is not None and self._bytes >= self.max_bytes:
                return False
            if not self._failed_at:
                return True
            if not self._probing and time.monotonic() - self._failed_at >= _PROBE_INTERVAL_S:
                self._probing = True
                self._queue.put(_Probe())
            return False

    def _write_loop(self) -> None:
        cache = self._cache
        assert cache is not None
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = list(item) if isinstance(item, list) else [item]
            # Group commit: whatever queued up while the last transaction ran shares the next
            # one, so the per-commit cost (a WAL append) is paid once per batch, not per
            # envelope, and the loop is woken once for all of it.
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, list):
                    batch += item
                else:
                    batch.append(item)
            self._run(cache, batch + self._take_discards())
        journal = self._journal
        if journal is not None:
            journal.close()
        self._run(cache, list[object](self._take_discards()))
        if journal is not None:
            # Segments left (a commit that failed) hold envelopes nobody has published: the
            # next holder replays them.
            journal.release()
        cache.close()

    def _run(self, cache: diskcache.Cache, batch: list[object]) -> None:
        writes = [item for item in batch if isinstance(item, _Write)]
        deletes = [item for item in batch if isinstance(item, _Delete)]
        settle = _Settlements()
        with self._db_lock:
            if self._journal is None and not self.sync_full and not self._closed:
                self._claim_again(cache)
            taken = self._take_journal([item for item in batch if isinstance(item, Taken)])
            for segment in taken:
                writes += [_Write(key, data, None) for key, data in segment.entries]
            if writes or deletes:
                if self._commit(cache, writes, deletes, settle, taken):
                    # Only now may the publisher hear of them (see spool.journal).
                    for segment in taken:
                        self._journal_settle(segment)
                else:
                    self._unsettled = taken
                self.thread_commits += 1
            else:
                for segment in taken:  # empty: the journal was closed, or its segment failed
                    self._journal_settle(segment)
                if any(isinstance(item, _Probe) for item in batch):
                    # With writes, the batch's own commit answers the same question.
                    self._probe(cache)
            for barrier in (item for item in batch if isinstance(item, _Barrier)):
                settle.add(barrier.waiter, None)
            for scan in (item for item in batch if isinstance(item, _Scan)):
                try:
                    page, spooled = self.scan(scan.after, scan.limit)
                    settle.add(scan.waiter, Scanned(page, spooled, self._seq))
                except Exception as exc:
                    settle.fail(scan.waiter, exc)
            if settle.entries:
                self._announce(settle, settle.entries)
        if _CHECKPOINT in batch:
            self._checkpoint(cache)
        settle.send()

    def _announce(self, settle: _Settlements, entries: list[tuple[str, bytes]]) -> None:
        """Have the listener told of the writer's commit numbered `self._seq` when `settle` is
        sent, counted as unheard until it has run on its loop (see _commit_here)."""
        with self._lock:
            listener = self._listener
            if listener is None:
                return
            self._unheard += 1
        callback = listener[1]

        def heard(seq: int, entries: list[tuple[str, bytes]]) -> None:
            with self._lock:
                self._unheard -= 1
            callback(seq, entries)

        settle.notify(listener[0], heard, self._seq, entries)

    def _checkpoint(self, cache: diskcache.Cache) -> None:
        """Copy the WAL that the loop's commits filled back into the database, and recount the
        bytes held if it is time. Under _db_lock: with no commit after it, the next one starts
        the WAL over instead of growing it (the loop's commits meanwhile go to this thread)."""
        try:
            with self._db_lock:
                cache._sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if time.monotonic() - self._last_recount >= _RECOUNT_INTERVAL_S:
                total = self._count_bytes(cache)
                with self._lock:
                    self._bytes = max(total, self._bytes)
                    self._last_recount = time.monotonic()
        except sqlite3.Error as exc:
            log.debug("spool checkpoint failed: %s", exc)

    def _claim_again(self, cache: diskcache.Cache) -> None:
        """The journal, if its holder has let go since open (or the last try): replayed and
        started here, then the loop's next envelope goes to it."""
        now = time.monotonic()
        if now < self._claim_again_at:
            return
        self._claim_again_at = now + _CLAIM_RETRY_S
        try:
            journal, replayed = self._claim_journal(cache)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            log.debug("spool journal not taken: %s", exc)
            return
        if journal is None:
            return
        log.info("spool journal taken over from a holder that let go: %s", self.directory)
        self._journal = journal
        if not replayed:
            return
        # Counted, and told to the publisher like a commit: one that has caught up would
        # otherwise not look for them until a rescan.
        self._seq += 1
        with self._lock:
            self._bytes += sum(len(data) for _, data in replayed)
        told = _Settlements()  # sent now: heard before the commit of the batch that found it
        self._announce(told, replayed)
        told.send()

    def _take_journal(self, handed: list[Taken]) -> list[Taken]:
        """The journal's segments to commit now: those whose commit failed before, those the
        loop handed over, and what was appended since (its bytes now count as committed or
        queued)."""
        taken, self._unsettled = [*self._unsettled, *handed], []
        journal = self._journal
        if journal is None:
            return taken
        fresh = journal.take()
        if not fresh.empty:
            with self._lock:
                self._bytes += fresh.size
            taken.append(fresh)
        return taken

    def _journal_settle(self, segment: Taken) -> None:
        journal = self._journal
        assert journal is not None
        try:
            journal.settle(segment.path)
        except OSError as exc:
            # Its row stays: a replay skips it (see _name_settled) and removes it then.
            log.warning("spool journal segment not removed: %s", exc)
            return
        if segment.path is not None and segment.entries:
            self._gone.append(number_of(segment.path))

    def _commit(
        self,
        cache: diskcache.Cache,
        writes: list[_Write],
        deletes: list[_Delete],
        settle: _Settlements,
        segments: list[Taken],
    ) -> bool:
        for write in writes:
            if isinstance(write.waiter, concurrent.futures.Future):
                # Running: a late cancel() is a no-op; a waiter that gave up must not stop its
                # envelope from being written (it is still a billable request).
                write.waiter.set_running_or_notify_cancel()
        items: list[_Write | _Delete] = [*writes, *deletes]
        try:
            with cache.transact(retry=True):
                freed = _write_rows(cache._con, writes, deletes)
                _name_settled(cache._con, segments, self._gone)
                recount = bool(deletes) and (
                    time.monotonic() - self._last_recount >= _RECOUNT_INTERVAL_S
                )
                total = self._count_bytes(cache) if recount else None
        except Exception as exc:
            error = SpoolError("spool write failed", path=str(self.directory), error=str(exc))
            error.__cause__ = exc
            for item in items:
                settle.fail(item.waiter, error)
            with self._lock:
                # Journaled envelopes stay held: they are committed again with the next batch.
                self._bytes -= sum(len(w.data) for w in writes if w.waiter is not None)
                self._failed_at = time.monotonic()
                self._probing = False
            # DEBUG: whoever waits on the futures reports it (the meter: one ERROR a minute
            # with the count), so a full disk under load does not flood the log from here too.
            log.debug("spool write of %d envelopes failed: %s", len(writes), exc)
            return False
        self._seq += 1
        self._gone = []
        if writes:
            self._written_at = time.monotonic()
        with self._lock:
            self._failed_at = 0.0
            if total is None:
                self._bytes = max(self._bytes - freed, 0)
            else:
                # Writes still queued are not in the table yet: the recount is a floor.
                self._bytes = max(total, self._bytes - freed)
                self._last_recount = time.monotonic()
        settle.committed(writes, deletes)
        return True

    def _probe(self, cache: diskcache.Cache) -> None:
        try:
            # Rewrites the database header in a write transaction: a WAL append and a sync, like
            # a commit, without a row the publisher could see.
            with cache.transact(retry=True):
                (version,) = cache._sql("PRAGMA user_version").fetchone()
                cache._sql(f"PRAGMA user_version = {(int(version) + 1) % 2**31}")
        except Exception as exc:
            with self._lock:
                self._failed_at = time.monotonic()
                self._probing = False
            log.debug("spool probe write failed: %s", exc)
            return
        with self._lock:
            self._failed_at = 0.0
            self._probing = False
        log.info("spool takes writes again")

    @staticmethod
    def _count_bytes(cache: diskcache.Cache) -> int:
        (total,) = cache._sql(_BYTES_SQL).fetchone()
        return int(total)

    # -- reads and deletes (blocking: call them from a thread in async code) ---------------------

    def _open_cache(self) -> diskcache.Cache:
        cache = self._cache
        if cache is None:
            raise SpoolError("spool is not open", path=str(self.directory))
        return cache

    def read_page(self, after: str, limit: int) -> list[tuple[str, bytes]]:
        """Entries with key > after, in key order, at most limit of them."""
        return self._read(after, limit)[0]

    def scan(self, after: str, limit: int) -> tuple[list[tuple[str, bytes]], int | None]:
        """read_page, and at the end of the spool (fewer rows than limit) how many envelopes it
        holds, else None: the publisher gets both with one thread hand-off."""
        page, rows = self._read(after, limit)
        # By rows, not by the page: a row deleted between read_page's two reads shortens the
        # page without being the end.
        return page, (len(self) if rows < limit else None)

    def _read(self, after: str, limit: int) -> tuple[list[tuple[str, bytes]], int]:
        cache = self._open_cache()
        try:
            rows = cache._sql(_PAGE_SQL, (after, limit)).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError("spool read failed", path=str(self.directory), error=str(exc)) from exc
        page: list[tuple[str, bytes]] = []
        for key, mode, value in rows:
            if mode != _MODE_RAW:
                value = cache.get(key)
                if value is None:
                    continue  # deleted between the two reads
            page.append((key, bytes(value)))
        return page, len(rows)

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys (a missing key is a no-op)."""
        cache = self._open_cache()
        keys = list(keys)
        freed = 0
        try:
            with cache.transact(retry=True):
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    sql = f"{_BYTES_SQL} WHERE key IN ({','.join('?' * len(chunk))})"
                    freed += int(cache._sql(sql, chunk).fetchone()[0])
                for key in keys:
                    cache.delete(key, retry=True)
                recount = time.monotonic() - self._last_recount >= _RECOUNT_INTERVAL_S
                total = self._count_bytes(cache) if recount else None
        except (sqlite3.Error, diskcache.Timeout) as exc:
            error = str(exc)
            raise SpoolError("spool delete failed", path=str(self.directory), error=error) from exc
        with self._lock:
            if total is None:
                self._bytes = max(self._bytes - freed, 0)
            else:
                # Writes still queued are not in the table yet: the recount is a floor.
                self._bytes = max(total, self._bytes - freed)
                self._last_recount = time.monotonic()

    def __len__(self) -> int:
        """Envelopes in the database (those still in the journal: `in_journal`; both: `count`)."""
        return int(self._open_cache().__len__())

    def count(self) -> int:
        """Envelopes held: in the database and still in the journal."""
        return len(self) + self.in_journal

    @property
    def in_journal(self) -> int:
        """Envelopes appended to the journal and not in the database yet (for ~20 ms; longer
        while the disk refuses commits)."""
        journal = self._journal
        waiting = sum(len(taken.entries) for taken in self._unsettled)
        return waiting + (journal.count if journal is not None else 0)

    def oldest_key(self) -> str | None:
        rows = self._open_cache()._sql(_OLDEST_SQL).fetchall()
        return str(rows[0][0]) if rows else None

    def volume(self) -> int:
        """Bytes the spool occupies on disk (database, WAL and shared-memory files)."""
        self._open_cache()
        total = 0
        for path in self.directory.iterdir():
            with contextlib.suppress(FileNotFoundError):  # the WAL may vanish at a checkpoint
                if path.is_file():
                    total += path.stat().st_size
        return total

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["MAX_VALUE_SIZE", "Spool"]
