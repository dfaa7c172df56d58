"""The container image's entrypoint: turns EDGEMETER_* and MITMPROXY_* environment variables into
mitmproxy options, checks them, and execs the runner with the meter; and its health check.

Rule: a meter option `meter_<name>` is `EDGEMETER_<NAME>`; any mitmproxy option `<name>` of the
runner is `MITMPROXY_<NAME>`; EDGEMETER_UPSTREAM, EDGEMETER_LISTEN_HOST and EDGEMETER_LISTEN_PORT
set the reverse-proxy mode and the listener. Everything is derived from the meter's option table
and from mitmproxy's own option list at run time, so a new option gets its variable by itself.
The Go sidecar's variables (NATS_URL, NEWAPI_UPSTREAM_URL, ...) are read too (`from_go`), so its
Deployment runs the meter unchanged; an EDGEMETER_* variable set by the user wins over them.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from edgemeter.errors import ContainerError, SettingsError
from edgemeter.options import DEFAULTS, OPTIONS, VARIABLE_PREFIX, Option
from edgemeter.settings import parse_listen, parse_settings

METER_PREFIX = VARIABLE_PREFIX
PROXY_PREFIX = "MITMPROXY_"
RUNNER_VARIABLE = "EDGEMETER_RUNNER"
# `edgemeter serve --workers N`: N lean runners behind one port (EDGEMETER_RUNNER=serve only).
WORKERS_VARIABLE = "EDGEMETER_WORKERS"
ADMIN_VARIABLE = "EDGEMETER_ADMIN_LISTEN"
# mitmweb is the same proxy with a web UI to debug in; serve the lean runner (edgemeter.serve).
# Each gets the meter by import (edgemeter.serve), never from a script file.
RUNNERS = ("mitmdump", "mitmweb", "serve")
EXIT_USAGE = 2
# Carries the checked arguments from the entrypoint to the interpreter it execs (main()).
HANDOFF_VARIABLE = "_EDGEMETER_CONTAINER_ARGS"

# Values of these options are credentials: an error message never repeats them.
_SECRET_WORDS = ("password", "token", "passphrase", "secret", "auth")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable of the image and the mitmproxy option it sets."""

    variable: str
    option: str
    # mitmproxy's name of the option's type: str, int, bool, optional str, optional int,
    # sequence of str.
    kind: str
    default: Any
    # How the variable's value becomes the option's (EDGEMETER_UPSTREAM: "reverse:{}").
    template: str = "{}"
    meter: bool = False
    choices: tuple[str, ...] = ()

    @property
    def secret(self) -> bool:
        return any(word in self.option for word in _SECRET_WORDS)


@dataclass(frozen=True, slots=True)
class ProxyOption:
    """One of the runner's own mitmproxy options."""

    kind: str
    default: Any
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """What the entrypoint runs: the runner's arguments, and what it says about the environment."""

    args: list[str]
    # Variables taken from the environment, by name only: values may be credentials.
    given: list[str]
    # Variables under the image's prefixes that set nothing (typos, Kubernetes service links).
    ignored: list[str]
    # The Go sidecar's variables read, and those left unused because an EDGEMETER_* one is set.
    go: GoVariables = field(default_factory=lambda: GoVariables({}))


# --- the Go sidecar's variables ---------------------------------------------------------------

# What the image's Dockerfile sets (ENV): a Go variable replaces these, since they are defaults
# rather than the user's choice; tests/test_container.py keeps the two in step.
IMAGE_DEFAULTS: dict[str, str] = {
    "EDGEMETER_SPOOL_DIR": "/var/lib/edgemeter/spool",
    "MITMPROXY_CONFDIR": "/var/lib/edgemeter/mitmproxy",
    "EDGEMETER_LISTEN_PORT": "8086",
    "EDGEMETER_ADMIN_LISTEN": "0.0.0.0:9464",
}
# The Go sidecar's SPOOL_DIR is the one volume its chart mounts writable: it holds the meter's
# spool and mitmproxy's confdir as the image's volume does (spool/, mitmproxy/), directories the
# meter makes and may chmod (the volume's root may not be its own), apart from the Go sidecar's
# own <request_id>.json files.
GO_SPOOL_SUBDIR = "spool"
GO_CONFDIR_SUBDIR = "mitmproxy"

_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
# Exact decimal arithmetic: 0.3s is 300 ms, not the 301 a float would round up to.
_GO_UNIT_MS = {
    "ns": Decimal("0.000001"),
    "us": Decimal("0.001"),
    "µs": Decimal("0.001"),
    "μs": Decimal("0.001"),
    "ms": Decimal(1),
    "s": Decimal(1000),
    "m": Decimal(60_000),
    "h": Decimal(3_600_000),
}


