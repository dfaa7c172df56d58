from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from edgemeter import cli
from edgemeter.addon import Meter
from edgemeter.errors import SettingsError
from edgemeter.ids import uuid7
from edgemeter.metering.attribution import (
    Account,
    Attribution,
    Source,
    api_key,
    api_keys,
    attribute,
    fingerprint,
    header_id,
    header_names,
    is_fingerprint,
    picked_headers,
)
from edgemeter.metering.attribution import Spec as AttributionSpec
from edgemeter.metering.flow import FlowMeter, Request
from edgemeter.metering.prices import flat_price
from edgemeter.options import OPTIONS
from edgemeter.settings import (
    Settings,
    parse_attribution,
    parse_fingerprint_secret,
    parse_keymap_file,
    parse_settings,
)
from tests.flows import make_flow, run_flow, spooled
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, MeterProxy, NatsServer
from tools.streams import ensure_stream, stream_messages

SECRET = b"attribution-test-secret"
KEY_A, KEY_B, KEY_UNKNOWN = "sk-attr-a-0123456789", "sk-attr-b-9876543210", "sk-attr-nobody-00"
HEADERS = {"x-tenant-id": "t_forged", "x-customer-id": "cus_forged"}
DEFAULTS: dict[str, Any] = {name: default for name, _, default, _ in OPTIONS}
CHAT: Any = [{"role": "user", "content": "hello world"}]


def settings(**options: Any) -> Settings:
    return parse_settings(DEFAULTS | {"meter_spool_dir": "/tmp/unused"} | options)


def keymap_text(accounts: dict[str, tuple[str, str]], secret: bytes = SECRET) -> str:
    return "[keys]\n" + "".join(
        f'[keys."{fingerprint(key, secret)}"]\ntenant = "{tenant}"\ncustomer = "{customer}"\n'
        for key, (tenant, customer) in accounts.items()
    )


