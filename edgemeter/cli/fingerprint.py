"""`edgemeter fingerprint`: the fingerprint of an API key, for a key map entry, without ever
logging the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
)
from edgemeter.metering.attribution import fingerprint
from edgemeter.settings import (
    parse_fingerprint_secret,
)


def add_fingerprint(commands: SubParsers) -> None:
    def run(args: argparse.Namespace, io: Io) -> int:
        secret = parse_fingerprint_secret("", str(args.secret_file or ""))
        keys = [line.strip() for line in sys.stdin if line.strip()]
        for key in keys:
            io.stdout.write(fingerprint(key, secret) + "\n")
        if not keys:
            io.error("no API key on stdin")
            return EXIT_FAILED
        return EXIT_OK

    command = commands.add_parser(
        "fingerprint",
        help="print the fingerprint of API keys read from stdin, for the key map",
        description="""Read API keys from stdin, one a line, and print each one's fingerprint as
        the meter computes it: the name of its [keys."<fingerprint>"] entry in meter_keymap, and
        its api_key_fingerprint in envelopes. Keys are never arguments: a command line is seen by
        every user of the host and kept in shell history.""",
    )
    command.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="the meter's meter_fingerprint_secret_file (without: the unkeyed SHA-256 scheme)",
    )
    command.set_defaults(run=run)