def go_duration_ms(text: str) -> int:
    """A Go time.ParseDuration string ("5s", "1m30s", "1.5s", "750ms") in whole milliseconds,
    rounded up so a positive duration never becomes 0; ValueError for anything else."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    rest = text.lstrip("+-")
    if rest == "0":
        return 0
    total, at = Decimal(0), 0
    while at < len(rest):
        m = _GO_DURATION.match(rest, at)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"not a Go duration: {text!r}")
        total += Decimal(m.group(1)) * _GO_UNIT_MS[m.group(2)]
        at = m.end()
    if not rest:
        raise ValueError(f"not a Go duration: {text!r}")
    return sign * int(total.to_integral_value(rounding=ROUND_CEILING))


def _go_timeout(text: str) -> str:
    try:
        return str(go_duration_ms(text))
    except ValueError:
        raise ContainerError(
            'not a Go duration (e.g. "5s", "1500ms")', variable="NATS_PUBLISH_TIMEOUT", value=text
        ) from None


def _same(text: str) -> str:
    return text


# Every variable the Go sidecar's main.go reads, and what it becomes: (image variable, value).
GO_VARIABLES: dict[str, tuple[tuple[str, Callable[[str], str]], ...]] = {
    "NATS_URL": (("EDGEMETER_NATS_URL", _same),),
    "NEWAPI_UPSTREAM_URL": (("EDGEMETER_UPSTREAM", _same),),
    "LISTEN_PORT": (("EDGEMETER_LISTEN_PORT", _same),),
    "SPOOL_DIR": (
        ("EDGEMETER_SPOOL_DIR", lambda d: str(Path(d) / GO_SPOOL_SUBDIR)),
        ("MITMPROXY_CONFDIR", lambda d: str(Path(d) / GO_CONFDIR_SUBDIR)),
    ),
    "PRICE_MICRO_OMR_PER_TOKEN": (("EDGEMETER_PRICE_MICRO_PER_TOKEN", _same),),
    "NATS_PUBLISH_TIMEOUT": (("EDGEMETER_PUBLISH_TIMEOUT_MS", _go_timeout),),
    "TENANT_ID_HEADER": (("EDGEMETER_TENANT_HEADER", _same),),
    "CUSTOMER_ID_HEADER": (("EDGEMETER_CUSTOMER_HEADER", _same),),
}


@dataclass(frozen=True, slots=True)
class GoVariables:
    """The environment with the Go sidecar's variables turned into the image's own."""

    env: Mapping[str, str]
    # image variable → the Go variable its value came from (errors name the Go one).
    source: Mapping[str, str] = field(default_factory=dict)
    # Go variables not used: an EDGEMETER_* (or MITMPROXY_*) one the user set says otherwise.
    overridden: Mapping[str, str] = field(default_factory=dict)

    @property
    def used(self) -> list[str]:
        return sorted(set(self.source.values()))


def from_go(
    env: Mapping[str, str], image_defaults: Mapping[str, str] = IMAGE_DEFAULTS
) -> GoVariables:
    """`env` with every Go sidecar variable that is set (not empty: main.go's getEnv takes an
    empty one for unset) as the image variable it stands for, unless the user set that one:
    a value other than the image's default wins over the Go variable."""
    out, source, overridden = dict(env), {}, {}
    for go, targets in GO_VARIABLES.items():
        text = env.get(go, "")
        if not text:
            continue
        for variable, convert in targets:
            mine = env.get(variable)
            if mine is not None and mine != image_defaults.get(variable):
                overridden[go] = variable
                continue
            out[variable] = convert(text)
            source[variable] = go
    return GoVariables(out, source, overridden)


def go_spool_leftovers(directory: str) -> int:
    """Envelopes the Go sidecar left in its spool directory (`<request_id>.json`), which it
    publishes itself and the meter never reads (docs/MIGRATION.md)."""
    try:
        return sum(1 for entry in os.scandir(directory) if entry.name.endswith(".json"))
    except OSError:
        return 0


# The listener and the mode: what every deployment sets, so they get short names of their own.
_PROXY_SETTINGS = (
    ("EDGEMETER_UPSTREAM", "mode", "reverse:{}"),
    ("EDGEMETER_LISTEN_HOST", "listen_host", "{}"),
    ("EDGEMETER_LISTEN_PORT", "listen_port", "{}"),
)


