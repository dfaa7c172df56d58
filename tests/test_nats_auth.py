"""Connecting to a real deployment: token, user/password, credentials file (operator JWTs), TLS
and mutual TLS, each against a real nats-server configured that way; secrets never leak."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nkeys
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig

from edgemeter.ids import uuid7
from spool import NatsConfig, Publisher, Spool
from spool.publisher import _Attempt
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, NatsServer

SUBJECT = "catalyst.usage.recorded"
STREAM = "CATALYST_SME"
LOOPBACK = "127.0.0.1"


# -- certificates, made fresh for each test ------------------------------------------------------


@dataclass
class Pki:
    """A CA and what it signed, as PEM files in one directory."""

    directory: Path
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    name: str = "edgemeter test CA"

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            _builder(subject, subject, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, *, hosts: tuple[str, ...] = (), client: bool = False
    ) -> tuple[Path, Path]:
        """A leaf certificate for these host names / IPs (server) or for a client: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(subject, self.cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return cert_file, key_file


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


# -- operator mode: nkeys and JWTs, made fresh for each test --------------------------------------


def nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey), as `nsc` would write it."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode()
    signing_input = (
        _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + "." + _b64(json.dumps(claims).encode())
    )
    return signing_input + "." + _b64(issuer.sign(signing_input.encode()))


SEED_BLOCK = """-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------
"""
CREDS = (
    """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

"""
    + SEED_BLOCK
)


@dataclass
class Operator:
    """An operator, one account with JetStream, and users of it with credentials files."""

    directory: Path

    def __post_init__(self) -> None:
        self.operator = nkey(nkeys.PREFIX_BYTE_OPERATOR)
        op_pub = self.operator.public_key.decode()
        unlimited = {
            k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")
        }
        jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        # JetStream needs a system account, and is enabled for an account by its JWT's limits.
        self.system = nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        self.accounts = {
            self.system.public_key.decode(): jwt(
                self.operator,
                self.system.public_key.decode(),
                "SYS",
                {"type": "account", "limits": {**unlimited, "wildcards": True}},
            ),
            self.account.public_key.decode(): jwt(
                self.operator,
                self.account.public_key.decode(),
                "BILLING",
                {"type": "account", "limits": {**unlimited, **jetstream, "wildcards": True}},
            ),
        }
        self.operator_jwt = jwt(
            self.operator,
            op_pub,
            "edgemeter-test",
            {"type": "operator", "system_account": self.system.public_key.decode()},
        )

    def server_config(self) -> str:
        preload = ", ".join(f"{pub}: {token}" for pub, token in self.accounts.items())
        return (
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system.public_key.decode()}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{ {preload} }}\n"
        )

    def user_creds(self, name: str, *, signer: nkeys.KeyPair | None = None) -> tuple[Path, str]:
        """A credentials file for a new user: (path, its seed). A foreign signer makes a user the
        server does not trust."""
        user = nkey(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        token = jwt(signer or self.account, user.public_key.decode(), name, claims)
        seed = user.seed.decode()
        path = self.directory / f"{name}.creds"
        path.write_text(CREDS.format(jwt=token, seed=seed))
        path.chmod(0o600)
        return path, seed


# -- servers and clients --------------------------------------------------------------------------


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[str], NatsServer]]:
    """Starts nats-servers with JetStream and the given config text."""
    started: list[NatsServer] = []

    def start(config: str) -> NatsServer:
        n = len(started)
        conf = tmp_path / f"server{n}.conf"
        conf.write_text(config)
        server = NatsServer(store_dir=tmp_path / f"js{n}", extra_args=["-c", str(conf)])
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def tls_block(cert: Path, key: Path, *, ca: Path | None = None, verify: bool = False) -> str:
    lines = [f'cert_file: "{cert}"', f'key_file: "{key}"']
    if ca is not None:
        lines.append(f'ca_file: "{ca}"')
    if verify:
        lines.append("verify: true")
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"


def client_tls(config: NatsConfig) -> dict[str, Any]:
    """nats.connect() arguments for the test's own admin connection, from a NatsConfig."""
    kwargs: dict[str, Any] = {"allow_reconnect": False, "connect_timeout": 5}
    if config.token:
        kwargs["token"] = config.token
    if config.user:
        kwargs["user"], kwargs["password"] = config.user, config.password
    if config.creds_file:
        kwargs["user_credentials"] = config.creds_file
    if config.tls_ca_file:
        context = ssl.create_default_context(cafile=config.tls_ca_file)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        kwargs["tls"] = context
    return kwargs


async def create_stream(config: NatsConfig) -> None:
    nc = await nats.connect(list(config.servers), **client_tls(config))
    try:
        await nc.jsm().add_stream(
            StreamConfig(name=STREAM, subjects=["catalyst.>"], storage=StorageType.MEMORY)
        )
    finally:
        await nc.close()


async def stream_ids(config: NatsConfig) -> list[str]:
    nc = await nats.connect(list(config.servers), **client_tls(config))
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(STREAM)
        if not info.state.messages:
            return []  # an empty stream says first_seq 0, which get_msg refuses
        ids = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await jsm.get_msg(STREAM, seq)
            ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
        return ids
    finally:
        await nc.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


