"""The write-ahead spool: ordering, group commit, crash safety, permissions, no pickle."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import diskcache
import pytest

from spool import store
from spool.errors import SpoolError, SpoolFullError
from spool.store import Spool

ROOT = Path(__file__).resolve().parent.parent


def fill(spool: Spool, keys: list[str]) -> None:
    futures = [spool.submit(key, f"envelope {key}".encode()) for key in keys]
    for future in futures:
        future.result(timeout=10)


def test_pages_follow_key_order_after_the_cursor(spool: Spool) -> None:
    keys = [f"0193-{i:04d}" for i in range(10)]
    fill(spool, [keys[i] for i in (7, 2, 9, 0, 5, 1, 8, 3, 6, 4)])

    first = spool.read_page("", 4)
    assert [k for k, _ in first] == keys[:4]
    assert first[0][1] == b"envelope 0193-0000"
    second = spool.read_page(first[-1][0], 4)
    assert [k for k, _ in second] == keys[4:8]
    assert [k for k, _ in spool.read_page(second[-1][0], 4)] == keys[8:]
    assert spool.read_page(keys[-1], 4) == []

    spool.delete([*keys[:3], "not-there"])
    assert len(spool) == 7
    assert spool.oldest_key() == keys[3]
    assert [k for k, _ in spool.read_page("", 100)] == keys[3:]
    assert spool.volume() > 0


@pytest.mark.parametrize(
    ("after", "limit", "keys", "count"),
    [
        ("", 2, ["k0", "k1"], None),  # a full page: maybe more behind it, no count
        ("k1", 2, ["k2"], 3),  # a short page is the end: the count comes with it
        ("k2", 2, [], 3),
        ("", 3, ["k0", "k1", "k2"], None),
    ],
)
def test_a_scan_counts_the_spool_only_at_its_end(
    spool: Spool, after: str, limit: int, keys: list[str], count: int | None
) -> None:
    fill(spool, ["k0", "k1", "k2"])
    page, spooled = spool.scan(after, limit)
    assert [k for k, _ in page] == keys
    assert spooled == count


async def test_put_returns_once_the_envelope_is_committed(spool: Spool) -> None:
    await spool.put("0193-a", b"{}")
    assert spool.read_page("", 10) == [("0193-a", b"{}")]


async def test_concurrent_submits_share_group_commits_each_told_to_the_listener_once(
    spool: Spool,
) -> None:
    commits: list[tuple[int, list[tuple[str, bytes]]]] = []
    spool.listen(lambda seq, entries: commits.append((seq, entries)))
    futures = []
    lock = threading.Lock()

    def submitter(t: int) -> None:
        for i in range(250):
            future = spool.submit(f"0193-{t}-{i:04d}", b"x" * 200)
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join)
    for future in futures:
        await asyncio.wrap_future(future)
    assert len(spool) == 2000
    deadline = time.monotonic() + 10
    while sum(len(entries) for _, entries in commits) < 2000 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    told = [key for _, entries in commits for key, _ in entries]
    assert sorted(told) == sorted(k for k, _ in spool.read_page("", 3000))  # each once
    sizes = [len(entries) for _, entries in commits]
    assert len(sizes) < 2000  # some commits carried more than one envelope
    assert max(sizes) <= spool.max_batch
    seqs = [seq for seq, _ in commits]
    assert seqs == sorted(set(seqs))  # numbered in commit order


async def test_many_awaiting_puts_all_commit(spool: Spool) -> None:
    await asyncio.gather(*(spool.put(f"0193-{i:05d}", b"{}") for i in range(1000)))
    assert len(spool) == 1000


def test_close_commits_everything_queued_and_is_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    futures = [spool.submit(f"0193-{i:04d}", b"{}") for i in range(500)]
    spool.close()
    assert all(f.done() and f.exception() is None for f in futures)
    spool.close()
    with pytest.raises(SpoolError):
        spool.submit("late", b"{}")

    reopened = Spool(tmp_path / "spool")
    reopened.open()
    try:
        assert len(reopened) == 500
    finally:
        reopened.close()


CRASHER = """
import os, sys
from pathlib import Path
from spool import store
from spool.store import Spool

spool = Spool(Path(sys.argv[1]))
spool.open()
for i in range(300):
    spool.submit(f"0193-{i:04d}", b"envelope").result()