def proxy_variable(option: str) -> str:
    """`confdir` → `MITMPROXY_CONFDIR`."""
    return PROXY_PREFIX + option.upper()


def kind_of(typespec: Any) -> str:
    from mitmproxy.utils import typecheck

    return str(typecheck.typespec_to_str(typespec))


def settings_table(
    meter_options: Iterable[Option], proxy_options: Mapping[str, ProxyOption]
) -> dict[str, Setting]:
    """Every variable the image reads, from the meter's OPTIONS and the runner's own options
    (`proxy_options`)."""
    table: dict[str, Setting] = {}

    def add(setting: Setting) -> None:
        if setting.variable in table or setting.variable in (RUNNER_VARIABLE, WORKERS_VARIABLE):
            raise ContainerError("two settings share a variable", variable=setting.variable)
        table[setting.variable] = setting

    for meter in meter_options:
        add(Setting(meter.variable, meter.name, kind_of(meter.type), meter.default, meter=True))
    for variable, option, template in _PROXY_SETTINGS:
        own = proxy_options.get(option, ProxyOption("str", ""))
        add(Setting(variable, option, own.kind, own.default, template, choices=own.choices))
    for option, own in sorted(proxy_options.items()):
        # MITMPROXY_SCRIPTS adds addons beside the meter (see plan()).
        add(Setting(proxy_variable(option), option, own.kind, own.default, choices=own.choices))
    return table


def parse_runner(env: Mapping[str, str]) -> str:
    runner = env.get(RUNNER_VARIABLE, "") or RUNNERS[0]
    if runner not in RUNNERS:
        raise ContainerError(
            f"must be one of {', '.join(RUNNERS)}", variable=RUNNER_VARIABLE, value=runner
        )
    return runner


def parse_workers(env: Mapping[str, str], runner: str) -> list[str]:
    """The runner's arguments for EDGEMETER_WORKERS: `--workers N` for more than one."""
    text = env.get(WORKERS_VARIABLE, "").strip()
    if not text:
        return []
    if not text.isdigit() or int(text) < 1:
        raise ContainerError("not a positive integer", variable=WORKERS_VARIABLE, value=text)
    if int(text) == 1:
        return []
    if runner != "serve":
        raise ContainerError(
            f"workers run the lean runner only: set {RUNNER_VARIABLE}=serve",
            variable=WORKERS_VARIABLE,
            value=text,
        )
    return ["--workers", str(int(text))]


def proxy_options(runner: str) -> dict[str, ProxyOption]:
    """name → (kind, default, choices) of every option the runner has, read from its master
    (built with its addons but never run and no option set, so nothing is written anywhere)."""
    from mitmproxy import ctx, options, optmanager

    # Building a master points mitmproxy's global context at it: what was there is put back.
    saved = {
        name: getattr(ctx, name) for name in ("master", "options", "log") if hasattr(ctx, name)
    }

    async def read() -> dict[str, ProxyOption]:
        master: Any
        if runner == "mitmweb":
            from mitmproxy.tools.web.master import WebMaster

            master = WebMaster(options.Options())
        elif runner == "serve":
            from edgemeter.serve import CoreMaster

            # The lean runner without the meter: the meter's options come from OPTIONS.
            master = CoreMaster(options.Options())
        else:
            from mitmproxy.tools.dump import DumpMaster

            master = DumpMaster(options.Options())
        dumped = optmanager.dump_dicts(master.options)
        return {
            name: ProxyOption(spec["type"], spec["default"], tuple(spec["choices"] or ()))
            for name, spec in dumped.items()
        }

    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return asyncio.run(read())
    finally:
        # A master and its addons install log handlers that forward to its event loop, which is
        # closed now: left in place, the next log line of this process would fail.
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for name, value in saved.items():
            setattr(ctx, name, value)


def parse_value(setting: Setting, text: str) -> list[str | None]:
    """The option values a variable's text stands for, as mitmproxy's `--set` takes them (None:
    `--set name` alone, which unsets an optional option). A sequence takes one item a line."""
    kind = setting.kind
    if kind == "sequence of str":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [setting.template.format(line) for line in lines] or [None]
    if kind.startswith("optional ") and not text.strip():
        return [None]
    if kind.endswith("int"):
        try:
            return [str(int(text.strip()))]
        except ValueError:
            raise ContainerError("not an integer", variable=setting.variable) from None
    if kind == "bool":
        word = text.strip().lower()
        if word in _TRUE | _FALSE:
            return ["true" if word in _TRUE else "false"]
        raise ContainerError("expected true or false", variable=setting.variable)
    if setting.choices and text not in setting.choices:
        raise ContainerError(
            f"must be one of {', '.join(setting.choices)}", variable=setting.variable
        )
    return [setting.template.format(text)]


