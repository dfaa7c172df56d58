"""Typed settings of the meter, parsed from mitmproxy option values by pure `parse_*` functions.

Each parser raises `SettingsError` naming the option and the value, so a bad value stops startup.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from edgemeter.errors import SettingsError
from edgemeter.metering.attribution import MAX_ID_CHARS
from edgemeter.metering.attribution import Mode as AttributionMode
from edgemeter.metering.attribution import Spec as AttributionSpec
from edgemeter.metering.contract import House
from edgemeter.metering.prices import CURRENCY
from edgemeter.metering.usage import CountRule, clean_name
from spool.publisher import NatsConfig, redact_url

StreamUsageMode = Literal["inject-strip", "inject", "off"]
STREAM_USAGE_MODES: tuple[StreamUsageMode, ...] = ("inject-strip", "inject", "off")
SpoolSync = Literal["normal", "full"]
SPOOL_SYNCS: tuple[SpoolSync, ...] = ("normal", "full")
SpoolFullPolicy = Literal["serve", "reject"]
SPOOL_FULL_POLICIES: tuple[SpoolFullPolicy, ...] = ("serve", "reject")
ATTRIBUTION_MODES: tuple[AttributionMode, ...] = ("headers", "keymap")

_NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
# RFC 9110 token characters: what a header name may contain.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SUBJECT_TOKEN = re.compile(r"^[^\s*>.]+$")


@dataclass(frozen=True, slots=True)
class Settings:
    nats_servers: tuple[str, ...]
    nats_creds: str
    # Secrets are kept out of repr: a Settings printed in a log or a traceback carries none.
    nats_token: str = field(repr=False)
    nats_user: str
    nats_password: str = field(repr=False)
    nats_tls_ca: str
    nats_tls_cert: str
    nats_tls_key: str
    subject: str
    spool_dir: Path
    spool_sync: SpoolSync
    spool_max_bytes: int | None
    on_spool_full: SpoolFullPolicy
    paths: tuple[str, ...]
    price_micro_per_token: int
    prices_file: str
    currency: str
    tenant_header: str
    customer_header: str
    stream_usage: StreamUsageMode
    publish_timeout_ms: int
    shutdown_drain_ms: int
    shutdown_grace_ms: int
    admin_listen: tuple[str, int] | None
    ready_broker_down_s: int
    ready_spool_age_s: int
    anthropic_counts: tuple[CountRule, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    max_event_bytes: int = 1024 * 1024
    websocket_keep: int = 100
    attribution: AttributionMode = "headers"
    keymap_file: str = ""
    fingerprint_secret: bytes = field(default=b"", repr=False)
    tune_mitmproxy: bool = True
    publish_linger_ms: int = 250
    metrics_max_models: int = 100
    unbillable_subject: str = "catalyst.usage.unbillable"
    house: House | None = None
    cloudevents: bool = False

    @property
    def attribution_spec(self) -> AttributionSpec:
        return AttributionSpec(
            self.attribution, self.tenant_header, self.customer_header, self.fingerprint_secret
        )


def default_spool_dir(env: Mapping[str, str] | None = None) -> Path:
    """The platform data dir: $EDGEMETER_SPOOL_DIR, else $XDG_DATA_HOME/edgemeter/spool."""
    env = os.environ if env is None else env
    if explicit := env.get("EDGEMETER_SPOOL_DIR"):
        return Path(explicit)
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgemeter" / "spool"


def parse_nats_urls(value: str, option: str = "meter_nats_url") -> tuple[str, ...]:
    urls = tuple(u.strip() for u in value.split(",") if u.strip())
    if not urls:
        raise SettingsError("no NATS server URL given", option=option, value=value)
    for url in urls:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
        except ValueError:
            # What stands where the port should be may be a password whose '@' was forgotten.
            shown = redact_url(url).rsplit(":", 1)[0] + ":***"
            raise SettingsError("bad port in NATS URL", option=option, value=shown) from None
        if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
            raise SettingsError(
                "not a NATS URL (expected nats://host:port)",
                option=option,
                value=redact_url(url),
            )
    return urls


def parse_subject(value: str, option: str = "meter_subject") -> str:
    tokens = value.split(".")
    if not value or not all(_SUBJECT_TOKEN.match(t) for t in tokens):
        raise SettingsError(
            "not a publishable NATS subject (no spaces or wildcards)", option=option, value=value
        )
    return value


def parse_unbillable_subject(
    value: str, subject: str, option: str = "meter_unbillable_subject"
) -> str:
    """Another subject than the billing one: on that one the consumer would skip them again."""
    parse_subject(value, option)
    if value == subject:
        raise SettingsError("must differ from meter_subject", option=option, value=value)
    return value


def parse_house(customer: str, tenant: str) -> House | None:
    """The house account, or None: both ids or neither, each one an id fit for an envelope."""
    if not customer and not tenant:
        return None
    for option, value in (("meter_house_customer", customer), ("meter_house_tenant", tenant)):
        if not value:
            raise SettingsError(
                "set meter_house_customer and meter_house_tenant together", option=option
            )
        if clean_name(value, MAX_ID_CHARS) != value:
            raise SettingsError(
                f"not an id (printable, at most {MAX_ID_CHARS} characters, no surrounding spaces)",
                option=option,
                value=value,
            )
    return House(customer, tenant)


def parse_paths(value: str, option: str = "meter_paths") -> tuple[str, ...]:
    paths = tuple(p.strip() for p in value.split(",") if p.strip())
    if not paths:
        raise SettingsError("no path prefix given", option=option, value=value)
    for p in paths:
        if not p.startswith("/"):
            raise SettingsError("path prefix must start with '/'", option=option, value=p)
    return paths


def parse_non_negative(value: int, option: str) -> int:
    if value < 0:
        raise SettingsError("must not be negative", option=option, value=value)
    return value


def parse_positive(value: int, option: str) -> int:
    if value <= 0:
        raise SettingsError("must be positive", option=option, value=value)
    return value


def parse_currency(value: str, option: str = "meter_currency") -> str:
    if not CURRENCY.match(value):
        raise SettingsError(
            "currency must be an ISO 4217 code (three capitals)", option=option, value=value
        )
    return value


def parse_header_name(value: str, option: str) -> str:
    if not _HEADER_NAME.match(value):
        raise SettingsError("not a valid HTTP header name", option=option, value=value)
    return value.lower()


def parse_choice[C: str](value: str, choices: tuple[C, ...], option: str) -> C:
    """`value` if it is one of `choices` (typed as the choice it is)."""
    for choice in choices:
        if value == choice:
            return choice
    listed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    raise SettingsError(f"must be {listed}", option=option, value=value)


def parse_stream_usage(value: str, option: str = "meter_stream_usage") -> StreamUsageMode:
    return parse_choice(value, STREAM_USAGE_MODES, option)


def parse_spool_sync(value: str, option: str = "meter_spool_sync") -> SpoolSync:
    return parse_choice(value, SPOOL_SYNCS, option)


def parse_spool_max_mb(value: int, option: str = "meter_spool_max_mb") -> int | None:
    """Megabytes (MiB) of envelopes the spool may hold; 0 means no limit."""
    if value < 0:
        raise SettingsError("must not be negative (0: no limit)", option=option, value=value)
    return value * 1024 * 1024 if value else None


def parse_on_spool_full(value: str, option: str = "meter_on_spool_full") -> SpoolFullPolicy:
    return parse_choice(value, SPOOL_FULL_POLICIES, option)


def parse_listen(value: str, option: str = "meter_admin_listen") -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError("expected host:port (empty disables)", option=option, value=value)
    return host, int(port_text)


def parse_spool_dir(value: str, option: str = "meter_spool_dir") -> Path:
    if not value:
        return default_spool_dir()
    if "\0" in value:
        raise SettingsError("not a path", option=option, value=value)
    return Path(value).expanduser()


def parse_file(value: str, option: str) -> str:
    """An optional file path: empty means unset; a set one must exist and be readable now."""
    if not value:
        return ""
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise SettingsError("file not found or not readable", option=option, value=value)
    return str(path)


def parse_attribution(value: str, option: str = "meter_attribution") -> AttributionMode:
    return parse_choice(value, ATTRIBUTION_MODES, option)


def parse_keymap_file(value: str, mode: AttributionMode, option: str = "meter_keymap") -> str:
    """The key map is required in keymap mode, and refused in headers mode, where it would be
    silently ignored while the operator believes attribution is protected."""
    if mode == "keymap" and not value:
        raise SettingsError("required when meter_attribution=keymap", option=option, value=value)
    if mode == "headers" and value:
        raise SettingsError(
            "ignored unless meter_attribution=keymap (set it, or leave meter_keymap empty)",
            option=option,
            value=value,
        )
    return parse_file(value, option)


def parse_fingerprint_secret(value: str, file: str) -> bytes:
    """meter_fingerprint_secret, or the content of meter_fingerprint_secret_file (read now,
    one trailing newline stripped). Errors never carry the secret."""
    if value and file:
        raise SettingsError(
            "set meter_fingerprint_secret or meter_fingerprint_secret_file, not both",
            option="meter_fingerprint_secret_file",
        )
    if not file:
        return value.encode("utf-8", "surrogateescape")
    path = parse_file(file, "meter_fingerprint_secret_file")
    try:
        secret = Path(path).read_bytes()
    except OSError as e:
        raise SettingsError(
            f"cannot read: {e.strerror}", option="meter_fingerprint_secret_file", value=file
        ) from None
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if not secret:
        raise SettingsError("the file is empty", option="meter_fingerprint_secret_file", value=file)
    return secret


def parse_count_rules(value: str, option: str = "meter_anthropic_counts") -> tuple[CountRule, ...]:
    """`PATH_PREFIX@MODEL_GLOB` (or just a model glob, for every metered path), comma-separated."""
    rules = []
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        prefix, sep, glob = item.rpartition("@")
        if not sep:
            prefix, glob = "/", item
        if not prefix.startswith("/") or not glob:
            raise SettingsError(
                "expected PATH_PREFIX@MODEL_GLOB or MODEL_GLOB", option=option, value=item
            )
        rules.append(CountRule(prefix, glob.lower()))
    return tuple(rules)


def parse_settings(options: Mapping[str, object]) -> Settings:
    """Every meter_* option value, validated together into one `Settings`."""

    def text(name: str) -> str:
        return str(options[name])

    def number(name: str) -> int:
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingsError("must be an integer", option=name, value=value)
        return value

    def flag(name: str) -> bool:
        value = options[name]
        if not isinstance(value, bool):
            raise SettingsError("must be true or false", option=name, value=value)
        return value

    attribution = parse_attribution(text("meter_attribution"))
    subject = parse_subject(text("meter_subject"))
    return Settings(
        nats_servers=parse_nats_urls(text("meter_nats_url")),
        nats_creds=parse_file(text("meter_nats_creds"), "meter_nats_creds"),
        nats_token=text("meter_nats_token"),
        nats_user=text("meter_nats_user"),
        nats_password=text("meter_nats_password"),
        nats_tls_ca=parse_file(text("meter_nats_tls_ca"), "meter_nats_tls_ca"),
        nats_tls_cert=parse_file(text("meter_nats_tls_cert"), "meter_nats_tls_cert"),
        nats_tls_key=parse_file(text("meter_nats_tls_key"), "meter_nats_tls_key"),
        subject=subject,
        unbillable_subject=parse_unbillable_subject(text("meter_unbillable_subject"), subject),
        house=parse_house(text("meter_house_customer"), text("meter_house_tenant")),
        cloudevents=flag("meter_cloudevents"),
        spool_dir=parse_spool_dir(text("meter_spool_dir")),
        spool_sync=parse_spool_sync(text("meter_spool_sync")),
        spool_max_bytes=parse_spool_max_mb(number("meter_spool_max_mb")),
        on_spool_full=parse_on_spool_full(text("meter_on_spool_full")),
        paths=parse_paths(text("meter_paths")),
        price_micro_per_token=parse_non_negative(
            number("meter_price_micro_per_token"), "meter_price_micro_per_token"
        ),
        prices_file=text("meter_prices"),
        currency=parse_currency(text("meter_currency")),
        tenant_header=parse_header_name(text("meter_tenant_header"), "meter_tenant_header"),
        customer_header=parse_header_name(text("meter_customer_header"), "meter_customer_header"),
        stream_usage=parse_stream_usage(text("meter_stream_usage")),
        publish_timeout_ms=parse_positive(
            number("meter_publish_timeout_ms"), "meter_publish_timeout_ms"
        ),
        publish_linger_ms=parse_non_negative(
            number("meter_publish_linger_ms"), "meter_publish_linger_ms"
        ),
        shutdown_drain_ms=parse_non_negative(
            number("meter_shutdown_drain_ms"), "meter_shutdown_drain_ms"
        ),
        shutdown_grace_ms=parse_non_negative(
            number("meter_shutdown_grace_ms"), "meter_shutdown_grace_ms"
        ),
        admin_listen=parse_listen(text("meter_admin_listen")),
        ready_broker_down_s=parse_non_negative(
            number("meter_ready_broker_down_s"), "meter_ready_broker_down_s"
        ),
        ready_spool_age_s=parse_non_negative(
            number("meter_ready_spool_age_s"), "meter_ready_spool_age_s"
        ),
        anthropic_counts=parse_count_rules(text("meter_anthropic_counts")),
        max_body_bytes=parse_positive(number("meter_max_body_mb"), "meter_max_body_mb") * 2**20,
        max_event_bytes=parse_positive(number("meter_max_event_kb"), "meter_max_event_kb") * 2**10,
        websocket_keep=parse_non_negative(number("meter_websocket_keep"), "meter_websocket_keep"),
        attribution=attribution,
        keymap_file=parse_keymap_file(text("meter_keymap"), attribution),
        fingerprint_secret=parse_fingerprint_secret(
            text("meter_fingerprint_secret"), text("meter_fingerprint_secret_file")
        ),
        tune_mitmproxy=flag("meter_tune_mitmproxy"),
        metrics_max_models=parse_non_negative(
            number("meter_metrics_max_models"), "meter_metrics_max_models"
        ),
    )


def nats_config(settings: Settings) -> NatsConfig:
    """What the publisher needs of the settings (compared to restart it on a change)."""
    return NatsConfig(
        servers=settings.nats_servers,
        subject=settings.subject,
        publish_timeout_ms=settings.publish_timeout_ms,
        linger_ms=settings.publish_linger_ms,
        creds_file=settings.nats_creds,
        token=settings.nats_token,
        user=settings.nats_user,
        password=settings.nats_password,
        tls_ca_file=settings.nats_tls_ca,
        tls_cert_file=settings.nats_tls_cert,
        tls_key_file=settings.nats_tls_key,
    )
