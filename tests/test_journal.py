"""The spool's write-ahead journal: records, segments, replay after a crash, one holder."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spool import store
from spool.journal import Journal, Taken, frame, records, segments
from spool.store import Spool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("key", "data"),
    [("0193-a", b"{}"), ("k", b""), ("ключ", bytes(range(256)) * 40)],
    ids=["envelope", "empty value", "utf-8 key, binary value"],
)
def test_a_record_reads_back_as_written(key: str, data: bytes) -> None:
    blob = frame(key, data) + frame("next", b"x")
    assert records(blob) == ([(key, data), ("next", b"x")], 0)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-3],  # cut short (a full disk)
        lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:],  # a flipped bit
        lambda b: b + b"\x00\x01",  # half a header
    ],
    ids=["cut short", "flipped bit", "half a header"],
)
def test_whole_records_before_damage_are_kept_and_the_rest_counted(
    damage: Callable[[bytes], bytes],
) -> None:
    whole = frame("a", b"first") + frame("b", b"second")
    blob = damage(whole + frame("c", b"third"))
    found, torn = records(blob)
    assert found[:2] == [("a", b"first"), ("b", b"second")]
    assert torn == len(blob) - sum(len(frame(k, v)) for k, v in found)
    assert torn > 0 or found[2:] == [("c", b"third")]


async def test_a_key_too_long_for_a_record_goes_through_the_writer(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        key = "k" * 70_000
        future = spool.enqueue(key, b"{}")
        assert not future.done() and spool.journaled == 0
        await future
        assert spool.read_page("", 1) == [(key, b"{}")]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """A journal held and started on an empty directory, let go after the test."""
    held = Journal(tmp_path)
    assert held.claim()
    held.start()
    yield held
    held.release()


def test_one_holder_per_directory(tmp_path: Path) -> None:
    first, second = Journal(tmp_path), Journal(tmp_path)
    assert first.claim() and not second.claim()
    first.release()
    assert second.claim()
    second.release()


def test_appends_go_to_a_new_segment_once_taken(tmp_path: Path, journal: Journal) -> None:
    assert journal.append("a", b"1") and journal.append("b", b"22")
    assert (journal.count, journal.appended) == (2, 3)
    taken = journal.take()
    assert taken.entries == [("a", b"1"), ("b", b"22")] and taken.size == 3
    assert journal.append("c", b"333")
    assert taken.path is not None and records(taken.path.read_bytes())[0] == taken.entries
    assert segments(tmp_path) == [taken.path, *(p for p in segments(tmp_path)[1:])]
    assert len(segments(tmp_path)) == 2
    journal.settle(taken.path)
    assert len(segments(tmp_path)) == 1
    assert journal.take().entries == [("c", b"333")]
    nothing = journal.take()
    assert nothing.path is None and nothing.entries == []  # an empty segment stays in use
    journal.close()
    assert not journal.append("d", b"4")


def test_an_append_never_waits_for_the_files_a_take_opens(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """take() runs on the writer thread too: a slow disk there must not stall the loop's append."""
    journal.append("a", b"1")
    entered, go = threading.Event(), threading.Event()
    appended_meanwhile: list[bool] = []
    real = os.open

    def slow_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            # An append waiting for the take's lock never gets here first: this gives up.
            appended_meanwhile.append(go.wait(3))
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", slow_open)
    taken: list[Taken] = []
    taker = threading.Thread(target=lambda: taken.append(journal.take()))
    taker.start()
    assert entered.wait(10)
    assert journal.append("b", b"2")  # while the take waits for the disk
    go.set()
    taker.join(10)
    assert appended_meanwhile == [True]
    assert [key for key, _ in taken[0].entries] == ["a", "b"]  # both in the segment taken


