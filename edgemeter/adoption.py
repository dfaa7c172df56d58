"""The spools of a group of meters under one meter_spool_dir, and their adoption: a spool nobody
publishes any more (its worker is gone, or the group went from one process to N or back) is
drained by a meter that runs, under the spool's lock, so it is never lost nor published twice.

Layout: `edgemeter serve --workers N` gives worker i the spool `<meter_spool_dir>/worker-<i>`; a
single meter (mitmdump, mitmweb, `edgemeter serve`) keeps `<meter_spool_dir>` itself. Every meter
looks at the others now and then: one whose publisher lock it can take (spool.lock: nobody
publishes it) and which holds envelopes, it publishes for up to a round, then lets go, so that a
worker restarted on its own spool takes it back within a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Final

from spool.deadletter import DeadLetters
from spool.errors import SpoolError, describe
from spool.lock import SpoolLock
from spool.publisher import NatsConfig, Publisher
from spool.store import Spool

logger = logging.getLogger(__name__)

WORKER_PREFIX: Final = "worker-"
# The first look soon after start (a group that replaced a single meter drains its spool at
# once), then one every so often: a look is a directory listing and a lock attempt per spool.
_FIRST_LOOK_S: Final = 1.0
_LOOK_EVERY_S: Final = 10.0
# The longest an adopted spool is held in one go: its own worker, restarted, waits at most this
# long (plus an ack timeout) before its publisher has it back.
_ROUND_S: Final = 10.0
_POLL_S: Final = 0.2


def own_spool_dir(root: Path, worker: int | None) -> Path:
    """The spool of worker `worker` of a group on `root`, or of a single meter (None)."""
    return root if worker is None else root / f"{WORKER_PREFIX}{worker}"


def spool_dirs(root: Path) -> list[Path]:
    """Every spool under `root`: its own (a single meter's) and each worker's, that exist."""
    found = [root] if (root / "cache.db").is_file() else []
    with contextlib.suppress(OSError):
        found += sorted(
            path
            for path in root.glob(f"{WORKER_PREFIX}*")
            if path.name.removeprefix(WORKER_PREFIX).isdigit() and (path / "cache.db").is_file()
        )
    return found


class Adopter:
    """Publishes, in the background, the spools under `root` other than `own` that nobody
    publishes (see the module docstring)."""

    def __init__(self, root: Path, own: Path, config: NatsConfig) -> None:
        self.root = root
        self.own = own
        self.config = config
        self._published = 0
        self._current: Publisher | None = None
        self._task: asyncio.Task[None] | None = None
        # Said once per spool: which ones this meter adopted.
        self._told: set[Path] = set()

    @property
    def published(self) -> int:
        """Envelopes of adopted spools the broker acked, the round under way included."""
        current = self._current.stats.acked if self._current is not None else 0
        return self._published + current

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="adopter")

    async def stop(self) -> None:
        """Stop at once: a spool being adopted keeps what is left for the next look."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await asyncio.sleep(_FIRST_LOOK_S)
        while True:
            try:
                for directory in await asyncio.to_thread(spool_dirs, self.root):
                    if directory != self.own:
                        await self._adopt(directory)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the task outlives any surprise, like the publisher
                logger.warning(f"adopting spools under {self.root} failed: {describe(exc)}")
            await asyncio.sleep(_LOOK_EVERY_S)

    async def _adopt(self, directory: Path) -> None:
        """One round on one spool, if nobody publishes it and it holds envelopes."""
        lock = SpoolLock(directory)
        if not lock.acquire_nowait():
            return  # its own meter runs, or another one adopts it now
        spool = Spool(directory)
        dead = DeadLetters.of(directory)
        publisher: Publisher | None = None
        try:
            await asyncio.to_thread(spool.open)
            spooled = await asyncio.to_thread(len, spool)
            if not spooled:
                return
            if directory not in self._told:
                self._told.add(directory)
                logger.info(
                    f"adopting {spooled} envelopes in {directory}: nobody else publishes it"
                )
            publisher = self._current = Publisher(spool, self.config, dead, lock=lock)
            publisher.start()
            deadline = time.monotonic() + _ROUND_S
            while time.monotonic() < deadline:
                left: int = await asyncio.to_thread(len, spool)
                if not left:
                    break
                await asyncio.sleep(_POLL_S)
        except SpoolError as exc:
            logger.warning(f"cannot adopt the spool {directory}: {exc}")
        finally:
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(publisher.stop(drain_timeout=0))
                self._current = None
                self._published += publisher.stats.acked
            await asyncio.to_thread(_close, spool, dead)
            lock.release()


def _close(spool: Spool, dead: DeadLetters) -> None:
    spool.close()
    dead.close()


__all__ = ["WORKER_PREFIX", "Adopter", "own_spool_dir", "spool_dirs"]
