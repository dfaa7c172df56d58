"""The broker options shared by status, tail and drain (each flag defaults to the meter's own
EDGEMETER_* variable, then to the meter's default) and a connection that gives up in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from nats.aio.client import Client as NATS

from edgemeter.cli.common import (
    seconds,
)
from edgemeter.errors import BrokerError, SettingsError
from edgemeter.options import DEFAULTS, variable_of
from edgemeter.settings import (
    parse_file,
    parse_nats_urls,
    parse_subject,
)
from spool.errors import describe
from spool.publisher import NatsConfig, auth_options, new_client, redact_url

log = logging.getLogger(__name__)


# The meter's own defaults, from its option table.
DEFAULT_NATS_URL: Final[str] = DEFAULTS["meter_nats_url"]
DEFAULT_SUBJECT: Final[str] = DEFAULTS["meter_subject"]
DEFAULT_UNBILLABLE_SUBJECT: Final[str] = DEFAULTS["meter_unbillable_subject"]
DEFAULT_PUBLISH_TIMEOUT_MS: Final[int] = DEFAULTS["meter_publish_timeout_ms"]
DEFAULT_CONNECT_TIMEOUT_S: Final = 3.0


def nats_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "broker",
        """Each flag defaults to the meter's own environment variable (EDGEMETER_NATS_URL for
        meter_nats_url, and so on), then to the meter's default. Secrets come from files or the
        environment, never from the command line, and are never printed.""",
    )

    def add(flag: str, option: str, metavar: str, what: str) -> None:
        # `what` names the variable as {var}: the help says where a value comes from.
        group.add_argument(flag, metavar=metavar, help=what.format(var=variable_of(option)))

    add(
        "--nats-url",
        "meter_nats_url",
        "URLS",
        f"server URLs, comma-separated ({{var}}; {DEFAULT_NATS_URL})",
    )
    add(
        "--subject", "meter_subject", "SUBJECT", f"the meter's subject ({{var}}; {DEFAULT_SUBJECT})"
    )
    add(
        "--nats-creds",
        "meter_nats_creds",
        "FILE",
        "credentials file: user JWT and nkey seed ({var})",
    )
    add(
        "--nats-token-file",
        "meter_nats_token",
        "FILE",
        "file holding the token (else the token in {var})",
    )
    add("--nats-user", "meter_nats_user", "USER", "user name ({var})")
    add(
        "--nats-password-file",
        "meter_nats_password",
        "FILE",
        "file holding the user's password (else {var})",
    )
    add("--nats-tls-ca", "meter_nats_tls_ca", "FILE", "PEM CA of the broker's certificate ({var})")
    add("--nats-tls-cert", "meter_nats_tls_cert", "FILE", "PEM client certificate ({var})")
    add("--nats-tls-key", "meter_nats_tls_key", "FILE", "PEM key of the client certificate ({var})")
    group.add_argument(
        "--connect-timeout",
        type=seconds,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        metavar="S",
        help=f"how long to try to reach the broker (default: {DEFAULT_CONNECT_TIMEOUT_S:g})",
    )
    return parent


def nats_config(args: argparse.Namespace, env: Mapping[str, str]) -> NatsConfig:
    """The broker settings: a flag, else the meter's EDGEMETER_* variable, else the meter's
    default. Raises SettingsError naming the flag or variable a bad value came from."""

    def pick(flag: str, option: str, default: str = "") -> tuple[str, str]:
        given = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if given is not None:
            return str(given), flag
        variable = variable_of(option)
        if variable in env:
            return env[variable], variable
        return default, option

    def secret(flag: str, option: str) -> str:
        path = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if path is None:
            return env.get(variable_of(option), "")
        return read_secret_file(parse_file(path, flag), flag)

    timeout_text, timeout_source = str(DEFAULT_PUBLISH_TIMEOUT_MS), "meter_publish_timeout_ms"
    if hasattr(args, "publish_timeout_ms"):  # only drain publishes
        timeout_text, timeout_source = pick(
            "--publish-timeout-ms", "meter_publish_timeout_ms", timeout_text
        )
    try:
        timeout_ms = int(timeout_text)
    except ValueError:
        raise SettingsError("not an integer", option=timeout_source, value=timeout_text) from None
    if timeout_ms <= 0:
        raise SettingsError("must be positive", option=timeout_source, value=timeout_ms)
    return NatsConfig(
        servers=parse_nats_urls(*pick("--nats-url", "meter_nats_url", DEFAULT_NATS_URL)),
        subject=parse_subject(*pick("--subject", "meter_subject", DEFAULT_SUBJECT)),
        publish_timeout_ms=timeout_ms,
        creds_file=parse_file(*pick("--nats-creds", "meter_nats_creds")),
        token=secret("--nats-token-file", "meter_nats_token"),
        user=pick("--nats-user", "meter_nats_user")[0],
        password=secret("--nats-password-file", "meter_nats_password"),
        tls_ca_file=parse_file(*pick("--nats-tls-ca", "meter_nats_tls_ca")),
        tls_cert_file=parse_file(*pick("--nats-tls-cert", "meter_nats_tls_cert")),
        tls_key_file=parse_file(*pick("--nats-tls-key", "meter_nats_tls_key")),
        name="edgemeter-cli",
    )


def add_unbillable_subject(parser: argparse.ArgumentParser) -> None:
    """--unbillable-subject, for the commands that look at the reconciliation subject."""
    variable = variable_of("meter_unbillable_subject")
    parser.add_argument(
        "--unbillable-subject",
        metavar="SUBJECT",
        help=f"the meter's subject of unbillable envelopes ({variable}; "
        f"{DEFAULT_UNBILLABLE_SUBJECT})",
    )


def unbillable_subject(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """--unbillable-subject, else EDGEMETER_UNBILLABLE_SUBJECT, else the meter's default."""
    env = os.environ if env is None else env
    given = getattr(args, "unbillable_subject", None)
    value, source = given, "--unbillable-subject"
    if value is None:
        source = variable_of("meter_unbillable_subject")
        value = env.get(source, DEFAULT_UNBILLABLE_SUBJECT)
    try:
        return parse_subject(value, source)
    except SettingsError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))  # exits 2