os._exit(0)  # no close(): the process dies with the spool open
"""


def test_committed_envelopes_survive_a_crash(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", CRASHER, str(tmp_path / "spool")],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        assert len(spool) == 300
        assert spool.read_page("", 1) == [("0193-0000", b"envelope")]
    finally:
        spool.close()


def test_spool_directory_and_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "spool"
    directory.mkdir(parents=True, mode=0o755)
    directory.chmod(0o755)
    spool = Spool(directory)
    spool.open()
    try:
        spool.submit("0193-a", b"{}").result()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        files = [p for p in directory.iterdir() if p.is_file()]
        assert files
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    finally:
        spool.close()


def test_a_path_that_cannot_be_a_directory_raises_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="not writable"):
        Spool(blocker / "spool").open()


def test_a_corrupt_database_raises_spool_error(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(SpoolError, match="unreadable"):
        Spool(directory).open()


def test_values_must_be_bytes_so_nothing_is_pickled(spool: Spool) -> None:
    with pytest.raises(TypeError):
        spool.submit("0193-a", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        spool.submit("0193-a", bytearray(b"{}"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        spool.submit("0193-a", {"a": 1})  # type: ignore[arg-type]

    class Key(str):
        pass

    with pytest.raises(TypeError):
        spool.submit(Key("0193-a"), b"{}")
    assert len(spool) == 0


def test_read_page_agrees_with_diskcache_public_api(spool: Spool, tmp_path: Path) -> None:
    """Pins the diskcache schema read_page's SQL relies on: fails if an upgrade changes it."""
    big = os.urandom(200_000)  # above diskcache's default 32 KiB file threshold
    fill(spool, [f"0193-{i:03d}" for i in range(50)])
    spool.submit("0193-big", big).result()

    db = sqlite3.connect(spool.directory / "cache.db")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(Cache)")}
        indexes = {row[1] for row in db.execute("PRAGMA index_list(Cache)")}
        modes = {row[0] for row in db.execute("SELECT DISTINCT mode FROM Cache")}
        raws = {row[0] for row in db.execute("SELECT DISTINCT raw FROM Cache")}
    finally:
        db.close()
    assert {"key", "raw", "mode", "value", "filename"} <= columns
    assert "Cache_key_raw" in indexes
    assert modes == {1} and raws == {1}  # every value inline, every key raw

    cache = diskcache.Cache(str(spool.directory))
    try:
        expected = [(key, cache.get(key)) for key in cache.iterkeys()]
    finally:
        cache.close()
    assert spool.read_page("", 1000) == expected
    assert dict(expected)["0193-big"] == big


# -- spool pressure: meter_spool_max_mb and a disk that stops taking writes -------------------


