from __future__ import annotations

import itertools
import os
import threading
import uuid
import warnings

import pytest

from edgemeter import ids
from edgemeter.ids import uuid7, uuid7_ms

# The 74 bits of an id that are random (rand_a and rand_b).
RANDOM_BITS = 0xFFF << 64 | (2**62 - 1)
FUTURE_MS = 2_000_000_000_000


@pytest.fixture
def fresh_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids minted with a made-up now_ms raise `_last`: put it back after the test, or every
    later id of the test session would carry that made-up time."""
    monkeypatch.setattr(ids, "_last", 0)


def test_ids_are_version_7_with_the_rfc_variant() -> None:
    for _ in range(1000):
        text = uuid7()
        u = uuid.UUID(text)
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert text == str(u)


def test_ids_carry_the_millisecond_timestamp(fresh_clock: None) -> None:
    assert uuid.UUID(uuid7(now_ms=1_795_000_000_123)).int >> 80 == 1_795_000_000_123


def test_the_minting_time_is_read_back_from_an_id(fresh_clock: None) -> None:
    assert uuid7_ms(uuid7(now_ms=1_795_000_000_123)) == 1_795_000_000_123
    assert uuid7_ms(str(uuid.uuid4())) is None
    assert uuid7_ms("not-an-id") is None


def test_ids_increase_even_when_the_clock_steps_back(fresh_clock: None) -> None:
    minted = [uuid7(now_ms=FUTURE_MS), uuid7(now_ms=1_000), uuid7(now_ms=1_000)]
    minted += [uuid7() for _ in range(1000)]
    assert minted == sorted(minted)
    assert len(set(minted)) == len(minted)


def test_a_hundred_thousand_ids_strictly_increase() -> None:
    minted = [uuid7() for _ in range(100_000)]
    assert all(a < b for a, b in itertools.pairwise(minted))


def test_ids_minted_by_many_threads_are_all_distinct() -> None:
    minted: list[list[str]] = [[] for _ in range(4)]

    def mint(into: list[str]) -> None:
        into.extend(uuid7() for _ in range(5000))

    threads = [threading.Thread(target=mint, args=(into,)) for into in minted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for into in minted for text in into]
    assert len(set(every)) == len(every) == 20_000
    assert all(into == sorted(into) for into in minted)


def test_random_bits_are_never_reused_across_refills(fresh_clock: None) -> None:
    # A new millisecond per id, so no id is a counted-up copy of the one before.
    count = 3 * ids._IDS_PER_BLOCK + 7
    randoms = [uuid.UUID(uuid7(now_ms=FUTURE_MS + n)).int & RANDOM_BITS for n in range(count)]
    assert len(set(randoms)) == count


def test_a_forked_child_does_not_mint_its_parents_next_id(fresh_clock: None) -> None:
    uuid7(now_ms=FUTURE_MS)
    if not ids._pool:
        uuid7(now_ms=FUTURE_MS + 1)
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python warns that fork() in a multi-threaded process may deadlock the child; this
        # child only mints an id (under a lock it re-creates at fork) and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, uuid7(now_ms=FUTURE_MS + 2).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = uuid7(now_ms=FUTURE_MS + 2)
    assert uuid.UUID(child).version == 7
    assert child != parent