def read_secret_file(path: str, flag: str) -> str:
    """A token or password kept in a file, one trailing newline stripped; errors never carry it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read: {exc}", option=flag, value=path) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SettingsError("the file is empty", option=flag, value=path)
    return text


def broker_config(args: argparse.Namespace) -> NatsConfig:
    try:
        return nats_config(args, os.environ)
    except SettingsError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))  # exits 2


async def connect(config: NatsConfig, timeout: float) -> NATS:
    """A client connected to one of the servers; once connected, nats-py reconnects by itself.
    Raises BrokerError with the last reason a server gave, as soon as each server has refused
    once, or when `timeout` runs out."""
    options = auth_options(config)  # checks a creds file: nats-py spins on one without a JWT
    nc = new_client(config)  # the meter's client: TLS is never skipped
    reasons: list[str] = []
    refused = asyncio.Event()

    async def error_cb(exc: Exception) -> None:
        # nats-py's default callback logs ERROR with a traceback on every failed attempt.
        if not nc.is_connected:
            reasons.append(describe(exc))
            if len(reasons) >= len(config.servers):
                refused.set()
        else:
            log.warning("NATS: %s", describe(exc))

    kwargs: dict[str, Any] = {
        "name": config.name,
        "allow_reconnect": True,
        # Attempts go on until our timeout: a finite count would sleep between rounds anyway.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": max(min(timeout, 2.0), 0.1),
        "error_cb": error_cb,
        **options,
    }
    connecting = asyncio.ensure_future(nc.connect(list(config.servers), **kwargs))
    giving_up = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait((connecting, giving_up), timeout=timeout, return_when=FIRST_COMPLETED)
    finally:
        giving_up.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])  # the connect unwinds before its client is closed
    try:
        if connecting.cancelled():
            raise TimeoutError
        connecting.result()
    except Exception as exc:  # the timeout, a refusal, or what nats-py gave up with
        with contextlib.suppress(Exception):
            await nc.close()
        reason = reasons[-1] if reasons else describe(exc)
        if isinstance(exc, TimeoutError) and not reasons:
            reason = f"no answer within {timeout:g}s"
        servers = ", ".join(redact_url(s) for s in config.servers)
        raise BrokerError(f"cannot connect to NATS at {servers}: {reason}") from None
    return nc