def _shown(setting: Setting, text: str) -> str:
    return "<hidden>" if setting.secret else text


def _typed(setting: Setting, value: str | None) -> Any:
    """An option value as the addon sees it, for the meter's own checks."""
    if setting.kind == "int" and value is not None:
        return int(value)
    if setting.kind == "bool":
        return value == "true"
    return value


def _check_mode(setting: Setting, value: str | None, text: str) -> None:
    from mitmproxy.proxy.mode_specs import ProxyMode

    try:
        ProxyMode.parse(value or "")
    except ValueError as e:
        raise ContainerError(
            f"not a proxy mode ({e})", variable=setting.variable, value=_shown(setting, text)
        ) from None


def _set_names(args: Sequence[str]) -> set[str]:
    """Option names a command line sets: `--set name=value`, `--set=name=value`, `--mode`."""
    names = set()
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            names.add(args[i + 1].split("=", 1)[0])
        elif arg.startswith("--set="):
            names.add(arg.removeprefix("--set=").split("=", 1)[0])
        elif arg in ("-m", "--mode") or arg.startswith("--mode="):
            names.add("mode")
    return names


def plan(
    env: Mapping[str, str],
    table: Mapping[str, Setting],
    extra: Sequence[str] = (),
) -> Plan:
    """The runner's arguments for this environment (the runner adds the meter itself): one
    `--set` per option given, then `extra` (the container's command). The Go sidecar's
    variables count as the image's own (`from_go`). Raises ContainerError naming the variable
    (the Go one where the value came from it)."""
    go = from_go(env)
    try:
        return _plan(go, table, extra)
    except ContainerError as e:
        variable = str(e.fields.get("variable", ""))
        if variable not in go.source:
            raise
        fields = dict(e.fields) | {"variable": f"{go.source[variable]} (as {variable})"}
        raise ContainerError(e.message, **fields) from None


def _plan(go: GoVariables, table: Mapping[str, Setting], extra: Sequence[str]) -> Plan:
    env = go.env
    given = {name: env[name] for name in sorted(env) if name in table}
    by_option: dict[str, list[str]] = {}
    for name in given:
        by_option.setdefault(table[name].option, []).append(name)
    for option, names in by_option.items():
        if len(names) > 1:
            raise ContainerError(
                f"{option} is set by more than one variable", variable=" and ".join(names)
            )
    on_command_line = _set_names(extra)
    if "mode" not in by_option and "mode" not in on_command_line:
        raise ContainerError(
            "not set: the URL of the gateway to meter, e.g. http://127.0.0.1:3000",
            variable="EDGEMETER_UPSTREAM",
        )
    args: list[str] = []
    meter_values: dict[str, Any] = {}
    for name, text in given.items():
        setting = table[name]
        try:
            values = parse_value(setting, text)
        except ContainerError as e:
            raise ContainerError(e.message, variable=name, value=_shown(setting, text)) from None
        if setting.option == "mode":
            for value in values:
                _check_mode(setting, value, text)
        if setting.option in on_command_line:
            raise ContainerError(
                "also set on the command line: give each option once", variable=name
            )
        if setting.option == "scripts":
            # More addons next to the meter: -s adds, where --set scripts= would replace it.
            args += [arg for value in values if value for arg in ("-s", value)]
            continue
        if setting.meter:
            meter_values[setting.option] = _typed(setting, values[0])
        args += [
            arg
            for value in values
            for arg in ("--set", setting.option if value is None else f"{setting.option}={value}")
        ]
    _check_meter(meter_values, table)
    ignored = [
        name
        for name in sorted(env)
        if name.startswith((METER_PREFIX, PROXY_PREFIX))
        and name not in table
        and name not in (RUNNER_VARIABLE, WORKERS_VARIABLE)
    ]
    return Plan(args + list(extra), list(given), ignored, go)


def _check_meter(values: Mapping[str, Any], table: Mapping[str, Setting]) -> None:
    """The addon's own checks (parse_settings), so a bad value stops here, named by variable."""
    meter = {s.option: s for s in table.values() if s.meter}
    try:
        parse_settings({option: s.default for option, s in meter.items()} | dict(values))
    except SettingsError as e:
        option = str(e.fields.get("option", ""))
        setting = meter.get(option)
        if setting is None:
            raise ContainerError(e.message, option=option) from None
        shown = _shown(setting, str(e.fields.get("value", "")))
        raise ContainerError(e.message, variable=setting.variable, value=shown) from None


