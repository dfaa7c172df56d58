"""JetStream stream helpers for scripts and tests: create the consumer's stream, read it back.

The meter never calls these: the billing consumer owns its streams (SPEC §5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

# The billing service's stream, as the seed creates it: every catalyst.* subject, the meter's
# included (see the seed's fix about overlapping subjects).
STREAM = "CATALYST_SME"
STREAM_SUBJECTS = ("catalyst.>",)

# JetStream answers this when a stream with the same name but another config already exists,
# e.g. when two callers race to create it.
_STREAM_NAME_IN_USE = 10058


async def ensure_stream(
    url: str,
    name: str = STREAM,
    subjects: Sequence[str] = STREAM_SUBJECTS,
    *,
    storage: str = "file",
    duplicate_window_s: float = 120,
    replicas: int = 1,
) -> None:
    """Create the stream if it does not exist; an existing stream is left exactly as it is.
    `replicas` > 1 needs a JetStream cluster of at least that many servers."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        jsm = nc.jsm()
        try:
            await jsm.stream_info(name)
            return
        except NotFoundError:
            pass
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            storage=StorageType(storage),
            duplicate_window=duplicate_window_s,
            num_replicas=replicas,
        )
        try:
            await jsm.add_stream(config)
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
    finally:
        await nc.close()


async def stream_messages(url: str, name: str) -> list[tuple[dict[str, str] | None, bytes]]:
    """Every message on the stream, in sequence order, as (headers, payload)."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(name)
        first, last = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0:
            return []
        limit = asyncio.Semaphore(64)

        async def get(seq: int) -> tuple[dict[str, str] | None, bytes] | None:
            async with limit:
                try:
                    msg = await jsm.get_msg(name, seq)
                except NotFoundError:
                    return None  # deleted or purged sequence
            return msg.headers, msg.data or b""

        found = await asyncio.gather(*(get(seq) for seq in range(first, last + 1)))
        return [m for m in found if m is not None]
    finally:
        await nc.close()


__all__ = ["ensure_stream", "stream_messages"]