def test_a_full_spool_refuses_envelopes_until_deletes_free_room(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", max_bytes=3000) as spool:
        fill(spool, ["k1", "k2"])
        spool.submit("k3", b"x" * 3000).result(timeout=10)
        assert spool.held_bytes == 3000 + 2 * len(b"envelope k1")
        assert not spool.accepting
        with pytest.raises(SpoolFullError):
            spool.submit("k4", b"y")
        assert len(spool) == 3

        spool.delete(["k3"])
        assert spool.accepting
        spool.submit("k4", b"y").result(timeout=10)
        assert [k for k, _ in spool.read_page("", 10)] == ["k1", "k2", "k4"]


def test_bytes_held_are_counted_from_disk_at_open(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.submit("k1", b"x" * 1500).result(timeout=10)
    with Spool(tmp_path / "spool", max_bytes=1000) as spool:
        assert spool.held_bytes == 1500
        assert not spool.accepting


def test_deletes_recount_rows_another_process_added(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as ours, Spool(tmp_path / "spool") as theirs:
        theirs.submit("requeued", b"x" * 700).result(timeout=10)
        ours.submit("k1", b"y" * 10).result(timeout=10)
        assert ours.held_bytes == 10
        ours._last_recount = 0.0  # as if the recount interval had passed
        ours.delete(["k1"])
        assert ours.held_bytes == 700


@pytest.fixture
def no_file_growth() -> Iterator[Callable[[bool], None]]:
    """Makes every write that grows a file fail with EFBIG, as a full disk does, in this process
    (RLIMIT_FSIZE); call with False to give the disk back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def disk_full(full: bool) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0 if full else soft, hard))

    try:
        yield disk_full
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_disk_that_stops_taking_writes_fails_puts_until_a_probe_succeeds(
    tmp_path: Path, no_file_growth: Callable[[bool], None]
) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.submit("before", b"x").result(timeout=10)
        assert spool.accepting
        # Past what the first commit wrote to the WAL, so the next commits must grow it.
        for i in range(50):
            spool.submit(f"filler{i:02d}", b"f" * 4000).result(timeout=10)
        spool.delete([f"filler{i:02d}" for i in range(50)])
        no_file_growth(True)
        with pytest.raises(SpoolError, match="write failed"):
            spool.submit("lost", b"z" * 200_000).result(timeout=10)
        assert not spool.accepting
        assert spool.held_bytes == 1

        no_file_growth(False)
        deadline = time.monotonic() + 10
        while not spool.accepting and time.monotonic() < deadline:
            time.sleep(0.05)  # the probe runs at most once a second
        assert spool.accepting
        spool.submit("after", b"y").result(timeout=10)
        assert [k for k, _ in spool.read_page("", 10)] == ["after", "before"]


async def test_rows_it_writes_and_discards_are_the_rows_diskcache_writes(spool: Spool) -> None:
    """The writer's direct SQL must leave what Cache.set / Cache.delete would: same columns,
    and diskcache's own count and size settings kept by its triggers."""
    await spool.put("0193-a", b"spooled")
    cache = diskcache.Cache(str(spool.directory))
    try:
        cache.set("0193-b", b"by diskcache")
        db = sqlite3.connect(spool.directory / "cache.db")
        try:
            columns = "raw, expire_time, access_count, tag, size, mode, filename, typeof(key)"
            rows = db.execute(f"SELECT {columns} FROM Cache ORDER BY key").fetchall()
        finally:
            db.close()
        assert len(rows) == 2 and rows[0] == rows[1]
        assert cache.get("0193-a") == b"spooled"
        assert len(cache) == 2 and cache.volume() > 0
        held = spool.held_bytes
        await spool.discard({"0193-a": 7, "0193-gone": 99})
        assert len(cache) == 1 and cache.get("0193-a") is None
        assert spool.held_bytes == held - 7  # only what was there is freed
        # diskcache finds nothing inconsistent; the journal's files are not its own.
        found = [str(w.message) for w in cache.check()]
        assert all(m.startswith("unknown file") and "journal" in m for m in found), found
    finally:
        cache.close()


async def test_a_scan_in_the_writer_says_which_commit_it_reflects(spool: Spool) -> None:
    told: list[int] = []
    spool.listen(lambda seq, entries: told.append(seq))
    await spool.put("0193-a", b"{}")
    first = await spool.scan_async("", 10)
    await spool.put("0193-b", b"{}")
    second = await spool.scan_async("", 10)
    assert [k for k, _ in first.page] == ["0193-a"] and first.seq == told[0]
    assert [k for k, _ in second.page] == ["0193-a", "0193-b"] and second.seq == told[1]
    assert first.spooled == 1 and second.spooled == 2
    spool.unlisten(lambda seq, entries: None)  # not the listener: it stays
    assert spool.listening


async def test_an_enqueued_envelope_is_durable_at_once_and_committed_on_the_loops_thread_soon(
    spool: Spool,
) -> None:
    told: list[tuple[int, int]] = []
    spool.listen(lambda seq, entries: told.append((len(entries), threading.get_ident())))
    futures = [spool.enqueue(f"0193-{i:03d}", b"{}") for i in range(100)]
    assert all(f.done() and f.exception() is None for f in futures)  # nobody waits for a commit
    assert spool.journaled == 100 and told == [] and len(spool) == 0
    segment = next(spool.directory.glob("journal-*.log"))
    assert segment.stat().st_size > 100 * len(b"0193-000{}")  # in the kernel, not in memory
    deadline = time.monotonic() + 10
    while not told and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert told == [(100, threading.get_ident())]  # one transaction, on the loop's thread
    assert len(spool) == 100 and (spool.loop_commits, spool.thread_commits) == (1, 0)
    assert not segment.exists()  # settled: its envelopes are in the database


async def test_the_journal_flushes_at_once_when_it_holds_a_batch(spool: Spool) -> None:
    for i in range(spool.max_batch):
        spool.enqueue(f"0193-{i:04d}", b"{}")
    assert len(spool) == spool.max_batch and spool.loop_commits == 1


async def test_without_the_journal_a_turns_envelopes_share_one_writer_commit(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", sync_full=True)  # an append is not synced: no journal
    spool.open()
    try:
        told: list[int] = []
        spool.listen(lambda seq, entries: told.append(len(entries)))
        futures = [spool.enqueue(f"0193-{i:03d}", b"{}") for i in range(100)]
        assert not any(f.done() for f in futures)
        await asyncio.gather(*futures)
        assert told == [100]  # one hand-over to the writer, one transaction, one wake-up
        assert (spool.journaled, spool.loop_commits, spool.thread_commits) == (0, 0, 1)
        assert not list(spool.directory.glob("journal-*.log"))
    finally:
        spool.close()


async def test_an_envelope_enqueued_as_the_spool_closes_fails_instead_of_vanishing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", sync_full=True)
    spool.open()
    future = spool.enqueue("0193-a", b"{}")
    spool.close()  # before the loop's turn ends and hands it over
    with pytest.raises(SpoolError, match="not open"):
        await future
    with pytest.raises(SpoolError, match="not open"):
        spool.enqueue("0193-b", b"{}")


async def test_an_envelope_journaled_as_the_spool_closes_is_committed_by_the_close(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    await spool.enqueue("0193-a", b"{}")
    spool.close()  # before the journal's flush
    assert not list((tmp_path / "spool").glob("journal-*.log"))
    with Spool(tmp_path / "spool") as reopened:
        assert reopened.read_page("", 10) == [("0193-a", b"{}")]


async def test_enqueue_refuses_once_queued_envelopes_fill_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    spool.open()
    try:
        first = spool.enqueue("0193-a", b"x" * 1000)  # counted before it reaches the writer
        with pytest.raises(SpoolFullError):
            spool.enqueue("0193-b", b"{}")
        await first
    finally:
        spool.close()


# -- deletes ride in commits ------------------------------------------------------------------


@pytest.fixture
def patient_discards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discards wait for a commit to ride in far longer than any test runs."""
    monkeypatch.setattr(store, "_DISCARD_DELAY_S", 3600.0)


async def test_a_discard_rides_in_the_next_commits_transaction(
    spool: Spool, patient_discards: None
) -> None:
    await spool.put("0193-a", b"{}")
    before = (await spool.scan_async("", 10)).seq
    gone = spool.discard({"0193-a": 2})
    await spool.put("0193-b", b"{}")
    await asyncio.wait_for(gone, 10)
    after = await spool.scan_async("", 10)
    assert [k for k, _ in after.page] == ["0193-b"]
    assert after.seq == before + 1  # one transaction wrote b and deleted a


async def test_a_discard_with_no_commit_to_ride_in_goes_alone_after_a_moment(
    spool: Spool,
) -> None:
    await spool.put("0193-a", b"{}")
    before = (await spool.scan_async("", 10)).seq
    await asyncio.wait_for(spool.discard({"0193-a": 2}), 10)
    after = await spool.scan_async("", 10)
    assert after.page == [] and after.seq == before + 1


async def test_a_large_discard_goes_at_once(spool: Spool, patient_discards: None) -> None:
    keys = [f"0193-{i:04d}" for i in range(store._DISCARD_NOW_KEYS)]
    await asyncio.gather(*[spool.enqueue(key, b"{}") for key in keys])
    await asyncio.wait_for(spool.discard(dict.fromkeys(keys, 2)), 10)
    assert len(spool) == 0


async def test_a_discard_while_nothing_is_written_goes_at_once(
    tmp_path: Path, patient_discards: None
) -> None:
    """A backlog draining after a restart has no commits to ride in."""
    with Spool(tmp_path / "spool") as before:
        fill(before, ["0193-a", "0193-b"])
    with Spool(tmp_path / "spool") as spool:
        await asyncio.wait_for(spool.discard({"0193-a": 2}), 10)
        assert [k for k, _ in spool.read_page("", 10)] == ["0193-b"]


async def test_close_does_the_discards_still_waiting(
    tmp_path: Path, patient_discards: None
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    await spool.put("0193-a", b"{}")
    gone = spool.discard({"0193-a": 2})
    await asyncio.to_thread(spool.close)
    await asyncio.wait_for(gone, 10)
    with Spool(tmp_path / "spool") as reopened:
        assert len(reopened) == 0


# -- commits on the loop's thread -------------------------------------------------------------


async def test_a_locked_database_hands_the_commit_to_the_writer_without_blocking_the_loop(
    spool: Spool,
) -> None:
    told: list[int] = []
    spool.listen(lambda seq, entries: told.append(len(entries)))
    other = sqlite3.connect(spool.directory / "cache.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        assert spool.enqueue("0193-a", b"{}").done()
        flushed = asyncio.ensure_future(spool.flush())
        await asyncio.sleep(0.2)
        assert time.monotonic() - started < 1.0 and not flushed.done()  # the loop ran on
        assert told == [] and list(spool.directory.glob("journal-*.log"))
        other.execute("COMMIT")
        await asyncio.wait_for(flushed, 10)
    finally:
        other.close()
    assert told == [1] and (spool.loop_commits, spool.thread_commits) == (0, 1)
    spool.enqueue("0193-b", b"{}")
    await spool.flush()
    assert spool.loop_commits == 1  # the lock is gone: on the loop's thread again


async def test_commits_are_heard_in_order_when_writer_and_loop_both_commit(
    spool: Spool,
) -> None:
    told: list[int] = []
    spool.listen(lambda seq, entries: told.append(seq))
    other = sqlite3.connect(spool.directory / "cache.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        for i in range(3):
            spool.enqueue(f"0193-w{i}", b"{}")
        spool._flush_journal()  # handed to the writer, which waits for the lock
        await asyncio.sleep(0.05)
        other.execute("COMMIT")
    finally:
        other.close()
    # The writer's commit may not be heard yet when these come: they wait their turn.
    for i in range(3):
        spool.enqueue(f"0193-i{i}", b"{}")
        spool._flush_journal()
    for i in range(5):
        spool.enqueue(f"0193-j{i}", b"{}")
        await spool.flush()
    assert told == sorted(told) and len(told) == len(set(told))
    assert len(spool) == 11 and spool.loop_commits >= 1 and spool.thread_commits >= 1


async def test_slow_commits_on_the_loop_in_a_row_send_the_next_ones_to_the_writer(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_HERE_SLOW_S", 0.0)  # every commit is "slow"
    for i in range(store._HERE_SLOW_RUN + 1):
        spool.enqueue(f"0193-{i}", b"{}")
        await spool.flush()
    assert spool.loop_commits == store._HERE_SLOW_RUN  # one slow commit is not a slow disk
    assert spool.thread_commits == 1


async def test_commits_on_the_loop_leave_checkpoints_to_the_writer_and_the_wal_bounded(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_CHECKPOINT_EVERY", 50)
    checkpoints = 0
    original = spool._checkpoint

    def counted(cache: diskcache.Cache) -> None:
        nonlocal checkpoints
        original(cache)
        checkpoints += 1

    monkeypatch.setattr(spool, "_checkpoint", counted)
    value = b"x" * 3000
    for i in range(600):
        spool.enqueue(f"0193-{i:04d}", value)
        spool._flush_journal()  # one envelope a commit, as at one request at a time
        if i % 50 == 49:
            # A pause, as between requests, until the writer has checkpointed what was asked.
            deadline = time.monotonic() + 10
            while checkpoints < (i + 1) // 50 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
    wal = (spool.directory / "cache.db-wal").stat().st_size
    assert spool.loop_commits > 500 and checkpoints == 12
    # Without the writer's checkpoints this WAL grew to 17 MiB; with them ~1.5 MiB.
    assert wal < 4 * 2**20


async def test_an_envelope_the_disk_refuses_fails_through_the_writer(
    tmp_path: Path, no_file_growth: Callable[[bool], None]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        spool.enqueue("before", b"x")
        await spool.flush()
        for i in range(50):
            spool.enqueue(f"filler{i:02d}", b"f" * 4000)
        await spool.flush()
        await spool.discard({f"filler{i:02d}": 4000 for i in range(50)})
        no_file_growth(True)
        # Neither the journal's segment nor the WAL can grow: the writer reports it.
        with pytest.raises(SpoolError, match="write failed"):
            await spool.enqueue("lost", b"z" * 200_000)
        assert not spool.accepting
        no_file_growth(False)
    finally:
        spool.close()
    with Spool(tmp_path / "spool") as reopened:
        assert [k for k, _ in reopened.read_page("", 10)] == ["before"]
    with Spool(tmp_path / "spool") as reopened:
        assert [k for k, _ in reopened.read_page("", 10)] == ["before"]
