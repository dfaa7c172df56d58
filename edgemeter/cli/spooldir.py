"""A meter's spool directory as the subcommands find it: the --spool-dir option, and whether a
running meter on this host holds it open.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path
from typing import Final

from edgemeter.settings import (
    default_spool_dir,
)
from spool.errors import SpoolError

if sys.platform != "win32":
    import fcntl


def spool_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--spool-dir",
        metavar="DIR",
        type=Path,
        help=f"the meter's spool directory (meter_spool_dir); default: {default_spool_dir()}",
    )
    return parent


def existing_spool_dir(args: argparse.Namespace) -> Path:
    """The spool directory the command works on; it must exist and is never created here."""
    directory = args.spool_dir.expanduser() if args.spool_dir else default_spool_dir()
    if not directory.is_dir():
        raise SpoolError(
            "no spool directory here (give --spool-dir or set EDGEMETER_SPOOL_DIR)",
            path=str(directory),
        )
    if not (directory / "cache.db").is_file():
        raise SpoolError("not a meter's spool directory (no cache.db)", path=str(directory))
    return directory


def in_use_by(directory: Path) -> int | None:
    """The id of a process that has the spool's database open (a running meter), else None.

    SQLite in WAL mode holds a shared lock on one byte of the -shm file (the DMS byte at offset
    128) for as long as a connection is open, and the OS drops it when the process ends: so it
    tells a live meter from the files a dead one left behind. F_GETLK only asks; it takes no
    lock, so the meter is not disturbed. Locks of this process itself are not seen, and the
    answer covers this host only (a meter on another node sharing the volume is not seen).
    None also where the platform's lock query is not known (see CAN_TELL_IN_USE).
    """
    if not CAN_TELL_IN_USE:
        return None
    layout = _FLOCK[sys.platform]
    try:
        fd = os.open(directory / "cache.db-shm", os.O_RDONLY)
    except FileNotFoundError:
        return None  # no connection has the database open in WAL mode
    try:
        fields = {"type": fcntl.F_WRLCK, "whence": os.SEEK_SET, "start": 128, "len": 1, "pid": 0}
        query = struct.pack(layout[0], *(fields[name] for name in layout[1]))
        answer = dict(
            zip(
                layout[1],
                struct.unpack(layout[0], fcntl.fcntl(fd, fcntl.F_GETLK, query)),
                strict=True,
            )
        )
    finally:
        os.close(fd)
    if answer["type"] == fcntl.F_UNLCK:
        return None
    return int(answer["pid"])


# struct flock of each platform: (struct format, field order).
_FLOCK: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "linux": ("hhqqi4x", ("type", "whence", "start", "len", "pid")),
    "darwin": ("qqihh", ("start", "len", "pid", "type", "whence")),
}
CAN_TELL_IN_USE: Final = sys.platform in _FLOCK and struct.calcsize("P") == 8
