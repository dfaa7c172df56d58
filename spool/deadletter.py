"""Dead-letter area: envelopes the broker refuses for good, kept next to the spool for an operator.

They leave the publish loop, and can be listed, exported and requeued (SPEC §5).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from spool.errors import RouteError, SpoolError
from spool.routing import unpack
from spool.store import Spool

if sys.platform != "win32":
    import fcntl

# Inside the spool directory, so the operator finds both together and one volume holds both.
DIRNAME: Final = "dead-letter"
_LOCK_FILE: Final = "move.lock"
_PAGE: Final = 256
# Reasons come from broker error texts; a bound keeps a surprising one from bloating records.
_MAX_REASON: Final = 300


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused envelope: its bytes unchanged, why and when it was set aside."""

    key: str
    envelope: bytes
    error: str
    reason: str
    dead_lettered_at: float

    def to_json(self) -> dict[str, Any]:
        """The export form: the envelope as parsed JSON (base64 if it is not JSON), and the
        subject and headers of a routed one."""
        obj: dict[str, Any] = {
            "key": self.key,
            "error": self.error,
            "reason": self.reason,
            "dead_lettered_at": iso_time(self.dead_lettered_at),
            "size": len(self.envelope),
        }
        body = self.envelope
        with contextlib.suppress(RouteError):  # a damaged route: the bytes as they are
            route, body = unpack(self.envelope)
            if route.subject:
                obj["subject"] = route.subject
            if route.headers:
                obj["headers"] = dict(route.headers)
        try:
            obj["envelope"] = json.loads(body)
        except ValueError:
            obj["envelope_base64"] = base64.b64encode(self.envelope).decode("ascii")
        return obj


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def encode_record(envelope: bytes, error: str, reason: str, at: float) -> bytes:
    """A header line of JSON, then the envelope bytes exactly as they were spooled."""
    header = {"error": error, "reason": reason[:_MAX_REASON], "dead_lettered_at": at}
    # json.dumps escapes every newline, so the first b"\n" always ends the header.
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + envelope


def decode_record(key: str, record: bytes) -> DeadLetter:
    """Parse a stored record open-world: a damaged header still yields the envelope bytes."""
    head, sep, envelope = record.partition(b"\n")
    try:
        header = json.loads(head) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        return DeadLetter(key, record, "", "unreadable dead-letter header", 0.0)
    at = header.get("dead_lettered_at")
    return DeadLetter(
        key=key,
        envelope=envelope,
        error=str(header.get("error", "")),
        reason=str(header.get("reason", "")),
        dead_lettered_at=float(at) if isinstance(at, int | float) else 0.0,
    )


def error_of(exc: BaseException) -> tuple[str, str]:
    """(error class, short message) of a refusal; broker texts carry no secrets."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    # nats-py prefixes its texts with "nats: " and often the class name again.
    text = text.removeprefix("nats: ").removeprefix(f"{name}: ")
    return name, text[:_MAX_REASON]


class DeadLetters:
    """The dead-letter area of one spool: a diskcache store of its own, opened on first use.

    Moves between it and the spool happen under an exclusive file lock, so the meter's
    publisher and an operator's CLI in another process never move the same envelope both ways
    at once. Every move writes the destination before it deletes the source: a crash in between
    leaves the envelope in both places, never in neither (see `settle`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._store: Spool | None = None
        self._open_lock = threading.Lock()

    @classmethod
    def of(cls, spool_dir: Path) -> DeadLetters:
        return cls(Path(spool_dir) / DIRNAME)

    def exists(self) -> bool:
        return (self.directory / "cache.db").is_file()

    def close(self) -> None:
        with self._open_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def __enter__(self) -> DeadLetters:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reads: an area that does not exist yet is empty, and is not created -------------------

    def __len__(self) -> int:
        store = self._open(create=False)
        return 0 if store is None else len(store)

    def __iter__(self) -> Iterator[DeadLetter]:
        """Every dead letter in key (= request time) order, read a page at a time."""
        store = self._open(create=False)
        if store is None:
            return
        cursor = ""
        while page := store.read_page(cursor, _PAGE):
            for key, record in page:
                yield decode_record(key, record)
            cursor = page[-1][0]

    def select(self, keys: Collection[str] | None) -> list[DeadLetter]:
        """The dead letters with these keys (all of them for None), in key order."""
        wanted = None if keys is None else set(keys)
        return [d for d in self if wanted is None or d.key in wanted]

    # -- moves (blocking: call them from a thread in async code) -------------------------------

    def move(
        self, spool: Spool, key: str, envelope: bytes, exc: BaseException, now: float | None = None
    ) -> DeadLetter:
        """Take a refused envelope out of the spool into this area."""
        error, reason = error_of(exc)
        letter = DeadLetter(key, envelope, error, reason, time.time() if now is None else now)
        store = self._open(create=True)
        assert store is not None
        with self._locked():
            record = encode_record(envelope, error, reason, letter.dead_lettered_at)
            store.submit(key, record).result()
            spool.delete([key])
        return letter

    def requeue(self, spool: Spool, keys: Collection[str] | None) -> list[str]:
        """Put these dead letters (all for None) back into the spool; return the keys moved.

        The running meter's publisher finds them on its next rescan. Raises SpoolError if the
        spool did not take some of them; those stay here.
        """
        store = self._open(create=False)
        if store is None:
            return []
        with self._locked():
            letters = self.select(keys)
            futures = []
            for letter in letters:
                try:
                    futures.append((letter.key, spool.submit(letter.key, letter.envelope)))
                except SpoolError:
                    break  # full or closed: the ones queued so far still go back
            moved, failure = [], None
            for key, future in futures:
                try:
                    future.result()
                except SpoolError as exc:
                    failure = failure or exc
                else:
                    moved.append(key)
            if moved:
                store.delete(moved)
        if failure is not None or len(moved) < len(letters):
            raise SpoolError(
                "spool did not take every dead letter",
                path=str(spool.directory),
                requeued=len(moved),
                left=len(letters) - len(moved),
            )
        return moved

    def settle(self, spool: Spool) -> int:
        """Finish moves a crash interrupted; return how many dead letters were checked.

        A key in both places means a move into this area, or a requeue, stopped between its
        write and its delete. Either way the spool copy goes: the envelope stays dead-lettered
        (a requeue cut short is simply not done) and is never dead-lettered a second time. Call
        it before publishing starts.
        """
        store = self._open(create=False)
        if store is None:
            return 0
        with self._locked():
            keys = [letter.key for letter in self]
            for start in range(0, len(keys), _PAGE):
                spool.delete(keys[start : start + _PAGE])  # a key not in the spool is a no-op
        return len(keys)

    # -- internals -----------------------------------------------------------------------------

    def _open(self, *, create: bool) -> Spool | None:
        with self._open_lock:
            if self._store is None:
                if not create and not self.exists():
                    return None
                # FULL sync: the copy here must survive power loss before the spool forgets it.
                # Moves are rare, so the cost per commit does not matter.
                store = Spool(self.directory, sync_full=True, max_batch=64)
                store.open()
                self._store = store
            return self._store

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock across threads and processes; the OS drops it if its holder dies."""
        path = self.directory / _LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(
                "dead-letter area is not writable", path=str(self.directory), error=str(exc)
            ) from exc
        try:
            # Windows has no flock (the meter runs there only for debugging): a requeue racing
            # a move of the same envelope is not guarded there.
            if sys.platform != "win32":
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


__all__ = ["DIRNAME", "DeadLetter", "DeadLetters", "decode_record", "encode_record", "error_of"]