def write_atomically(path: Path, text: str) -> Path:
    """As an operator's tooling should: a reload never sees a half-written map."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- keys and fingerprints --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-abc"}, "sk-abc"),
        ({"authorization": "bearer  sk-abc "}, "sk-abc"),
        ({"x-api-key": "sk-ant-1"}, "sk-ant-1"),
        ({"api-key": "azure-1"}, "azure-1"),
        # Gemini's own header is read on Gemini's routes only (see test_gemini_keys_...).
        ({"x-goog-api-key": "AIza-gemini-1"}, ""),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "k2"}, "k2"),
        ({}, ""),
    ],
)
def test_the_api_key_is_read_from_the_usual_headers(headers: dict[str, str], key: str) -> None:
    assert api_key(headers) == key


def test_every_key_is_seen_also_in_repeated_headers() -> None:
    headers = http.Headers(
        [
            (b"authorization", b"Bearer one"),
            (b"authorization", b"Bearer two"),
            (b"x-api-key", b"three"),
            (b"api-key", b"one"),
        ]
    )
    assert api_keys(headers) == ["one", "two", "three"]


def test_a_routes_own_keys_come_after_the_usual_headers_keys() -> None:
    assert api_keys({"x-api-key": "k1"}, [" k2 ", "k1", ""]) == ["k1", "k2"]
    assert api_keys({}, []) == []


def test_a_url_key_attributes_like_a_header_key() -> None:
    spec = AttributionSpec(mode="keymap", fingerprint_secret=SECRET)
    accounts = {fingerprint(KEY_A, SECRET): Account("t_a", "cus_a")}
    who = attribute({}, spec, accounts.get, [KEY_A])
    assert (who.tenant_id, who.customer_id, who.source) == ("t_a", "cus_a", "keymap")
    assert who.fingerprint == fingerprint(KEY_A, SECRET)


def test_fingerprint_is_a_sha256_prefix_and_never_the_key() -> None:
    fp = fingerprint("test")
    assert fp == hashlib.sha256(b"test").hexdigest()[:16] == "9f86d081884c7d65"
    assert "test" not in fp
    assert fingerprint("") == ""


def test_with_a_secret_the_fingerprint_is_a_marked_hmac() -> None:
    expected = hmac.new(SECRET, b"test", hashlib.sha256).hexdigest()[:16]
    assert fingerprint("test", SECRET) == f"hmac:{expected}"
    assert fingerprint("test", b"another secret") != fingerprint("test", SECRET)
    assert fingerprint("", SECRET) == ""


@pytest.mark.parametrize(
    ("text", "keyed", "valid"),
    [
        (fingerprint("k"), False, True),
        (fingerprint("k", SECRET), True, True),
        (fingerprint("k"), True, False),
        (fingerprint("k", SECRET), False, False),
        ("9F86D081884C7D65", False, False),
        ("9f86d081884c7d6", False, False),
        ("sk-live-0123456789", False, False),
    ],
)
def test_a_fingerprint_is_recognised_by_its_scheme(text: str, keyed: bool, valid: bool) -> None:
    assert is_fingerprint(text, keyed=keyed) is valid


# -- attribution modes ------------------------------------------------------------------------

ACCOUNTS = {fingerprint(KEY_A, SECRET): Account("t_a", "cus_a")}
KEYMAP = {
    "meter_attribution": "keymap",
    "meter_fingerprint_secret": SECRET.decode(),
}


def keymap_settings() -> Settings:
    return replace(settings(), attribution="keymap", fingerprint_secret=SECRET)


def test_headers_mode_trusts_the_headers() -> None:
    who = attribute({"authorization": f"Bearer {KEY_A}", **HEADERS}, settings().attribution_spec)
    assert who == Attribution("t_forged", "cus_forged", fingerprint(KEY_A), "headers")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # The client's own key decides; its tenant and customer headers are never read.
        ({"authorization": f"Bearer {KEY_A}"}, Attribution("t_a", "cus_a", fingerprint(KEY_A, SECRET), "keymap")),
        # A made-up key in a header the meter reads first does not escape the real key's account.
        ({"authorization": f"Bearer {KEY_UNKNOWN}", "x-api-key": KEY_A}, Attribution("t_a", "cus_a", fingerprint(KEY_A, SECRET), "keymap")),
        ({"x-api-key": KEY_UNKNOWN}, Attribution("", "", fingerprint(KEY_UNKNOWN, SECRET), "unknown_key")),
        ({}, Attribution("", "", "", "unknown_key")),
    ],
)  # fmt: skip
def test_keymap_mode_bills_the_keys_account_whatever_the_headers_say(
    headers: dict[str, str], expected: Attribution
) -> None:
    assert (
        attribute(headers | HEADERS, keymap_settings().attribution_spec, ACCOUNTS.get) == expected
    )


@pytest.mark.parametrize("source", ["headers", "keymap", "unknown_key"])
def test_the_envelopes_attribution_is_the_one_found_at_requestheaders(source: Source) -> None:
    meter = FlowMeter(
        Request("r1", "openai.chat", "/v1/chat/completions", 0.0, "t", "c", "", "", source)
    )
    meter.body(200, b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}', "", None)
    result = meter.finish(
        aborted=False, now=1.0, currency="OMR", price_of=lambda u, m: flat_price(u, 1)
    )
    assert result.envelope is not None
    assert result.envelope["metadata"]["attribution"] == source
    assert json.loads(result.data) == result.envelope


# -- picked headers: one pass over the raw fields, read as mitmproxy reads them ---------------

FIELDS: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"host", b"localhost")],
    [(b"Authorization", b"Bearer one"), (b"authorization", b"Bearer two"), (b"AUTHORIZATION", b"Bearer one")],
    [(b"X-TENANT-ID", b"t_7"), (b"X-Customer-Id", b"cus_42"), (b"X-Request-ID", b"req-1"), (b"Content-Encoding", b"gzip")],
    [(b"x-tenant-id", b"t_7"), (b"x-tenant-id", b"t_8"), (b"x-request-id", b"a"), (b"X-Request-Id", b"b")],
    [(b"x-tenant-id", b"t\xc3\xa9"), (b"x-customer-id", b"\xff\xfecus"), (b"authorization", b"Bearer sk-\xe2\x82\xac\x80")],
    [(b"x-api-key", b"\xc3"), (b"api-key", b"k\xed\xa0\x80"), (b"x-request-id", b"\xe2\x80\xae")],
    [(b"x-tenant-id", b""), (b"authorization", b""), (b"x-customer-id", b""), (b"x-customer-id", b"c")],
    [(b"x-customer-id", b"cus, cus_other"), (b"x-request-id", b"  padded  "), (b"x-tenant-id", b"t\tab")],
    [(b"authorization", b"Bearer"), (b"authorization", b"bearer\tsk-tab"), (b"authorization", b"Basic dXNlcjpwYXNz")],
    [(b"authorization", b"  BEARER   sk-spaced  "), (b"x-api-key", b"sk-spaced"), (b"api-key", b"azure-1")],
    [(b"x-tenant-id", b"t" * 128), (b"x-customer-id", b"c" * 129), (b"x-request-id", b"r" * 10_000)],
    [(b"X-T\xc9NANT-ID", b"not-a-tenant"), (b"x-tenant-id\x00", b"nor-this"), (b"x-org", b"o_1")],
    [(b"x-api-key", KEY_A.encode()), (b"authorization", f"Bearer {KEY_UNKNOWN}".encode()), (b"X-Org", b"o_1"), (b"x-org", b"o_2")],
]  # fmt: skip
PICK_SETTINGS = {
    "headers": settings(),
    "custom header": settings(meter_tenant_header="X-Org"),
    "keymap": keymap_settings(),
}
EXTRA = ("x-request-id", "content-encoding")


@pytest.mark.parametrize("mode", PICK_SETTINGS)
@pytest.mark.parametrize("fields", FIELDS, ids=range(len(FIELDS)))
def test_picked_headers_read_as_mitmproxys_headers(
    fields: list[tuple[bytes, bytes]], mode: str
) -> None:
    conf = PICK_SETTINGS[mode].attribution_spec
    headers = http.Headers(fields)
    names = header_names(conf, *EXTRA)
    picked = picked_headers(headers.fields, names)
    lookup = ACCOUNTS.get
    assert attribute(picked, conf, lookup) == attribute(headers, conf, lookup)
    assert api_keys(picked) == api_keys(headers)
    for name in sorted(names):
        for spelled in (name, name.upper()):
            assert picked.get(spelled) == headers.get(spelled)
            assert picked.get(spelled, "") == headers.get(spelled, "")
            assert picked.get_all(spelled) == headers.get_all(spelled)
            assert (spelled in picked) is (spelled in headers)
            assert header_id(picked, spelled) == header_id(headers, spelled)
    assert dict(picked) == {
        name.lower(): headers[name] for name in headers if name.lower() in names
    }


def test_header_names_are_those_attribution_reads_and_the_extra_ones() -> None:
    assert header_names(
        settings(meter_customer_header="X-Billed-To").attribution_spec, "X-Request-Id"
    ) == {
        "authorization",
        "x-api-key",
        "api-key",
        "x-tenant-id",
        "x-billed-to",
        "x-request-id",
    }


def test_reading_a_header_that_was_not_picked_is_refused() -> None:
    picked = picked_headers(
        [(b"x-forwarded-for", b"10.0.0.1")], header_names(settings().attribution_spec)
    )
    for read in (picked.get, picked.get_all, picked.__getitem__, picked.__contains__):
        with pytest.raises(ValueError, match="'x-forwarded-for' was not picked"):
            read("x-forwarded-for")
    with pytest.raises(KeyError):
        picked["x-api-key"]


def test_picked_names_are_case_insensitive_as_well() -> None:
    picked = picked_headers([(b"x-request-id", b"r1")], frozenset({"X-Request-Id"}))
    assert picked.get("x-request-id") == picked.get("X-REQUEST-ID") == "r1"


def test_picked_headers_never_show_their_values() -> None:
    picked = picked_headers(
        [(b"Authorization", f"Bearer {KEY_A}".encode())], header_names(settings().attribution_spec)
    )
    assert repr(picked) == "PickedHeaders(['authorization'])"
    assert KEY_A not in repr(picked) + str(picked)


# -- options ----------------------------------------------------------------------------------


def test_attribution_options_are_parsed(tmp_path: Path) -> None:
    path = write_atomically(tmp_path / "keys.toml", "[keys]\n")
    assert parse_attribution("keymap") == "keymap"
    assert parse_keymap_file(str(path), "keymap") == str(path)
    assert parse_keymap_file("", "headers") == ""
    parsed = settings(meter_attribution="keymap", meter_keymap=str(path))
    assert (parsed.attribution, parsed.keymap_file, parsed.fingerprint_secret) == (
        "keymap",
        str(path),
        b"",
    )


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"meter_attribution": "jwt"}, "meter_attribution", "must be headers or keymap"),
        ({"meter_attribution": "keymap"}, "meter_keymap", "required when meter_attribution=keymap"),
        ({"meter_keymap": "/etc/keys.toml"}, "meter_keymap", "ignored unless meter_attribution=keymap"),
        ({"meter_attribution": "keymap", "meter_keymap": "/nonexistent/keys.toml"}, "meter_keymap", "not found"),
    ],
)  # fmt: skip
def test_a_keymap_mode_without_a_usable_map_is_refused(
    options: dict[str, str], option: str, words: str
) -> None:
    with pytest.raises(SettingsError, match=words) as caught:
        settings(**options)
    assert caught.value.fields["option"] == option


def test_the_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert parse_fingerprint_secret("", str(path)) == SECRET
    path.write_bytes(SECRET + b"\r\n")
    assert parse_fingerprint_secret("", str(path)) == SECRET
    assert parse_fingerprint_secret("inline", "") == b"inline"


def test_the_fingerprint_command_prints_the_meters_fingerprints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{KEY_A}\n\n  {KEY_B}  \n"))
    assert cli.main(["fingerprint", "--secret-file", str(secret)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [fingerprint(KEY_A, SECRET), fingerprint(KEY_B, SECRET)]
    assert KEY_A not in out + err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["fingerprint"]) == 1
    assert "no API key on stdin" in capsys.readouterr().err


# -- through the addon ------------------------------------------------------------------------


@pytest.fixture
def keymap_meter(tmp_path: Path) -> Iterator[tuple[Meter, taddons.context, Path]]:
    path = write_atomically(
        tmp_path / "keys.toml", keymap_text({KEY_A: ("t_a", "cus_a"), KEY_B: ("t_b", "cus_b")})
    )
    addon = Meter()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            meter_spool_dir=str(tmp_path / "spool"),
            meter_admin_listen="",
            meter_keymap=str(path),
            **KEYMAP,
        )
        yield addon, tctx, path
        assert addon.spool is not None
        addon.spool.close()


def keyed_flow(key: str, customer: str = "cus_b") -> http.HTTPFlow:
    flow = make_flow()
    flow.request.headers["authorization"] = f"Bearer {key}"
    flow.request.headers["x-customer-id"] = customer
    flow.request.headers["x-tenant-id"] = "t_b"
    return flow


NONSTREAM = json.dumps(
    {"model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
).encode()


async def test_the_addon_bills_the_key_map_account_and_counts_unknown_keys(
    keymap_meter: tuple[Meter, Any, Path],
) -> None:
    addon, _, _ = keymap_meter
    await run_flow(addon, keyed_flow(KEY_A), 200, NONSTREAM, stream=False)
    await run_flow(addon, keyed_flow(KEY_UNKNOWN), 200, NONSTREAM, stream=False)
    known, unknown = spooled(addon)
    assert (known["customer_id"], known["metadata"]["tenant_id"]) == ("cus_a", "t_a")
    assert known["metadata"]["attribution"] == "keymap"
    assert known["metadata"]["api_key_fingerprint"] == fingerprint(KEY_A, SECRET)
    # Usage happened and the upstream took the key: billed, visibly unattributed.
    assert (unknown["customer_id"], unknown["metadata"]["tenant_id"]) == ("", "")
    assert unknown["metadata"]["attribution"] == "unknown_key"
    assert addon.stats.unknown_keys == 1
    assert "unknown keys (billed unattributed): 1" in addon.status()


GEMINI = json.dumps(
    {"modelVersion": "gemini-2.5-flash", "usageMetadata": {"promptTokenCount": 2,
     "candidatesTokenCount": 3, "totalTokenCount": 5}}
).encode()  # fmt: skip


@pytest.mark.parametrize("where", ["x-goog-api-key", "query"])
async def test_gemini_keys_bill_their_key_map_account(
    keymap_meter: tuple[Meter, Any, Path], where: str
) -> None:
    addon, _, _ = keymap_meter
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    flow = make_flow(path + (f"?alt=json&key={KEY_A}" if where == "query" else ""))
    del flow.request.headers["authorization"]
    if where != "query":
        flow.request.headers[where] = KEY_A
    flow.request.content = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    await run_flow(addon, flow, 200, GEMINI, stream=False)
    [env] = spooled(addon)
    md = env["metadata"]
    assert (env["customer_id"], md["tenant_id"], md["attribution"]) == ("cus_a", "t_a", "keymap")
    assert md["api_key_fingerprint"] == fingerprint(KEY_A, SECRET)
    # The key in the URL stays out of the envelope: its path is the path alone.
    assert md["path"] == path and KEY_A not in json.dumps(env)
    assert not any(KEY_A in bare for bare, _ in addon._routes)  # nor in the route cache


@pytest.mark.parametrize(
    ("path", "extra", "source"),
    [
        # Another API's route: its upstream does not authenticate Gemini's key there.
        ("/v1/chat/completions?key=" + KEY_A, {}, "unknown_key"),
        ("/v1/chat/completions", {"x-goog-api-key": KEY_A}, "unknown_key"),
        # Both on a Gemini route: the first key found in the map bills, whatever carried it.
        ("/v1beta/models/g:generateContent?key=" + KEY_A, {"x-api-key": KEY_UNKNOWN}, "keymap"),
    ],
)
async def test_gemini_keys_count_only_on_gemini_routes_and_after_the_usual_ones(
    keymap_meter: tuple[Meter, Any, Path], path: str, extra: dict[str, str], source: str
) -> None:
    addon, _, _ = keymap_meter
    flow = make_flow(path)
    del flow.request.headers["authorization"]
    flow.request.headers.update(extra)
    body = GEMINI if "generateContent" in path else NONSTREAM
    await run_flow(addon, flow, 200, body, stream=False)
    [env] = spooled(addon)
    md = env["metadata"]
    assert md["attribution"] == source
    # Keymap: the URL's mapped key; unknown_key: no key of the route's read at all.
    assert md["api_key_fingerprint"] == (fingerprint(KEY_A, SECRET) if source == "keymap" else "")


async def test_headers_mode_marks_its_envelopes(tmp_path: Path) -> None:
    addon = Meter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, meter_spool_dir=str(tmp_path / "spool"), meter_admin_listen="")
        await run_flow(addon, keyed_flow(KEY_UNKNOWN), 200, NONSTREAM, stream=False)
        [env] = spooled(addon)
        assert addon.spool is not None
        addon.spool.close()
    assert (env["customer_id"], env["metadata"]["attribution"]) == ("cus_b", "headers")
    assert addon.stats.unknown_keys == 0


def test_a_bad_key_map_stops_startup_naming_file_and_line(
    keymap_meter: tuple[Meter, Any, Path],
) -> None:
    addon, tctx, path = keymap_meter
    bad = write_atomically(path.with_name("bad.toml"), f'[keys."{KEY_A}"]\ntenant = "t"\n')
    with pytest.raises(exceptions.OptionsError) as caught:
        tctx.configure(addon, meter_keymap=str(bad))
    message = str(caught.value)
    assert message.startswith(f"meter_keymap={str(bad)!r}: an entry is not a fingerprint")
    assert "line=1" in message and KEY_A not in message


def test_both_secret_options_are_refused_without_showing_the_secret(
    keymap_meter: tuple[Meter, Any, Path], tmp_path: Path
) -> None:
    addon, tctx, _ = keymap_meter
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"file-secret-value\n")
    with pytest.raises(exceptions.OptionsError) as caught:
        tctx.configure(addon, meter_fingerprint_secret_file=str(secret_file))
    assert str(caught.value) == (
        "meter_fingerprint_secret_file: set meter_fingerprint_secret or "
        "meter_fingerprint_secret_file, not both"
    )


def test_the_attribution_mode_cannot_change_while_running(
    keymap_meter: tuple[Meter, Any, Path],
) -> None:
    addon, tctx, _ = keymap_meter
    addon.is_running = True
    try:
        with pytest.raises(exceptions.OptionsError, match="meter_attribution needs a restart"):
            tctx.configure(addon, meter_attribution="headers", meter_keymap="")
    finally:
        addon.is_running = False


# -- end to end: a real mitmdump, the official SDK, a real JetStream stream --------------------


def published(
    url: str, customers: set[str], count: int, timeout: float = 30
) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(headers, envelope) of the messages on the stream billed to these customers, once there
    are `count` of them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            (headers or {}, envelope)
            for headers, data in asyncio.run(stream_messages(url, "CATALYST_SME"))
            if (envelope := json.loads(data))["customer_id"] in customers
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def envelopes(url: str, customers: set[str], count: int, timeout: float = 30) -> list[Any]:
    return [envelope for _, envelope in published(url, customers, count, timeout)]


def sdk(proxy: MeterProxy, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key=key, max_retries=0, default_headers=headers
    )


@pytest.fixture
def broker(nats_server: NatsServer) -> NatsServer:
    asyncio.run(ensure_stream(nats_server.url))
    return nats_server


def test_a_client_cannot_bill_another_customer_and_the_map_reloads_live(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer, tmp_path: Path
) -> None:
    run = uuid7()[-8:]
    cus_a, cus_b, cus_a2 = f"cus_a_{run}", f"cus_b_{run}", f"cus_a2_{run}"
    path = write_atomically(
        tmp_path / "keys.toml", keymap_text({KEY_A: ("t_a", cus_a), KEY_B: ("t_b", cus_b)})
    )
    secret = tmp_path / "fingerprint.secret"
    secret.write_bytes(SECRET + b"\n")
    proxy = meter_factory.start(
        demo_upstream.url,
        broker.url,
        "meter_attribution=keymap",
        f"meter_keymap={path}",
        f"meter_fingerprint_secret_file={secret}",
    )
    # Key A's client claims to be customer B, in B's tenant.
    forger = sdk(proxy, KEY_A, **{"x-customer-id": cus_b, "x-tenant-id": "t_b"})
    forger.chat.completions.create(model="demo-chat", messages=CHAT)
    sdk(proxy, KEY_B).chat.completions.create(model="demo-chat", messages=CHAT)
    by_customer = {e["customer_id"]: e for e in envelopes(broker.url, {cus_a, cus_b}, 2)}
    assert set(by_customer) == {cus_a, cus_b}
    assert by_customer[cus_a]["metadata"]["tenant_id"] == "t_a"
    assert by_customer[cus_a]["metadata"]["api_key_fingerprint"] == fingerprint(KEY_A, SECRET)
    assert by_customer[cus_b]["metadata"]["api_key_fingerprint"] == fingerprint(KEY_B, SECRET)

    # The operator moves key A to another customer; the meter checks the file once a second.
    write_atomically(path, keymap_text({KEY_A: ("t_a", cus_a2), KEY_B: ("t_b", cus_b)}))
    time.sleep(1.5)
    forger.chat.completions.create(model="demo-chat", messages=CHAT)
    [moved] = envelopes(broker.url, {cus_a2}, 1)
    assert moved["metadata"]["attribution"] == "keymap"
    assert len(envelopes(broker.url, {cus_a, cus_b}, 2, timeout=0)) == 2
    assert "key map" in proxy.log_tail() and "reloaded" in proxy.log_tail()


def test_a_client_request_id_never_becomes_the_request_id(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    """Idempotency cannot be hijacked: were the client's X-Request-Id the Nats-Msg-Id, a second
    request reusing it would be dropped by the broker as a duplicate (free usage), and a client
    could make another's request vanish by racing its id."""
    proxy = meter_factory.start(demo_upstream.url, broker.url)
    customer, client_id = f"cus_{uuid7()[-12:]}", uuid7()
    client = sdk(proxy, KEY_A, **{"x-customer-id": customer, "x-request-id": client_id})
    for _ in range(2):
        client.chat.completions.create(model="demo-chat", messages=CHAT)
    messages = published(broker.url, {customer}, 2)
    assert len(messages) == 2
    ids = [envelope["metadata"]["request_id"] for _, envelope in messages]
    assert len(set(ids)) == 2 and client_id not in ids
    assert [headers.get("Nats-Msg-Id") for headers, _ in messages] == ids
    assert [e["metadata"]["client_request_id"] for _, e in messages] == [client_id] * 2


