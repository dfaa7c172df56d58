"""`edgemeter serve`: the lean runner, everything after `serve` handed to it unchanged."""

from __future__ import annotations

import argparse

from edgemeter.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Io,
    SubParsers,
)


def add_serve(commands: SubParsers) -> None:
    def run(args: argparse.Namespace, io: Io) -> int:
        from edgemeter import serve  # mitmproxy: loaded only when it is needed

        try:
            return serve.main(args.args)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                io.say(exc.code)
                return EXIT_FAILED
            return EXIT_OK if exc.code is None else exc.code

    # No option of its own: everything after `serve` goes to the runner unchanged, `--help`
    # included ('-' is not an option prefix here, so argparse takes no flag for itself).
    command = commands.add_parser(
        "serve",
        prefix_chars="\0",
        add_help=False,
        help="run the meter on mitmproxy's proxy core (edgemeter serve --help)",
    )
    command.add_argument("args", nargs=argparse.REMAINDER)
    command.set_defaults(run=run)