def suggestion(name: str, table: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(table), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def env_table(meter_options: Iterable[Option]) -> str:
    """The documented mapping (docs/CONTAINER.md): Markdown, one row per variable."""
    rows = ["| variable | option | type | default |", "|---|---|---|---|"]
    for variable, option, template in _PROXY_SETTINGS:
        rows.append(f"| `{variable}` | `{option}` (`{template.format('VALUE')}`) | | |")
    rows.append(
        f"| `{WORKERS_VARIABLE}` | `edgemeter serve --workers` (`serve` runner) | int | `1` |"
    )
    for meter in meter_options:
        shown = f"`{meter.default}`" if meter.default != "" else '`""`'
        rows.append(f"| `{meter.variable}` | `{meter.name}` | {kind_of(meter.type)} | {shown} |")
    return "\n".join(rows)


def describe(e: ContainerError) -> str:
    variable, value = e.fields.get("variable"), e.fields.get("value")
    if variable is None:
        return str(e)
    return f"{variable}={value!r}: {e.message}" if value is not None else f"{variable}: {e.message}"


def _say(message: str) -> None:
    print(f"edgemeter-container: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The image's ENTRYPOINT: checks the environment, then execs a fresh interpreter that runs
    mitmproxy's own main (see `_run_handed_off`), so PID 1 is mitmdump and SIGTERM reaches its
    handler; exit code 2, before anything starts, for a variable that cannot be used."""
    if (handoff := os.environ.pop(HANDOFF_VARIABLE, None)) is not None:
        return _run_handed_off(handoff)
    extra = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if extra == ["--env-table"]:
        print(env_table(OPTIONS))
        return 0
    try:
        runner = parse_runner(env)
        workers = parse_workers(env, runner)
        table = settings_table(OPTIONS, proxy_options(runner))
        run = plan(env, table, extra)
    except ContainerError as e:
        _say(describe(e))
        return EXIT_USAGE
    for name in run.ignored:
        _say(f"warning: {name} is not a setting and is ignored{suggestion(name, table)}")
    for go, variable in sorted(run.go.overridden.items()):
        _say(f"warning: {go} (the Go sidecar's) is ignored: {variable} is set")
    if run.go.used:
        taken = ", ".join(f"{go} as {v}" for v, go in sorted(run.go.source.items()))
        _say(f"the Go sidecar's variables are read: {taken}")
    if (spool_dir := env.get("SPOOL_DIR")) and (left := go_spool_leftovers(spool_dir)):
        _say(
            f"warning: SPOOL_DIR {spool_dir} holds {left} envelopes the Go sidecar spooled and "
            "never published; the meter does not read them: publish them (docs/MIGRATION.md)"
        )
    group = f" ({workers[1]} workers)" if workers else ""
    given = ", ".join(run.given) or "nothing"
    _say(f"{runner}{group} with the meter, set from the environment: {given}")
    sys.stdout.flush()
    # The arguments travel in the environment, not on the command line: /proc/<pid>/cmdline is
    # readable by every process that can see this one, the environment only by its own user,
    # and it holds the same credentials already. The new interpreter starts clean of the
    # masters the checks built.
    os.execve(
        sys.executable,
        [sys.executable, "-m", "edgemeter.container"],
        dict(env) | {HANDOFF_VARIABLE: json.dumps([runner, *workers, *run.args])},
    )


def _run_handed_off(handoff: str) -> int:
    from edgemeter import serve

    runner, *args = json.loads(handoff)
    if runner == "serve":
        return serve.main(args)
    return serve.run_mitmproxy(runner, args)


def healthcheck(env: Mapping[str, str] | None = None, timeout: float = 5.0) -> int:
    """The image's HEALTHCHECK: GET /healthz of the admin endpoint; 0 healthy, 1 not."""
    env = os.environ if env is None else env
    listen = env.get(ADMIN_VARIABLE)
    if listen is None:
        listen = str(DEFAULTS["meter_admin_listen"])
    try:
        parsed = parse_listen(listen, ADMIN_VARIABLE)
    except SettingsError as e:
        print(f"unhealthy: {ADMIN_VARIABLE}={listen!r}: {e.message}", file=sys.stderr)
        return 1
    if parsed is None:
        print("admin endpoint disabled: nothing to check")
        return 0
    host, port = parsed
    # A wildcard listener is reached on loopback, from inside the container.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


def healthcheck_main() -> int:
    return healthcheck()


if __name__ == "__main__":
    sys.exit(main())
