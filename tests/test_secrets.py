"""No secret at rest: API keys, NATS credentials and the fingerprint secret never reach an
envelope, the spool, a log line, meter.status or an error message. Real traffic through real
mitmdump meters; then every artifact is searched byte for byte, in several encodings."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anthropic
import httpx2
import openai
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from edgemeter.addon import Meter
from edgemeter.errors import SettingsError
from edgemeter.metering.attribution import fingerprint
from edgemeter.options import OPTIONS
from edgemeter.settings import parse_nats_urls, parse_settings
from spool.publisher import redact_url as redact_userinfo
from tests.flows import make_flow, run_flow, spooled
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, MeterProxy, NatsServer
from tools.streams import ensure_stream, stream_messages

# Distinctive values: each occurs nowhere but where the test puts it.
KEY_BEARER = "sk-SECRET-bearer-7d1e0a4c"
KEY_X_API = "sk-ant-SECRET-xapikey-93bc"
KEY_AZURE = "SECRET-azure-apikey-51f0e2"  # not in the key map: billed unattributed
NATS_USER = "meter"
NATS_PASSWORD = "nats-SECRET-password-e4a1"
WRONG_PASSWORD = "nats-SECRET-wrongpw-77aa"
WRONG_TOKEN = "nats-SECRET-token-0c2f9"
FP_SECRET = "fp-SECRET-hmac-2b9d61"
KEY_GOOG = "AIza-SECRET-googheader-3c1d"  # Gemini's x-goog-api-key
KEY_GOOG_URL = "AIza-SECRET-googquery-8e2b"  # Gemini's ?key=
API_KEYS = (KEY_BEARER, KEY_X_API, KEY_AZURE, KEY_GOOG, KEY_GOOG_URL)
SECRETS = (*API_KEYS, NATS_PASSWORD, WRONG_PASSWORD, WRONG_TOKEN, FP_SECRET)
DEFAULTS: dict[str, Any] = {name: default for name, _, default, _ in OPTIONS}
CHAT: Any = [{"role": "user", "content": "hello world"}]


def encodings(secret: str) -> set[bytes]:
    """The secret as it could be written: raw, URL-quoted, hex, and base64 (standard and URL
    alphabets, at each of the three alignments inside a longer encoded text)."""
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode(), raw.hex().encode()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        # Only the characters that depend on the secret alone, whatever surrounds it.
        core = encoded[4 if offset else 0 : -4]
        forms |= {core, core.replace(b"+", b"-").replace(b"/", b"_")}
    return forms


def forbidden() -> dict[bytes, str]:
    """Every form of every secret, and what it is. A key's unkeyed SHA-256 fingerprint is
    forbidden too: with a fingerprint secret set, finding it would mean the secret was not
    used, and that anyone with a list of candidate keys could test them."""
    found = {form: secret for secret in SECRETS for form in encodings(secret)}
    found |= {fingerprint(key).encode(): f"unkeyed fingerprint of {key}" for key in API_KEYS}
    return found


def leaks(data: bytes) -> list[str]:
    return sorted({what for form, what in forbidden().items() if form in data})


# -- error messages and reprs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:notaport",
        f"http://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:4222",
        f"{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:4222",
        f"nats://127.0.0.1:4222,nats://{NATS_USER}:{NATS_PASSWORD}@[::1]:99999",
        # The '@' forgotten: the password stands where the port should be.
        f"nats://{NATS_USER}:{NATS_PASSWORD}",
    ],
)
def test_a_bad_nats_url_is_refused_without_echoing_its_password(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_nats_urls(url)
    assert leaks(str(caught.value).encode()) == []
    assert caught.value.fields["option"] == "meter_nats_url"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:p@host:4222", "nats://***@host:4222"),
        ("nats://u:p@w@host:4222/x?y#z", "nats://***@host:4222/x?y#z"),
        ("u:p@host:4222", "***@host:4222"),
        ("nats://host:4222", "nats://host:4222"),
        ("tls://host/a@b", "tls://host/a@b"),
    ],
)
def test_user_info_is_redacted_and_nothing_else(url: str, shown: str) -> None:
    assert redact_userinfo(url) == shown


def test_settings_never_show_their_secrets() -> None:
    settings = parse_settings(
        DEFAULTS
        | {
            "meter_spool_dir": "/tmp/unused",
            "meter_nats_token": WRONG_TOKEN,
            "meter_nats_user": NATS_USER,
            "meter_nats_password": NATS_PASSWORD,
            "meter_fingerprint_secret": FP_SECRET,
        }
    )
    assert settings.fingerprint_secret == FP_SECRET.encode()
    assert leaks(repr(settings).encode()) == []
    assert f"nats_user='{NATS_USER}'" in repr(settings)


def test_the_admin_endpoint_listens_on_loopback_by_default() -> None:
    settings = parse_settings(DEFAULTS | {"meter_spool_dir": "/tmp/unused"})
    assert settings.admin_listen is not None and settings.admin_listen[0] == "127.0.0.1"


# -- in process: every log record at DEBUG, and meter.status ----------------------------------


async def test_no_log_record_and_no_status_line_carries_a_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keymap = tmp_path / "keys.toml"
    keymap.write_text(
        f'[keys."{fingerprint(KEY_BEARER, FP_SECRET.encode())}"]\n'
        'tenant = "t_s"\ncustomer = "cus_s"\n'
    )
    addon, comments = Meter(), list[str]()
    body = b'{"model":"m","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}'
    with caplog.at_level(logging.DEBUG), taddons.context(addon) as tctx:
        tctx.configure(
            addon,
            meter_spool_dir=str(tmp_path / "spool"),
            meter_admin_listen="",
            meter_attribution="keymap",
            meter_keymap=str(keymap),
            meter_fingerprint_secret=FP_SECRET,
            meter_nats_url=f"nats://{NATS_USER}:{WRONG_PASSWORD}@127.0.0.1:1",
            meter_nats_token=WRONG_TOKEN,
        )
        for header, value in [
            ("authorization", f"Bearer {KEY_BEARER}"),
            ("x-api-key", KEY_X_API),
            ("api-key", KEY_AZURE),
        ]:
            flow = make_flow()
            del flow.request.headers["authorization"]
            flow.request.headers[header] = value
            await run_flow(addon, flow, 200, body, stream=False)
            comments.append(flow.comment)
        gemini = b'{"modelVersion":"g","usageMetadata":{"promptTokenCount":2,"totalTokenCount":5}}'
        for path, goog in [
            ("/v1beta/models/g:generateContent", KEY_GOOG),
            (f"/v1beta/models/g:generateContent?alt=json&key={KEY_GOOG_URL}", ""),
        ]:
            flow = make_flow(path)
            del flow.request.headers["authorization"]
            if goog:
                flow.request.headers["x-goog-api-key"] = goog
            await run_flow(addon, flow, 200, gemini, stream=False)
            comments.append(flow.comment)
        envelopes = json.dumps(spooled(addon)).encode()
        # An option error raised while the meter is configured.
        with pytest.raises(exceptions.OptionsError) as caught:
            tctx.configure(addon, meter_nats_url=f"nats://{NATS_USER}:{NATS_PASSWORD}@h:x")
        status = addon.status()
        assert addon.spool is not None
        addon.spool.close()
    # The scan sees what it should: four unknown keys were logged, by fingerprint.
    assert "unknown keys (billed unattributed): 4" in status
    for key in (KEY_AZURE, KEY_GOOG, KEY_GOOG_URL):
        assert fingerprint(key, FP_SECRET.encode()) in caplog.text
        assert fingerprint(key, FP_SECRET.encode()).encode() in envelopes
    assert leaks(envelopes) == []
    assert leaks(caplog.text.encode()) == []
    assert leaks(status.encode()) == []
    assert leaks("".join(comments).encode()) == []
    assert leaks(str(caught.value).encode()) == []


# -- end to end: real meters, real broker, every artifact searched ------------------------------


@dataclass
class Deployment:
    broker: NatsServer
    good: MeterProxy  # the right NATS password; a fingerprint secret file; keymap mode
    bad: MeterProxy  # a wrong password in the URL and a wrong token: never connects
    inputs: Path  # the secret file and the key map (these hold secrets by design)

    @property
    def url(self) -> str:
        return f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{self.broker.port}"


@pytest.fixture
def deployment(
    tmp_path: Path, meter_factory: MeterFactory, demo_upstream: BackgroundDemo
) -> Iterator[Deployment]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    conf = inputs / "nats.conf"
    conf.write_text(f'authorization {{ user: "{NATS_USER}", password: "{NATS_PASSWORD}" }}\n')
    broker = NatsServer(store_dir=tmp_path / "jetstream", extra_args=["-c", str(conf)])
    broker.start()
    secret_file = inputs / "fingerprint.secret"
    secret_file.write_text(FP_SECRET + "\n")
    keymap = inputs / "keys.toml"
    keymap.write_text(
        "".join(
            f'[keys."{fingerprint(key, FP_SECRET.encode())}"]\n'
            f'tenant = "t_s"\ncustomer = "cus_secret_{n}"\n'
            for n, key in enumerate((KEY_BEARER, KEY_X_API))
        )
    )
    verbose = ("termlog_verbosity=debug", "meter_shutdown_drain_ms=500")
    try:
        good_url = f"nats://127.0.0.1:{broker.port}"
        asyncio.run(ensure_stream(f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{broker.port}"))
        good = meter_factory.start(
            demo_upstream.url,
            good_url,
            *verbose,
            f"meter_nats_user={NATS_USER}",
            f"meter_nats_password={NATS_PASSWORD}",
            f"meter_fingerprint_secret_file={secret_file}",
            "meter_attribution=keymap",
            f"meter_keymap={keymap}",
        )
        bad = meter_factory.start(
            demo_upstream.url,
            f"nats://{NATS_USER}:{WRONG_PASSWORD}@127.0.0.1:{broker.port}",
            *verbose,
            f"meter_nats_token={WRONG_TOKEN}",
            f"meter_fingerprint_secret={FP_SECRET}",  # on the command line, visible in ps
        )
        yield Deployment(broker, good, bad, inputs)
    finally:
        broker.stop()


def traffic(proxy: MeterProxy) -> int:
    """Streamed and not, both SDKs, every key header, a non-2xx and a client that hangs up;
    returns how many envelopes it makes."""
    oai = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY_BEARER, max_retries=0)
    oai.chat.completions.create(model="demo-chat", messages=CHAT)
    "".join(
        chunk.choices[0].delta.content or ""
        for chunk in oai.chat.completions.create(model="demo-chat", messages=CHAT, stream=True)
        if chunk.choices
    )
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(
            model="demo-chat", messages=CHAT, extra_headers={"x-demo-status": "429"}
        )
    claude = anthropic.Anthropic(base_url=proxy.url, api_key=KEY_X_API, max_retries=0)
    claude.messages.create(model="claude-demo", max_tokens=64, messages=CHAT)
    with claude.messages.stream(model="claude-demo", max_tokens=64, messages=CHAT) as stream:
        "".join(stream.text_stream)
    answer = httpx2.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "demo-chat", "messages": CHAT},
        headers={"api-key": KEY_AZURE},
        timeout=10,
    )
    assert answer.status_code == 200
    slow = {"authorization": f"Bearer {KEY_BEARER}", "x-demo-chunk-size": "16"}
    slow["x-demo-delay-ms"] = "30"
    with (
        httpx2.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{proxy.url}/v1/chat/completions",
            json={"model": "demo-chat", "messages": CHAT, "stream": True},
            headers=slow,
        ) as response,
    ):
        next(response.iter_raw())  # then hang up mid-stream
    return 6


def wait_for_stream(
    url: str, count: int, timeout: float = 30
) -> list[tuple[dict[str, str], bytes]]:
    async def poll() -> list[tuple[dict[str, str], bytes]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [(h or {}, d) for h, d in await stream_messages(url, "CATALYST_SME")]
            if len(found) >= count or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.1)

    return asyncio.run(poll())


def test_no_artifact_of_real_traffic_holds_a_key_or_a_credential(
    deployment: Deployment, meter_factory: MeterFactory
) -> None:
    expected = traffic(deployment.good)
    traffic(deployment.bad)
    messages = wait_for_stream(deployment.url, expected)
    assert len(messages) == expected
    assert deployment.bad.log_tail().count("cannot connect to NATS") >= 1
    for proxy in (deployment.good, deployment.bad):
        proxy.stop()

    artifacts: dict[str, bytes] = {
        f"stream message {n}": json.dumps(headers).encode() + data
        for n, (headers, data) in enumerate(messages)
    }
    for path in sorted(meter_factory.work_dir.rglob("*")):
        if path.is_file():  # spool (SQLite, WAL), dead letters, mitmdump logs
            artifacts[str(path)] = path.read_bytes()
    assert {deployment.good.log_path.name, "cache.db"} <= {Path(p).name for p in artifacts}

    found = {name: what for name, data in artifacts.items() if (what := leaks(data))}
    assert found == {}

    # The search looks at what matters: keyed fingerprints, customers and requests are there.
    everything = b"\n".join(artifacts.values())
    for key in (KEY_BEARER, KEY_X_API, KEY_AZURE):
        assert fingerprint(key, FP_SECRET.encode()).encode() in everything
    # The meter that never reached its broker still holds its envelopes in its spool.
    unsent = b"".join(
        v for k, v in artifacts.items() if k.startswith(str(deployment.bad.spool_dir))
    )
    assert fingerprint(KEY_BEARER, FP_SECRET.encode()).encode() in unsent
    assert b"POST" in deployment.good.log_path.read_bytes()
    assert b"unknown_key" in everything


def refused(factory: MeterFactory, upstream: str, *options: str) -> bytes:
    """What mitmdump printed before it exited for a refused option (it may listen for a moment
    first, so it may also be seen to start)."""
    try:
        proxy = factory.start(upstream, "nats://127.0.0.1:4222", *options)
    except RuntimeError as e:
        return str(e).encode() + factory.started[-1].log_path.read_bytes()
    assert proxy.proc is not None
    assert proxy.proc.wait(timeout=30) != 0
    return proxy.log_path.read_bytes()


def test_a_refused_option_stops_mitmdump_without_echoing_a_secret(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, tmp_path: Path
) -> None:
    pasted = tmp_path / "keys.toml"  # an operator pasted a key where its fingerprint belongs
    pasted.write_text(f'[keys."{KEY_BEARER}"]\ntenant = "t"\ncustomer = "c"\n')
    for options in [
        (f"meter_nats_url=nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:notaport",),
        ("meter_attribution=keymap", f"meter_keymap={pasted}"),
    ]:
        output = refused(meter_factory, demo_upstream.url, *options)
        assert b"OptionsError: meter_" in output  # mitmdump said which option it refused
        assert leaks(output) == []


def test_mitmproxys_own_flow_dump_is_where_headers_would_show(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo
) -> None:
    """Why docs/SECURITY.md says to keep flow_detail at 0 or 1: from 2 on, mitmdump itself prints
    request headers, keys included. That is mitmproxy's output, not the meter's."""
    proxy = meter_factory.start(
        demo_upstream.url,
        "nats://127.0.0.1:1",
        "flow_detail=2",
        "meter_shutdown_drain_ms=0",
        "meter_shutdown_grace_ms=0",
    )
    http_key = "sk-SECRET-flowdetail-11aa"
    httpx2.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "demo-chat", "messages": CHAT},
        headers={"authorization": f"Bearer {http_key}"},
        timeout=10,
    )
    proxy.stop()
    assert http_key.encode() in proxy.log_path.read_bytes()


def test_security_md_names_only_tests_that_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(tests/test_\w+\.py)::(\w+)", doc))
    missing = [
        f"{file}::{name}"
        for file, name in sorted(named)
        if not (root / file).is_file()
        or not re.search(rf"^(async )?def {name}\(", (root / file).read_text(), re.MULTILINE)
    ]
    assert len(named) > 40
    assert missing == []
