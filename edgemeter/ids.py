"""Request ids minted by the meter: UUIDv7 (RFC 9562), time-ordered so spool keys sort by age.

Python 3.12 has no uuid7; this one is also strictly increasing within the process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last = 0


def uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 string; ids minted in one process compare (as strings) in minting order."""
    global _last
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    # 48-bit ms | 4-bit version | 12-bit rand_a | 2-bit variant | 62-bit rand_b
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 64 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & (2**62 - 1)
    with _lock:
        # Same millisecond, or a clock that stepped back: count up from the last id instead.
        # rand_b has 62 bits, so a carry into the variant bits is not a practical concern.
        if value <= _last:
            value = _last + 1
        _last = value
    return str(uuid.UUID(int=value))


def uuid7_ms(value: str) -> int | None:
    """The Unix time in ms a UUIDv7 string was minted at; None for anything else."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    if parsed.version != 7:
        return None
    return parsed.int >> 80