def test_a_short_write_is_cut_off_so_the_segment_stays_readable(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert journal.append("a", b"kept")
    real = os.write

    def half(fd: int, data: bytes) -> int:
        return real(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", half)  # only the append below runs meanwhile
    assert not journal.append("b", b"x" * 100)  # the caller spools it another way
    monkeypatch.setattr(os, "write", real)
    assert journal.append("c", b"after")
    taken = journal.take()
    assert taken.entries == [("a", b"kept"), ("c", b"after")]
    assert taken.path is not None and records(taken.path.read_bytes()) == (taken.entries, 0)


CRASHER = """
import asyncio, os, sys
from pathlib import Path
from spool.store import Spool

async def main():
    spool = Spool(Path(sys.argv[1]))
    spool.open()
    spool.enqueue("0193-committed", b"in the database")
    await spool.flush()
    for i in range(200):
        assert spool.enqueue(f"0193-{i:04d}", b"journaled").done()
    os._exit(0)  # before the journal's flush, no close(): the process dies with them appended

asyncio.run(main())
"""


def test_envelopes_journaled_before_a_crash_are_replayed_once(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", CRASHER, str(directory)], check=True, cwd=ROOT, env=env, timeout=30
    )
    left = segments(directory)
    assert left  # by the crash
    with Spool(directory) as spool:
        assert len(spool) == 201
        assert ("0193-0000", b"journaled") in spool.read_page("", 1000)
        assert ("0193-committed", b"in the database") in spool.read_page("", 1000)
        assert not any(path.exists() for path in left)  # replayed: nothing to replay twice
    with Spool(directory) as again:
        assert len(again) == 201


def test_a_replay_leaves_an_envelope_already_in_the_database_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        spool.submit("0193-a", b"committed").result(timeout=10)
    (directory / "journal-00000007.log").write_bytes(
        frame("0193-a", b"older copy") + frame("0193-b", b"only here")
    )
    with Spool(directory) as spool:
        assert spool.read_page("", 10) == [("0193-a", b"committed"), ("0193-b", b"only here")]


def test_a_damaged_segment_replays_its_whole_records_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "journal-00000001.log").write_bytes(frame("0193-a", b"whole") + b"\x05\x00")
    with Spool(directory) as spool:
        assert spool.read_page("", 10) == [("0193-a", b"whole")]
    assert "2 bytes at its end are no whole envelope" in caplog.text


async def test_a_second_spool_on_a_journaled_directory_neither_journals_nor_replays(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    first = Spool(directory)
    first.open()
    try:
        assert first.enqueue("0193-a", b"journaled").done()
        second = Spool(directory)  # e.g. `edgemeter spool status` beside a running meter
        second.open()
        try:
            assert segments(directory)  # the first's segment: not the second's to replay
            assert len(second) == 0
            future = second.enqueue("0193-b", b"through the writer")
            assert not future.done()
            await future
            assert second.journaled == 0
        finally:
            second.close()
        await first.flush()
        assert len(first) == 2
    finally:
        first.close()


async def test_a_segment_left_after_its_commit_is_not_replayed_over_a_published_envelope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its envelopes may have been published and deleted since: inserting them again would
    publish them twice, past the broker's duplicate window if the restart comes later."""
    directory = tmp_path / "spool"
    refused: list[Path] = []

    def unremovable(self: Journal, path: Path | None) -> None:
        if path is not None and not refused:
            refused.append(path)
            raise PermissionError("the disk refuses the unlink")

    monkeypatch.setattr(Journal, "settle", unremovable)
    with Spool(directory) as spool:
        spool.enqueue("0193-a", b"published")
        await spool.flush()
        assert refused and refused[0].exists()  # committed, its segment still there
        await spool.discard({"0193-a": 9})  # the broker's ack came: gone from the spool
    monkeypatch.undo()
    with Spool(directory) as spool:
        assert len(spool) == 0  # not resurrected by a replay
        assert not refused[0].exists()


async def test_a_spool_that_found_its_journal_held_takes_it_once_the_holder_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker restarted while another one adopts its spool journals again after the adopter."""
    monkeypatch.setattr(store, "_CLAIM_RETRY_S", 0.0)
    directory = tmp_path / "spool"
    adopter = Spool(directory)
    adopter.open()
    restarted = Spool(directory)
    restarted.open()
    try:
        heard: list[str] = []
        restarted.listen(lambda seq, entries: heard.extend(key for key, _ in entries))
        await restarted.enqueue("0193-a", b"through the writer")
        assert restarted.journaled == 0
        await asyncio.to_thread(adopter.close)
        (directory / "journal-00000099.log").write_bytes(frame("0193-left", b"by a crash"))
        held = restarted.held_bytes
        await restarted.enqueue("0193-b", b"through the writer, which takes the journal")
        assert restarted.enqueue("0193-c", b"journaled").done()
        assert restarted.journaled == 1
        await restarted.flush()
        # The replayed envelope is counted and told to the publisher like a commit.
        assert "0193-left" in heard
        assert restarted.held_bytes >= held + len(b"by a crash")
        assert [k for k, _ in restarted.read_page("", 10)] == [
            "0193-a",
            "0193-b",
            "0193-c",
            "0193-left",
        ]
        assert not (directory / "journal-00000099.log").exists()
    finally:
        restarted.close()
    successor = Journal(directory)
    assert successor.claim()  # let go at close
    successor.release()


async def test_the_publisher_hears_of_envelopes_only_once_their_segment_is_gone(
    tmp_path: Path,
) -> None:
    """A segment on disk must hold only envelopes nobody published: a replay inserts them all."""
    directory = tmp_path / "spool"
    left: list[list[Path]] = []
    with Spool(directory) as spool:
        spool.listen(lambda seq, entries: left.append(segments(directory)))
        for i in range(5):
            spool.enqueue(f"0193-{i}", b"{}")
        await spool.flush()
        assert len(left) == 1
        # The current segment (empty, for the next appends) is the only one left.
        assert all(path.stat().st_size == 0 for path in left[0])
    assert not segments(directory)


async def test_closing_settles_the_journal_and_lets_go_of_it(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.open()
    spool.enqueue("0193-a", b"{}")
    await asyncio.to_thread(spool.close)
    assert segments(directory) == []
    successor = Journal(directory)
    assert successor.claim()  # another process may now hold it
    successor.release()


async def test_without_flock_no_spool_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")  # no lock could keep a second holder out
    with Spool(tmp_path / "spool") as spool:
        future = spool.enqueue("0193-a", b"{}")
        assert not future.done()
        await future
        assert spool.journaled == 0 and segments(spool.directory) == []
