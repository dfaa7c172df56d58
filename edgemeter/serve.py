"""The runners: the lean runner (`edgemeter serve`), mitmproxy's proxy core with only the addons a
metering reverse proxy needs plus the meter, the fastest (docs/PERFORMANCE.md); and mitmdump or
mitmweb with the meter added by import, as the container image runs them.

mitmdump loads about 40 addons and every one of them is asked about every event of every flow;
most of them (flow printing, replay, map/modify, save, ...) have nothing to do in front of an
LLM gateway. Options and flags are mitmdump's (`--mode reverse:URL`, `-p`, `--listen-host`,
`--set name=value`, `-s script`, config.yaml in the confdir); options of the addons left out
are unknown here and stop startup.
"""

# mypy: disallow-untyped-calls=False
# (mitmproxy's addons, addon manager and command-line helpers carry no annotations)
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    script,
    termlog,
    tlsconfig,
    update_alt_svc,
    upstream_auth,
)
from mitmproxy.tools import cmdline
from mitmproxy.tools import main as mitmproxy_main

from edgemeter import hookcache
from edgemeter.addon import Meter
from edgemeter.errors import MeterError

logger = logging.getLogger(__name__)

NO_METER = "--no-meter"
WORKERS_FLAG = "--workers"


def lean_addons() -> list[Any]:
    """The proxy core: what reverse-mode HTTP(S) proxying, mitmdump's safety defaults
    (block_global, h2c upgrades, Alt-Svc rewriting), upstream_auth and `-s` scripts need."""
    return [
        core.Core(),  # option checks and the `set` command
        block.Block(),  # block_global / block_private, as in mitmdump
        disable_h2c.DisableH2C(),  # mitmproxy cannot speak h2c: strip upgrade attempts
        proxyserver.Proxyserver(),  # listeners, connection handling, stream_large_bodies, limits
        next_layer.NextLayer(),  # picks the protocol layers of each connection
        tlsconfig.TlsConfig(),  # TLS to https:// upstreams and for https listeners
        upstream_auth.UpstreamAuth(),  # --set upstream_auth=user:pass in reverse mode
        update_alt_svc.UpdateAltSvc(),  # Alt-Svc must not send clients around the proxy
        script.ScriptLoader(),  # -s: extra addons (the benchmark's loop probe, for one)
        errorcheck.ErrorCheck(),  # like mitmdump: an ERROR during startup stops the process
    ]


class LeanMaster(master.Master):
    """A master with the lean addons and the meter (the class attribute decides)."""

    with_meter = True

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=False)
        # Swapped before any addon is added; the stock manager's options listener goes with it.
        self.options.changed.disconnect(self.addons._configure_all)
        self.addons = hookcache.HookCache(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon)
        self.addons.add(*lean_addons())
        if self.with_meter:
            self.addons.add(self.make_meter())

    def make_meter(self) -> Meter:
        return Meter()

    async def running(self) -> None:
        await super().running()
        if self.options.deferred:
            # mitmproxy keeps unknown --set options for addons that may declare them later; none
            # will here, and silently ignoring, say, modify_headers would surprise. Logged as an
            # ERROR during startup, this stops the process (errorcheck), as a bad value does.
            unknown = ", ".join(sorted(self.options.deferred))
            logger.error(f"unknown options (not declared by the lean runner's addons): {unknown}")
        hookcache.freeze()


class CoreMaster(LeanMaster):
    """The lean proxy core without the meter: the benchmark's baseline for the meter's cost."""

    with_meter = False


def make_parser(opts: options.Options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemeter serve",
        usage="%(prog)s [options]",
        description="The meter on mitmproxy's proxy core without mitmdump's other addons. "
        "Flags and --set options are mitmdump's; " + NO_METER + " runs the core alone.",
    )
    # Taken out of the arguments before they are parsed (main); here for --help.
    parser.add_argument(
        WORKERS_FLAG,
        metavar="N",
        type=int,
        default=1,
        help="serve with N worker processes (one core each) behind one listening socket, each "
        "with its own spool under meter_spool_dir, and one admin endpoint for the group "
        "(default 1: this process alone)",
    )
    # common_options skips the flags of options that no loaded addon declares.
    cmdline.common_options(parser, opts)
    return parser


# Flags that print something and exit: one process answers them, whatever --workers says.
_ANSWERED_ALONE = frozenset({"-h", "--help", "--version", "--options", "--commands"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; the meter's final drain runs in its `done` hook, as under
    mitmdump. Returns the exit code (startup errors exit 1 from inside mitmproxy). With
    `--workers N` (N > 1) this process supervises N workers instead (edgemeter.supervisor)."""
    args = list(sys.argv[1:] if argv is None else argv)
    from edgemeter.supervisor import take_workers

    try:
        workers, args = take_workers(args)
    except MeterError as e:
        raise SystemExit(f"edgemeter serve: {e}") from None
    if workers > 1 and not _ANSWERED_ALONE & set(args):
        if NO_METER in args:
            raise SystemExit(f"edgemeter serve: {NO_METER} runs the proxy core in one process")
        from edgemeter.supervisor import supervise

        return supervise(workers, args)
    master_cls: type[LeanMaster] = LeanMaster
    if NO_METER in args:
        args.remove(NO_METER)
        master_cls = CoreMaster
    mitmproxy_main.run(master_cls, make_parser, args)
    return 0


def metered[M: master.Master](master_cls: type[M]) -> type[M]:
    """`master_cls` with the meter where `-s addons/meter.py` would put it: right after the
    script loader, so before the addons mitmweb and mitmdump add after the default ones (the
    view that sends each flow to mitmweb's UI at its response hook must see the comment, mark
    and envelope the meter sets in the same hook)."""

    class Metered(master_cls):  # type: ignore[valid-type,misc]
        def __init__(self, opts: options.Options, *args: Any, **kwargs: Any) -> None:
            super().__init__(opts, *args, **kwargs)
            meter = Meter()
            self.addons.add(meter)
            chain = self.addons.chain
            loader = self.addons.get("scriptloader")
            if loader in chain:
                chain.remove(meter)
                chain.insert(chain.index(loader) + 1, meter)

    Metered.__name__ = Metered.__qualname__ = f"Metered{master_cls.__name__}"
    return Metered


def _dump_filters(args: argparse.Namespace) -> dict[str, str]:
    """mitmdump's own handling of trailing filter expressions (mitmproxy.tools.main.mitmdump)."""
    if not args.filter_args:
        return {}
    expression = " ".join(args.filter_args)
    return dict(save_stream_filter=expression, readfile_filter=expression, dumper_filter=expression)


def run_mitmproxy(tool: str, args: Sequence[str]) -> int:
    """mitmdump or mitmweb, with their flags, options and addons, plus the meter."""
    extra: Callable[[Any], dict[str, str]] | None = None
    if tool == "mitmweb":
        from mitmproxy.tools.web.master import WebMaster

        master_cls: type[master.Master] = metered(WebMaster)
        make_parser = cmdline.mitmweb
    else:
        from mitmproxy.tools.dump import DumpMaster

        master_cls, make_parser, extra = metered(DumpMaster), cmdline.mitmdump, _dump_filters
    mitmproxy_main.run(master_cls, make_parser, list(args), extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
