"""The `edgemeter` operator command: look into a meter's spool and broker, and repair from a shell.

One module per subcommand, registered in COMMANDS; exit codes: 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from edgemeter import __version__
from edgemeter.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_USAGE,
    Handler,
    Io,
    SubParsers,
)
from edgemeter.cli.dead import add_dead
from edgemeter.cli.drain import add_drain
from edgemeter.cli.fingerprint import add_fingerprint
from edgemeter.cli.gospool import add_go_spool
from edgemeter.cli.serve import add_serve
from edgemeter.cli.status import add_status
from edgemeter.cli.tail import add_tail
from edgemeter.errors import MeterError
from spool.errors import SpoolError

# Each adds one subcommand (group) to the parser; its handlers are set as `run` defaults.
COMMANDS: list[Callable[[SubParsers], None]] = [
    add_status,
    add_tail,
    add_drain,
    add_dead,
    add_fingerprint,
    add_serve,
    add_go_spool,
]


def version_text() -> str:
    """edgemeter's version, and the versions of what it runs on (for a bug report)."""
    parts = []
    for name in ("mitmproxy", "nats-py"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    parts.append(f"Python {sys.version.split()[0]}")
    return f"edgemeter {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemeter",
        description="Operator commands for edgemeter, the LLM usage meter.",
        epilog="""Exit codes: 0 done (status: healthy), 1 nothing matched, the operation
        failed or (status) something needs attention, 2 usage error; 130 after Ctrl-C, except
        for tail, which Ctrl-C ends with 0; 141 when the reader of a pipe went away. Each
        command's --help says more.""",
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    io = Io(sys.stdout, sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.run
        return handler(args, io)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (MeterError, SpoolError) as exc:
        io.error(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`edgemeter tail --json | head`): end quietly, as tools killed
        # by SIGPIPE do; stdout goes to /dev/null so the flush at exit does not complain.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        io.error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