# -- client-controlled ids: bounded and printable, or left out --------------------------------


@pytest.mark.parametrize(
    "hostile",
    ["cus\r\nX-Injected: 1", "t\x00nul", "cus_\u202eevil", " cus_42", "c" * 129, "cus\u200b42"],
)
def test_header_ids_unfit_for_an_envelope_are_left_out(hostile: str) -> None:
    headers = http.Headers(x_customer_id=hostile, x_tenant_id="t_7")
    assert header_id(headers, "x-customer-id") is None
    assert header_id(headers, "x-tenant-id") == "t_7"
    assert header_id(http.Headers(), "x-customer-id") == ""


async def test_a_hostile_customer_header_is_billed_unattributed_and_counted(
    meter: tuple[Meter, Any],
) -> None:
    addon, _ = meter
    flow = make_flow("/v1/chat/completions?x=1")
    flow.request.headers["x-customer-id"] = "cus\x1b[2Jevil"
    flow.request.headers["x-request-id"] = "r" * 10_000
    body = b'{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
    await run_flow(addon, flow, 200, body, stream=False)
    [env] = spooled(addon)
    assert env["customer_id"] == "" and env["metadata"]["tenant_id"] == "t_7"
    assert env["metadata"]["client_request_id"] == ""
    assert env["metadata"]["path"] == "/v1/chat/completions"
    assert addon.stats.anomalies["invalid_attribution_header"] == 1


def test_api_keys_of_picked_headers_without_the_key_headers_refuse_to_read_them() -> None:
    # api_keys reads PickedHeaders' own lists; a key header that was not picked still raises
    # rather than reading as absent (a request billed without its key's fingerprint).
    picked = picked_headers([(b"authorization", b"Bearer sk-1")], frozenset({"x-tenant-id"}))
    with pytest.raises(ValueError, match="not picked"):
        api_keys(picked)
    every = picked_headers([(b"Authorization", b"Bearer sk-1")], header_names(AttributionSpec()))
    assert api_keys(every) == ["sk-1"]