class RecordingPublisher(Publisher):
    """The real publisher; also keeps the text of every error nats-py reported to it."""

    def __init__(self, spool: Spool, config: NatsConfig) -> None:
        super().__init__(spool, config)
        self.seen: list[str] = []

    def _callbacks(self, nc: NATS, attempt: _Attempt) -> dict[str, Any]:
        callbacks = super()._callbacks(nc, attempt)
        inner = callbacks["error_cb"]

        async def error_cb(exc: Exception) -> None:
            self.seen.append(f"{exc!s} {exc!r}")
            await inner(exc)

        callbacks["error_cb"] = error_cb
        return callbacks


@pytest.fixture
async def deliver(spool: Spool) -> AsyncIterator[Callable[..., Any]]:
    """Spools one envelope and runs a publisher with the config: it must deliver it or, with
    refused_for, fail to connect for that reason (some attempts only see a reset)."""
    made: list[Publisher] = []

    async def run(config: NatsConfig, *, refused_for: str | None = None) -> RecordingPublisher:
        key = uuid7()
        await spool.put(key, b'{"metadata": {"request_id": "%s"}}' % key.encode())
        publisher = RecordingPublisher(spool, config)
        made.append(publisher)
        publisher.start()
        stats = publisher.stats
        if refused_for is None:
            await wait_until(lambda: len(spool) == 0)
            assert key in await stream_ids(config)
            assert stats.connected
        else:
            await wait_until(
                lambda: stats.errors["connect"] >= 2 and refused_for in stats.last_error.lower()
            )
            assert len(spool) == 1
            assert not stats.connected
            assert stats.last_error.startswith("cannot connect to NATS at ")
            assert stats.acked == 0
        await publisher.stop(0)
        if refused_for is not None:
            spool.delete([key])
        return publisher

    yield run
    for publisher in made:
        await publisher.stop(0)


