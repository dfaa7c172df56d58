from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgemeter.errors import SettingsError
from edgemeter.options import OPTIONS
from edgemeter.settings import (
    default_spool_dir,
    parse_currency,
    parse_header_name,
    parse_listen,
    parse_nats_urls,
    parse_paths,
    parse_settings,
    parse_stream_usage,
    parse_subject,
)

# Every option at its declared default: the addon's OPTIONS table is the one source of truth.
DEFAULTS: dict[str, Any] = {name: default for name, _, default, _ in OPTIONS} | {
    "meter_spool_dir": "/tmp/spool"
}


def test_defaults_parse() -> None:
    s = parse_settings(DEFAULTS)
    assert s.nats_servers == ("nats://127.0.0.1:4222",)
    assert s.paths == ("/v1/", "/v1beta/")
    assert s.admin_listen == ("127.0.0.1", 9464)
    assert s.spool_dir == Path("/tmp/spool")
    assert s.tune_mitmproxy is True


def test_cluster_urls_are_split_and_trimmed() -> None:
    assert parse_nats_urls("nats://a:4222, tls://b:4223 ,") == ("nats://a:4222", "tls://b:4223")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("meter_nats_url", "http://x:4222"),
        ("meter_nats_url", "nats://x:notaport"),
        ("meter_nats_url", " , "),
        ("meter_subject", "catalyst.usage.>"),
        ("meter_subject", "has space"),
        ("meter_subject", "a..b"),
        ("meter_paths", "v1/"),
        ("meter_price_micro_per_token", -1),
        ("meter_price_micro_per_token", "156"),
        ("meter_currency", "omr"),
        ("meter_tenant_header", "x tenant"),
        ("meter_stream_usage", "strip"),
        ("meter_spool_sync", "fast"),
        ("meter_spool_max_mb", -1),
        ("meter_on_spool_full", "drop"),
        ("meter_publish_timeout_ms", 0),
        ("meter_publish_linger_ms", -1),
        ("meter_admin_listen", "9464"),
        ("meter_admin_listen", "127.0.0.1:70000"),
        ("meter_nats_creds", "/nonexistent/creds"),
        ("meter_tune_mitmproxy", "yes"),
    ],
)
def test_a_bad_value_names_the_option_and_the_value(option: str, value: object) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings({**DEFAULTS, option: value})
    assert info.value.fields["option"] == option
    assert str(value).strip() in str(info.value) or option == "meter_nats_url"


def test_parsers_normalise() -> None:
    assert parse_header_name("X-Tenant-Id", "o") == "x-tenant-id"
    assert parse_paths("/v1/,/openai/") == ("/v1/", "/openai/")
    assert parse_subject("catalyst.usage.recorded") == "catalyst.usage.recorded"
    assert parse_currency("USD") == "USD"
    assert parse_stream_usage("off") == "off"
    assert parse_listen("") is None
    assert parse_listen("[::1]:9464") == ("::1", 9464)


def test_default_spool_dir_follows_xdg() -> None:
    assert default_spool_dir({"XDG_DATA_HOME": "/data"}) == Path("/data/edgemeter/spool")
    assert default_spool_dir({"EDGEMETER_SPOOL_DIR": "/var/spool/m"}) == Path("/var/spool/m")


def test_spool_limit_is_in_mebibytes_and_zero_means_none() -> None:
    assert parse_settings(DEFAULTS).spool_max_bytes == 1024 * 1024 * 1024
    assert parse_settings(DEFAULTS | {"meter_spool_max_mb": 0}).spool_max_bytes is None
    assert parse_settings(DEFAULTS | {"meter_spool_max_mb": 3}).spool_max_bytes == 3 * 2**20


def test_the_readme_documents_every_option() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [name for name, *_ in OPTIONS if f"`{name}`" not in readme]
    assert missing == []