def assert_never_leaked(
    secret: str, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    assert secret not in caplog.text
    assert secret not in publisher.stats.last_error
    assert isinstance(publisher, RecordingPublisher)
    assert all(secret not in text for text in publisher.seen)
    assert secret not in repr(publisher.config)


# -- the cases ------------------------------------------------------------------------------------

TOKEN = "tok-7f3a9c1e-right"
PASSWORD = "pw-b81d2e40-right"


@pytest.mark.parametrize(
    ("server_auth", "right", "wrong", "secret"),
    [
        (
            f'authorization {{ token: "{TOKEN}" }}',
            {"token": TOKEN},
            {"token": "tok-0000-wrong"},
            "tok-0000-wrong",
        ),
        (
            f'authorization {{ user: "meter", password: "{PASSWORD}" }}',
            {"user": "meter", "password": PASSWORD},
            {"user": "meter", "password": "pw-0000-wrong"},
            "pw-0000-wrong",
        ),
    ],
    ids=["token", "user-password"],
)
async def test_a_shared_secret_delivers_and_a_wrong_one_is_a_connect_error_never_logged(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    server_auth: str,
    right: dict[str, Any],
    wrong: dict[str, Any],
    secret: str,
) -> None:
    server = start_server(server_auth)
    good = NatsConfig(servers=(server.url,), subject=SUBJECT, **right)
    await create_stream(good)
    with caplog.at_level(logging.DEBUG):
        publisher = await deliver(
            NatsConfig(servers=(server.url,), subject=SUBJECT, **wrong), refused_for="authorization"
        )
    assert_never_leaked(secret, publisher, caplog)

    with caplog.at_level(logging.DEBUG):
        publisher = await deliver(good)
    assert_never_leaked(right.get("token", PASSWORD), publisher, caplog)


async def test_a_credentials_file_delivers_and_an_untrusted_user_is_refused(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    operator = Operator(tmp_path)
    server = start_server(operator.server_config())
    creds, _ = operator.user_creds("meter")
    good = NatsConfig(servers=(server.url,), subject=SUBJECT, creds_file=str(creds))
    await create_stream(good)
    await deliver(good)

    # A user JWT signed by an account the operator never issued: the server must refuse it.
    foreign, seed = operator.user_creds("intruder", signer=nkey(nkeys.PREFIX_BYTE_ACCOUNT))
    with caplog.at_level(logging.DEBUG):
        publisher = await deliver(
            NatsConfig(servers=(server.url,), subject=SUBJECT, creds_file=str(foreign)),
            refused_for="authorization",
        )
    assert_never_leaked(seed, publisher, caplog)


async def test_a_file_that_is_not_a_credentials_file_is_a_connect_error_not_a_hang(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    tmp_path: Path,
) -> None:
    operator = Operator(tmp_path)
    server = start_server(operator.server_config())
    # A seed without its JWT (an .nk file given for a .creds one): nats-py would read it in an
    # endless loop on the event loop.
    _, seed = operator.user_creds("meter")
    bogus = tmp_path / "seed-only.nk"
    bogus.write_text(SEED_BLOCK.format(seed=seed))
    publisher = await deliver(
        NatsConfig(servers=(server.url,), subject=SUBJECT, creds_file=str(bogus)),
        refused_for="not a nats credentials file",
    )
    assert seed not in publisher.stats.last_error


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.mark.parametrize(
    ("hosts", "trusted", "outcome"),
    [
        ((LOOPBACK,), True, "delivered"),
        (("broker.example",), True, "mismatch"),  # a certificate for another name
        ((LOOPBACK,), False, "CERTIFICATE_VERIFY_FAILED"),  # signed by a CA we do not trust
    ],
    ids=["right-name", "wrong-name", "unknown-ca"],
)
async def test_tls_checks_the_ca_and_the_server_name(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    pki: Pki,
    tmp_path: Path,
    hosts: tuple[str, ...],
    trusted: bool,
    outcome: str,
) -> None:
    issuer = pki if trusted else Pki(tmp_path / "other-ca", name="someone else's CA")
    cert, key = issuer.issue("broker", hosts=hosts)
    server = start_server(tls_block(cert, key) + f'authorization {{ token: "{TOKEN}" }}\n')
    url = f"tls://{LOOPBACK}:{server.port}"
    config = NatsConfig(servers=(url,), subject=SUBJECT, token=TOKEN, tls_ca_file=str(pki.ca_file))
    if outcome == "delivered":
        await create_stream(config)
        await deliver(config)
        return
    with caplog.at_level(logging.DEBUG):
        publisher = await deliver(config, refused_for=outcome.lower())
    assert_never_leaked(TOKEN, publisher, caplog)


async def test_mutual_tls_delivers_with_a_client_certificate_and_not_without(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    pki: Pki,
) -> None:
    cert, key = pki.issue("broker", hosts=(LOOPBACK, "localhost"))
    server = start_server(tls_block(cert, key, ca=pki.ca_file, verify=True))
    client_cert, client_key = pki.issue("meter", client=True)
    url = f"tls://{LOOPBACK}:{server.port}"
    base = NatsConfig(servers=(url,), subject=SUBJECT, tls_ca_file=str(pki.ca_file))
    mutual = NatsConfig(
        servers=(url,),
        subject=SUBJECT,
        tls_ca_file=str(pki.ca_file),
        tls_cert_file=str(client_cert),
        tls_key_file=str(client_key),
    )
    await create_stream(mutual)
    await deliver(mutual)
    await deliver(base, refused_for="")  # the server ends the handshake; its reason varies


@pytest.mark.parametrize("trusted", [True, False], ids=["right-ca", "wrong-ca"])
async def test_a_tls_url_never_falls_back_to_plaintext(
    start_server: Callable[[str], NatsServer],
    deliver: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    pki: Pki,
    tmp_path: Path,
    trusted: bool,
) -> None:
    # The broker offers TLS but also takes plaintext: nats-py alone would stay in plaintext and
    # send the token in the clear. With a CA that did not sign the broker's certificate the
    # meter must fail to connect; with the right one it delivers over TLS.
    cert, key = pki.issue("broker", hosts=(LOOPBACK,))
    server = start_server(
        tls_block(cert, key) + f'allow_non_tls: true\nauthorization {{ token: "{TOKEN}" }}\n'
    )
    ca = pki.ca_file if trusted else Pki(tmp_path / "other-ca").ca_file
    url = f"tls://{LOOPBACK}:{server.port}"
    config = NatsConfig(servers=(url,), subject=SUBJECT, token=TOKEN, tls_ca_file=str(ca))
    if trusted:
        await create_stream(config)
        await deliver(config)
        return
    with caplog.at_level(logging.DEBUG):
        publisher = await deliver(config, refused_for="certificate_verify_failed")
    assert_never_leaked(TOKEN, publisher, caplog)


def test_a_config_never_shows_its_secrets() -> None:
    config = NatsConfig(
        servers=("nats://x:4222",), subject=SUBJECT, token="t-secret", password="p-secret"
    )
    assert "t-secret" not in repr(config) and "p-secret" not in repr(config)
    assert "servers=('nats://x:4222',)" in repr(config)


# -- end to end: a real mitmdump with the --set meter_nats_* options --------------------------------


def test_the_meter_publishes_over_tls_with_a_token_set_as_options(
    start_server: Callable[[str], NatsServer],
    meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    pki: Pki,
) -> None:
    cert, key = pki.issue("broker", hosts=(LOOPBACK,))
    server = start_server(tls_block(cert, key) + f'authorization {{ token: "{TOKEN}" }}\n')
    url = f"tls://{LOOPBACK}:{server.port}"
    config = NatsConfig(servers=(url,), subject=SUBJECT, token=TOKEN, tls_ca_file=str(pki.ca_file))
    asyncio.run(create_stream(config))
    proxy = meter_factory.start(
        demo_upstream.url, url, f"meter_nats_token={TOKEN}", f"meter_nats_tls_ca={pki.ca_file}"
    )
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-test-tls", max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )

    deadline = time.monotonic() + 30
    while not (ids := asyncio.run(stream_ids(config))):
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.1)
    assert len(ids) == 1
    assert proxy.stop() == 0
    assert TOKEN not in proxy.log_path.read_text()
