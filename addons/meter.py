"""edgemeter's mitmproxy addon: meters /v1/* LLM responses into a write-ahead spool that a
background task publishes to NATS JetStream. Load it with `mitmdump -s addons/meter.py`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

try:
    import edgemeter  # noqa: F401
except ImportError:  # a checkout run with a mitmproxy that does not have edgemeter installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy import command, contentviews, ctx, exceptions, http

from edgemeter import dispatch, include_usage
from edgemeter import envelope as envelope_mod
from edgemeter.admin import AdminServer, Histograms, Snapshot, Thresholds, bind
from edgemeter.attribution import (
    attribute,
    header_id,
    header_names,
    picked_headers,
    source_of,
)
from edgemeter.decoding import DecodeError, decode_body
from edgemeter.errors import MeterError, SettingsError, SpoolFullError
from edgemeter.flowmeter import FlowMeter, Limits, Request
from edgemeter.ids import uuid7, uuid7_ms
from edgemeter.keymap import KeyBook
from edgemeter.prices import PriceBook
from edgemeter.settings import Settings, default_spool_dir, parse_settings
from edgemeter.usage import classify, clean_name
from edgemeter.webview import UsageContentview, annotation
from spool.deadletter import DeadLetters
from spool.publisher import NatsConfig, Publisher, check_creds_file
from spool.store import Spool

logger = logging.getLogger("edgemeter")

# mitmproxy options this addon declares: (name, type, default, help).
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    (
        "meter_nats_url",
        str,
        "nats://127.0.0.1:4222",
        """Comma-separated NATS server URLs of the JetStream cluster the envelopes are published
        to. The meter connects in the background and never waits for the broker at startup.""",
    ),
    (
        "meter_nats_creds",
        str,
        "",
        """Path to a NATS credentials file (JWT and nkey seed) used to authenticate to the
        broker. Empty: no credentials file.""",
    ),
    (
        "meter_nats_token",
        str,
        "",
        """Token used to authenticate to the broker. Never logged. Empty: no token.""",
    ),
    (
        "meter_nats_user",
        str,
        "",
        """User name used to authenticate to the broker, together with meter_nats_password.""",
    ),
    (
        "meter_nats_password",
        str,
        "",
        """Password used to authenticate to the broker, together with meter_nats_user.
        Never logged.""",
    ),
    (
        "meter_nats_tls_ca",
        str,
        "",
        """PEM file of the CA that signed the broker's certificate. Server certificates are
        always verified, with the host name checked, when the URL is tls:// or a CA is set.""",
    ),
    (
        "meter_nats_tls_cert",
        str,
        "",
        """PEM client certificate for brokers that require mutual TLS (with meter_nats_tls_key).""",
    ),
    (
        "meter_nats_tls_key",
        str,
        "",
        """PEM private key of meter_nats_tls_cert.""",
    ),
    (
        "meter_subject",
        str,
        "catalyst.usage.recorded",
        """Subject every usage envelope is published on. A JetStream stream owned by the billing
        consumer must bind it; the meter never creates or changes streams.""",
    ),
    (
        "meter_spool_dir",
        str,
        "",
        f"""Directory of the write-ahead spool (diskcache) where every envelope is committed
        before it is published and stays until the broker acknowledged it. Created 0700. Empty:
        the platform data directory ({default_spool_dir()}).""",
    ),
    (
        "meter_spool_sync",
        str,
        "normal",
        """How the spool syncs to disk: normal survives a crash of the meter process (SQLite WAL
        with synchronous=NORMAL); full also survives power loss, at several times the cost per
        commit.""",
    ),
    (
        "meter_spool_max_mb",
        int,
        1024,
        """Most envelope data the spool holds, in MiB (0: no limit). A spool reaches it only when
        the broker has been away for long; what happens then is meter_on_spool_full.""",
    ),
    (
        "meter_on_spool_full",
        str,
        "serve",
        """What to do while the spool is full or its disk does not take writes. serve: keep
        proxying; every envelope that cannot be spooled is counted (spool failures) and an ERROR
        is logged once a minute. reject: answer new metered requests 503 before they reach the
        upstream, so no request goes unbilled.""",
    ),
    (
        "meter_paths",
        str,
        "/v1/",
        """Comma-separated request path prefixes that are metered. Responses to other paths
        (e.g. a gateway's /api/ admin surface) pass through without metering.""",
    ),
    (
        "meter_price_micro_per_token",
        int,
        156,
        """Flat price per token in micro-units of meter_currency, used when no price table entry
        matches the model. Amounts are exact integers: tokens times this price.""",
    ),
    (
        "meter_prices",
        str,
        "",
        """Path to a price table (per model, per token kind), reloaded when the file changes.
        Empty: flat pricing only.""",
    ),
    (
        "meter_currency",
        str,
        "OMR",
        """ISO 4217 code of the currency the amounts are in. The envelope's amount fields keep
        the seed's names (amount_omr, amount_micro_omr) whatever the currency.""",
    ),
    (
        "meter_tenant_header",
        str,
        "x-tenant-id",
        """Request header carrying the tenant id the usage is attributed to.""",
    ),
    (
        "meter_customer_header",
        str,
        "x-customer-id",
        """Request header carrying the customer id whose ledger the usage is debited from.""",
    ),
    (
        "meter_attribution",
        str,
        "headers",
        """Where a request's tenant and customer come from. headers: meter_tenant_header and
        meter_customer_header, which any client can set, so only safe behind an ingress that
        overwrites them. keymap: the key map (meter_keymap) entry of the request's API key
        fingerprint; the client's tenant and customer headers are ignored, and a request whose
        key is not in the map is billed with an empty customer_id, marked attribution
        unknown_key and counted. Changing it needs a restart.""",
    ),
    (
        "meter_keymap",
        str,
        "",
        """Path of the key map used when meter_attribution=keymap: a TOML file mapping API key
        fingerprints to tenant and customer, reloaded when it changes (a bad change keeps the
        last good map and logs an ERROR). Required in keymap mode, refused otherwise.""",
    ),
    (
        "meter_fingerprint_secret",
        str,
        "",
        """Secret of the HMAC-SHA256 that makes api_key_fingerprint ("hmac:" and 16 hex digits).
        Empty: a plain SHA-256 prefix (16 hex digits), which anyone holding a candidate key can
        recompute. Never logged; prefer meter_fingerprint_secret_file, since a command line is
        visible to every user of the host.""",
    ),
    (
        "meter_fingerprint_secret_file",
        str,
        "",
        """File holding meter_fingerprint_secret, read when options are set; one trailing
        newline is dropped.""",
    ),
    (
        "meter_stream_usage",
        str,
        "inject-strip",
        """inject-strip: ask the upstream for stream usage (stream_options.include_usage) when
        the client did not, and remove the added usage event from what the client sees; inject:
        ask but do not strip; off: never change a request or a response byte.""",
    ),
    (
        "meter_publish_timeout_ms",
        int,
        5000,
        """How long to wait for the broker's ack of one publish, in milliseconds. A timed-out
        publish is retried with the same Nats-Msg-Id, so the broker drops the duplicate.""",
    ),
    (
        "meter_publish_linger_ms",
        int,
        250,
        """How long the publisher lets envelopes gather before it publishes them, in
        milliseconds (at most; 256 waiting go at once). Envelopes are on disk before this
        starts: a longer linger only delays them on the stream, and lets one batch of
        publishes, acks and deletes serve many of them (a trickle costs far less CPU). 0
        publishes each commit at once.""",
    ),
    (
        "meter_shutdown_drain_ms",
        int,
        5000,
        """On shutdown, how long to keep publishing what is spooled, in milliseconds. What is
        not acknowledged by then stays spooled for the next start.""",
    ),
    (
        "meter_shutdown_grace_ms",
        int,
        10000,
        """On shutdown, how long requests in flight (streams above all) get to finish before
        the final drain, in milliseconds; new metered requests are answered 503 meanwhile. A
        request still open at the end is billed as client_aborted.""",
    ),
    (
        "meter_anthropic_counts",
        str,
        "",
        """Routes whose OpenAI-shaped usage follows Anthropic's token convention (prompt_tokens
        without cache reads and writes, as NewAPI reports Claude models): comma-separated
        PATH_PREFIX@MODEL_GLOB, or MODEL_GLOB for every metered path, e.g. claude-*. Their cached
        and cache-write tokens are added to input_tokens.""",
    ),
    (
        "meter_max_body_mb",
        int,
        16,
        """Largest non-streamed body, in MiB (decoded, and as it came), that is parsed for usage;
        also the largest request body read for include_usage and estimates. A larger response
        passes through untouched, only its end is scanned for the usage object, and it is
        counted as oversize (billed on the estimate if no usage is found there).""",
    ),
    (
        "meter_max_event_kb",
        int,
        1024,
        """Largest single SSE event, in KiB, the meter parses or holds. A larger one stops
        parsing of that stream only (counted as oversize_event, billed on what was seen); its
        bytes still flow on unchanged, and inject-strip stops stripping that stream.""",
    ),
    (
        "meter_admin_listen",
        str,
        "127.0.0.1:9464",
        """host:port of the admin endpoint: /healthz (the proxy's event loop answers), /readyz
        (the meter can record requests) and /metrics (Prometheus text). Empty disables it.""",
    ),
    (
        "meter_ready_broker_down_s",
        int,
        0,
        """/readyz answers 503 once the broker has been unreachable this many seconds (the
        proxy keeps serving and spooling meanwhile). 0: the broker never makes it unready, the
        right choice for a sidecar, whose readiness is its gateway's.""",
    ),
    (
        "meter_ready_spool_age_s",
        int,
        0,
        """/readyz answers 503 while the oldest spooled envelope is this many seconds old
        (envelopes are not reaching the stream). 0: spool age never makes it unready.""",
    ),
    (
        "meter_tune_mitmproxy",
        bool,
        True,
        """Under mitmdump and mitmweb, give mitmproxy the lean runner's two tunings while the
        meter runs: each event goes only to the addons that implement it, instead of a walk
        over all ~40 addons for every event of every flow (same hooks, same order; about half
        of mitmdump's CPU per request), and the objects alive at startup are frozen out of
        garbage collection (gc.freeze), so a full collection no longer pauses the proxy for
        tens of milliseconds walking them. false leaves mitmproxy as it is.""",
    ),
)

_ERROR_LOG_INTERVAL_S = 60.0
# Longer paths (or ones with characters unfit for an envelope) are left out of metadata.path.
_MAX_PATH_CHARS = 2048

# The answer to a metered request while the spool takes nothing (meter_on_spool_full=reject):
# OpenAI-shaped, so SDKs surface the message, and retryable.
_SPOOL_FULL_BODY = (
    b'{"error":{"message":"the usage meter cannot record requests right now (spool full or '
    b'not writable); retry later","type":"server_error","code":"meter_spool_full"}}'
)


# Only these accept stream_options; adding it elsewhere would make the upstream reject the request.
_INJECTABLE = frozenset({"openai.chat", "openai.completions"})

# The answer to a metered request that arrives while the meter shuts down: it could end after
# the spool closed, unbilled. OpenAI-shaped and retryable (another replica takes it).
_SHUTTING_DOWN_BODY = (
    b'{"error":{"message":"the usage meter is shutting down; retry","type":"server_error",'
    b'"code":"meter_shutting_down"}}'
)


def nats_config(settings: Settings) -> NatsConfig:
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


class Meter:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        # The request headers requestheaders reads, picked in one pass over the fields
        # (mitmproxy's Headers lower-cases every field on every lookup).
        self.header_names: frozenset[str] = frozenset()
        self.spool: Spool | None = None
        # Next to the spool; created only when the broker first refuses an envelope for good.
        self.dead_letters: DeadLetters | None = None
        self.publisher: Publisher | None = None
        self.prices = PriceBook(None)
        # The key map of meter_attribution=keymap.
        self.keys: KeyBook | None = None
        # Metered requests in keymap mode with no key in the map (billed unattributed).
        self.unknown_keys = 0
        self.is_running = False
        self.flows: dict[str, FlowMeter] = {}
        # (api, outcome, usage_source) of every envelope spooled.
        self.metered: Counter[tuple[str, str, str]] = Counter()
        # Requests on a metered path that produced no envelope, by reason.
        self.unmetered: Counter[str] = Counter()
        # Envelopes spooled despite an anomaly (oversize, oversize_event, decompression_limit,
        # invalid_usage, invalid_model), by reason: billed on what could be read or estimated.
        self.anomalies: Counter[str] = Counter()
        # Envelopes that could not be spooled (lost to billing), by reason: full, write_failed.
        self.spool_failures: Counter[str] = Counter()
        # Metered requests answered 503 because the spool took nothing (meter_on_spool_full).
        self.rejected = 0
        # Tokens (by kind) and amount (micro-units, positive) of every envelope spooled.
        self.tokens: Counter[str] = Counter()
        self.amount_micro = 0
        self.histograms = Histograms()
        self.admin: AdminServer | None = None
        self._last_spool_error_log = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set by done(): new metered requests are answered 503 while the open ones finish.
        self.shutting_down = False
        # Spool writes awaited right now (done() waits for them before the final drain).
        self._spooling = 0
        # The addon manager this meter tuned (meter_tune_mitmproxy): it made it dispatch through
        # a hook cache, and froze the startup objects out of garbage collection with it.
        self._dispatching: Any = None

    def load(self, loader: Any) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, " ".join(help_text.split()))
        contentviews.add(UsageContentview())

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("meter_") for name in updated):
            return
        try:
            settings = parse_settings({name: getattr(ctx.options, name) for name, *_ in OPTIONS})
        except SettingsError as e:
            option = e.fields.get("option", "meter")
            if "value" not in e.fields:  # left out on purpose: a secret
                raise exceptions.OptionsError(f"{option}: {e.message}") from None
            raise exceptions.OptionsError(f"{option}={e.fields['value']!r}: {e.message}") from None
        if settings.nats_creds:
            try:
                # nats-py would spin on the event loop over a file without a user JWT.
                check_creds_file(settings.nats_creds)
            except MeterError as e:
                raise exceptions.OptionsError(f"meter_nats_creds: {e}") from None
        previous = self.settings
        if previous is None or (settings.prices_file, settings.currency) != (
            previous.prices_file,
            previous.currency,
        ):
            try:
                prices = PriceBook(settings.prices_file or None, currency=settings.currency)
            except MeterError as e:
                raise exceptions.OptionsError(
                    f"meter_prices={settings.prices_file!r}: {e}"
                ) from None
        else:
            prices = self.prices
        if self.is_running and previous and previous.attribution != settings.attribution:
            raise exceptions.OptionsError("meter_attribution needs a restart")
        keys = self._key_book(settings, previous)
        spool_spec = (settings.spool_dir, settings.spool_sync)
        if (
            previous is None
            or self.spool is None
            or spool_spec
            != (
                previous.spool_dir,
                previous.spool_sync,
            )
        ):
            if self.is_running:
                raise exceptions.OptionsError("meter_spool_dir and meter_spool_sync need a restart")
            self._open_spool(settings)
        assert self.spool is not None
        self.spool.max_bytes = settings.spool_max_bytes
        if self.is_running and previous and previous.admin_listen != settings.admin_listen:
            self._rebind_admin(settings)
        self.settings, self.prices, self.keys = settings, prices, keys
        self.header_names = header_names(settings, "x-request-id")
        if self.is_running and previous and nats_config(previous) != nats_config(settings):
            self._restart_publisher()
        if self.is_running:
            self._tune(settings.tune_mitmproxy)

    def _key_book(self, settings: Settings, previous: Settings | None) -> KeyBook | None:
        spec = (settings.keymap_file, bool(settings.fingerprint_secret))
        if previous and spec == (previous.keymap_file, bool(previous.fingerprint_secret)):
            return self.keys
        if not settings.keymap_file:
            return None
        try:
            return KeyBook(settings.keymap_file, keyed=spec[1])
        except MeterError as e:
            raise exceptions.OptionsError(f"meter_keymap={settings.keymap_file!r}: {e}") from None

    def _rebind_admin(self, settings: Settings) -> None:
        """Serve the admin endpoint where settings say; OptionsError if it cannot listen there."""
        sock = None
        if settings.admin_listen is not None:
            try:
                sock = bind(*settings.admin_listen)
            except MeterError as e:
                host, port = settings.admin_listen
                raise exceptions.OptionsError(f"meter_admin_listen='{host}:{port}': {e}") from None
        old, self.admin = self.admin, None
        if old is not None:
            self._keep(old.stop())
        if sock is not None:
            self.admin = AdminServer(sock, self._snapshot, self._thresholds, self.histograms)
            self._keep(self.admin.start())

    def _open_spool(self, settings: Settings) -> None:
        spool = Spool(
            settings.spool_dir,
            sync_full=settings.spool_sync == "full",
            max_bytes=settings.spool_max_bytes,
        )
        try:
            spool.open()
        except MeterError as e:
            raise exceptions.OptionsError(f"meter_spool_dir: {e}") from e
        if self.spool is not None:
            self.spool.close()
        if self.dead_letters is not None:
            self.dead_letters.close()
        self.spool = spool
        self.dead_letters = DeadLetters.of(settings.spool_dir)

    def running(self) -> None:
        self.is_running = True
        self._start_publisher()
        assert self.settings is not None
        self._tune(self.settings.tune_mitmproxy)
        # Bound here, not in configure: mitmproxy configures a script with the default options
        # before its --set values, and the default port may belong to someone else.
        try:
            self._rebind_admin(self.settings)
        except exceptions.OptionsError as e:
            # An ERROR before startup has finished makes mitmdump exit, with this message.
            logger.error(f"cannot start the admin endpoint: {e}")

    def _tune(self, on: bool) -> None:
        """Tune mitmproxy as the lean runner is tuned, or undo it. Only a stock addon manager
        is tuned: the lean runner's is tuned already, and freezes on its own."""
        manager = ctx.master.addons
        if on and self._dispatching is None and dispatch.install(manager):
            self._dispatching = manager
            # Startup leaves ~half a million long-lived objects that every full collection
            # would walk (50-60 ms of CPU with the loop stopped, measured in mitmdump).
            gc.collect()
            gc.freeze()
            logger.info(
                "meter: mitmproxy now hands each event only to the addons implementing it, "
                "and its startup objects are frozen out of garbage collection"
            )
        elif not on and self._dispatching is not None:
            dispatch.uninstall(self._dispatching)
            self._dispatching = None
            gc.unfreeze()

    def _start_publisher(self) -> None:
        assert self.settings is not None and self.spool is not None
        self.publisher = Publisher(self.spool, nats_config(self.settings), self.dead_letters)
        self.publisher.on_ack = self.histograms.publish.observe
        self.publisher.start()

    def _restart_publisher(self) -> None:
        old = self.publisher
        self._start_publisher()
        if old is not None:
            self._keep(old.stop(drain_timeout=0))

    # -- hooks, in flow order -------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        settings = self.settings
        if settings is None or not flow.live or flow.is_replay:
            return
        req = flow.request
        path = req.path
        if not path.startswith(settings.paths):
            return
        api = classify(path)
        if req.method != "POST" or api is None:
            return
        if self.shutting_down:
            flow.response = http.Response.make(
                503,
                _SHUTTING_DOWN_BODY,
                {"content-type": "application/json", "retry-after": "1", "connection": "close"},
            )
            return
        spool = self.spool
        if settings.on_spool_full == "reject" and (spool is None or not spool.accepting):
            # Before the upstream sees it: a request the meter cannot record is not served.
            self.rejected += 1
            flow.response = http.Response.make(
                503, _SPOOL_FULL_BODY, {"content-type": "application/json", "retry-after": "5"}
            )
            return
        headers = picked_headers(req.headers.fields, self.header_names)
        who = attribute(headers, settings, self.keys.lookup if self.keys else None)
        if who.source == "unknown_key":
            self.unknown_keys += 1
            if self.keys is not None:
                self.keys.report_unknown(who.fingerprint)
        if who.refused:
            self.anomalies["invalid_attribution_header"] += 1
        client_request_id = header_id(headers, "x-request-id") or ""
        self.flows[flow.id] = FlowMeter(
            Request(
                request_id=uuid7(),
                api=api,
                path=clean_name(path.split("?", 1)[0], _MAX_PATH_CHARS) or "",
                started_at=req.timestamp_start,
                tenant_id=who.tenant_id,
                customer_id=who.customer_id,
                client_request_id=client_request_id,
                api_key_fingerprint=who.fingerprint,
            ),
            Limits(settings.max_body_bytes, settings.max_event_bytes),
        )

    def request(self, flow: http.HTTPFlow) -> None:
        meter = self.flows.get(flow.id)
        if meter is None or self.settings is None:
            return
        # Kept for the requested model and estimates, parsed only if the answer lacks them.
        # Decoded within bounds: the body and its Content-Encoding are the client's.
        req = flow.request
        try:
            body = decode_body(
                req.raw_content or b"",
                req.headers.get("content-encoding", ""),
                self.settings.max_body_bytes,
            )
        except DecodeError:
            return  # too large, a bomb or unreadable: left as it is, estimated as empty
        meter.request_body = body
        if self.settings.stream_usage == "off" or meter.request.api not in _INJECTABLE:
            return
        if (injected := include_usage.inject(body)) is not None:
            flow.request.content = injected
            meter.injected = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meter = self.flows.get(flow.id)
        if meter is None or flow.response is None:
            return
        resp = flow.response
        if not 200 <= resp.status_code < 300:
            del self.flows[flow.id]
            self.unmetered["non_2xx"] += 1
            return
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            strip = self.settings is not None and self.settings.stream_usage == "inject-strip"
            encoding = resp.headers.get("content-encoding", "")
            if meter.start_stream(resp.status_code, encoding, strip):
                # Stripping a compressed stream sends it decoded: say so before headers go out.
                del resp.headers["content-encoding"]
            meter.on_final = self._spool_early
            resp.stream = meter

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None or flow.response is None:
            return None
        resp = flow.response
        if not meter.stream:
            encoding = resp.headers.get("content-encoding", "")
            meter.body(resp.status_code, resp.raw_content, encoding, resp.timestamp_start)
        # Awaited by mitmproxy before it sends the end of the response: the envelope is on disk
        # before the client has its last byte, without blocking the event loop on the write.
        return self._finish(meter, aborted=False, flow=flow)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None:
            return None
        if flow.response is None:
            self.unmetered["no_response"] += 1
            return None
        return self._finish(meter, aborted=True, flow=flow)

    def done(self) -> Awaitable[None] | None:
        """Returns the final drain as a task: mitmproxy awaits it on shutdown, and on a script
        reload (where hooks are called synchronously) it still runs on the loop.

        mitmproxy keeps serving while done() runs and cancels what is still open once it has
        returned, without an error hook. So open requests first get meter_shutdown_grace_ms to
        finish (new metered ones are answered 503) and those still open then are billed as cut
        off; only then is the spool drained and closed.
        """
        self.is_running = False
        self.shutting_down = True
        # Unloaded (or reloaded), the meter leaves mitmproxy's dispatch as it found it.
        self._tune(False)
        publisher, spool, dead = self.publisher, self.spool, self.dead_letters
        # self.spool stays until the open requests are billed.
        self.publisher = self.dead_letters = None
        # Stopped last: probes keep getting answers during the final drain.
        admin, self.admin = self.admin, None
        if publisher is None:
            self.spool = None
            if spool is not None:
                spool.close()
            if dead is not None:
                dead.close()
            return self._keep(admin.stop()) if admin is not None else None
        drain_s = (self.settings.shutdown_drain_ms if self.settings else 0) / 1000
        grace_s = (self.settings.shutdown_grace_ms if self.settings else 0) / 1000

        async def shutdown() -> None:
            await self._let_flows_finish(grace_s)
            self.spool = None
            left = await publisher.stop(drain_timeout=drain_s)
            if spool is not None:
                await asyncio.to_thread(spool.close)
            if dead is not None:
                await asyncio.to_thread(dead.close)
            if left:
                logger.warning(f"{left} envelopes stay spooled for the next start")
            if admin is not None:
                await admin.stop()

        return self._keep(shutdown())

    # -- internals ----------------------------------------------------------------------------

    async def _let_flows_finish(self, grace_s: float) -> None:
        """Wait up to grace_s for open metered requests and their spool writes; bill the
        streams still open then as client_aborted (the client is about to be cut off)."""
        deadline = time.monotonic() + grace_s
        while (self.flows or self._spooling) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.flows:
            return
        logger.warning(
            f"{len(self.flows)} requests still open after the shutdown grace period; "
            "streams among them are billed as client_aborted"
        )
        writes = []
        for flow_id in list(self.flows):
            meter = self.flows.pop(flow_id)
            if not meter.stream:
                # No answer yet: what the error hook does for a request that never got one.
                self.unmetered["no_response"] += 1
            elif (write := self._finish(meter, aborted=True)) is not None:
                writes.append(write)
        await asyncio.gather(*writes)

    def _spool_early(self, meter: FlowMeter) -> None:
        """Called by the stream callable once the upstream's last event is parsed, before that
        event goes to the client: the envelope's commit starts now, so a client that stops
        reading at [DONE] / message_stop and a meter that dies right after leave no gap where
        the client has everything and the spool nothing (the response hook still awaits the
        commit before the end of the body)."""
        spool = self.spool
        if spool is None:
            return
        try:
            envelope = self._envelope(meter, aborted=False)
            if envelope is None:
                meter.early = (None, None, 0.0)  # not billable, and already counted so
                return
            key = envelope["metadata"]["request_id"]
            meter.early = (envelope, self._submit(spool, key, envelope), time.monotonic())
        except Exception:
            # Never out of the stream callable: the end of the flow spools it instead.
            logger.warning("early spooling failed; spooling at the end of the response")

    def _finish(
        self, meter: FlowMeter, *, aborted: bool, flow: http.HTTPFlow | None = None
    ) -> Awaitable[None] | None:
        spool = self.spool
        if meter.early is not None:
            envelope, future, started = meter.early
            if envelope is None:
                return None
        elif spool is None or (envelope := self._envelope(meter, aborted=aborted)) is None:
            return None
        else:
            started = time.monotonic()
            future = self._submit(spool, envelope["metadata"]["request_id"], envelope)
        if flow is not None:
            # For mitmweb: the envelope on the flow, and what it says at a glance.
            flow.metadata["edgemeter"] = envelope
            flow.comment, flow.marked = annotation(envelope)
        return self._counted(self._spool(future, envelope["metadata"]["request_id"], started))

    def _envelope(self, meter: FlowMeter, *, aborted: bool) -> dict[str, Any] | None:
        """The request's envelope, counted in the metrics; None (counted) when not billable."""
        settings = self.settings
        if settings is None:
            return None
        prices, flat = self.prices, settings.price_micro_per_token
        result = meter.finish(
            aborted=aborted,
            now=time.time(),
            currency=settings.currency,
            price_of=lambda usage, model: prices.price(usage, model, flat),
            anthropic_counts=settings.anthropic_counts,
        )
        if result.envelope is None:
            self.unmetered[result.reason] += 1
            return None
        if result.reason:
            self.anomalies[result.reason] += 1
        meta = result.envelope["metadata"]
        meta["attribution"] = source_of(settings, result.envelope["customer_id"])
        self.metered[(meta["api"], meta["outcome"], meta["usage_source"])] += 1
        tokens = self.tokens
        tokens["input"] += meta["input_tokens"]
        tokens["cached_input"] += meta["cached_input_tokens"]
        tokens["cache_write"] += meta["cache_write_tokens"]
        tokens["output"] += meta["output_tokens"]
        tokens["reasoning"] += meta["reasoning_tokens"]
        self.amount_micro -= result.envelope["amount_micro_omr"]
        return result.envelope

    @staticmethod
    def _submit(spool: Spool, key: str, envelope: dict[str, Any]) -> asyncio.Future[None]:
        """Queue the envelope for the spool writer; a refusal comes back in the future."""
        try:
            return spool.enqueue(key, envelope_mod.encode(envelope))
        except Exception as e:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed

    async def _spool(self, future: asyncio.Future[None], key: str, started: float) -> None:
        try:
            await future
            self.histograms.added.observe(time.monotonic() - started)
        except Exception as e:
            # The customer's traffic is never broken by the meter: count, log, move on.
            self.spool_failures["full" if isinstance(e, SpoolFullError) else "write_failed"] += 1
            now = time.monotonic()
            if now - self._last_spool_error_log >= _ERROR_LOG_INTERVAL_S:
                self._last_spool_error_log = now
                lost = sum(self.spool_failures.values())
                logger.error(
                    f"envelope could not be spooled, request {key} goes unbilled "
                    f"({lost} so far): {e}"
                )

    async def _snapshot(self) -> Snapshot:
        """Counters read on the loop, spool figures read in a thread (they touch the disk)."""
        spool, dead, publisher = self.spool, self.dead_letters, self.publisher

        def disk() -> tuple[int, str | None, int]:
            envelopes = len(spool) if spool is not None else 0
            oldest = spool.oldest_key() if spool is not None else None
            return envelopes, oldest, len(dead) if dead is not None else 0

        try:
            envelopes, oldest, dead_letters = await asyncio.to_thread(disk)
        except MeterError:
            envelopes, oldest, dead_letters = 0, None, 0
        minted = uuid7_ms(oldest) if oldest else None
        stats = publisher.stats if publisher is not None else None
        down_since = stats.down_since if stats is not None else None
        return Snapshot(
            metered=dict(self.metered),
            unmetered=dict(self.unmetered),
            anomalies=dict(self.anomalies),
            tokens=dict(self.tokens),
            amount_micro=self.amount_micro,
            currency=self.settings.currency if self.settings else "",
            rejected=self.rejected,
            unknown_keys=self.unknown_keys,
            spool_failures=dict(self.spool_failures),
            spool_writable=spool is not None and spool.accepting,
            spool_envelopes=envelopes,
            spool_bytes=spool.held_bytes if spool is not None else 0,
            spool_oldest_age_s=max(time.time() - minted / 1000, 0.0) if minted else None,
            dead_letters=dead_letters,
            acked=stats.acked if stats else 0,
            duplicates=stats.duplicates if stats else 0,
            publish_errors=dict(stats.errors) if stats else {},
            broker_connected=bool(stats and stats.connected),
            broker_down_s=time.monotonic() - down_since if down_since is not None else None,
            stream_missing=bool(stats and stats.stream_missing),
        )

    def _thresholds(self) -> Thresholds:
        settings = self.settings
        if settings is None:
            return Thresholds()
        return Thresholds(
            settings.ready_broker_down_s,
            settings.ready_spool_age_s,
            spool_full_unready=settings.on_spool_full == "reject",
        )

    async def _counted(self, write: Awaitable[None]) -> None:
        self._spooling += 1
        try:
            await write
        finally:
            self._spooling -= 1

    def _keep(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- commands -----------------------------------------------------------------------------

    @command.command("meter.flush")
    def flush(self) -> str:
        """Publish what is spooled now, instead of at the publisher's next wake-up."""
        if self.publisher is None or self.spool is None:
            return "the meter is not running"
        self.publisher.notify()
        return f"publishing {len(self.spool)} spooled envelopes"

    @command.command("meter.status")
    def status(self) -> str:
        """Spool depth, publisher state and what was metered since start."""
        lines = [f"spooled: {len(self.spool) if self.spool else 0}"]
        if self.publisher is not None:
            st = self.publisher.stats
            lines.append(
                f"broker: {'connected' if st.connected else 'disconnected'}, acked {st.acked}, "
                f"duplicates {st.duplicates}, errors {sum(st.errors.values())}"
            )
        failures = ", ".join(f"{k} {n}" for k, n in sorted(self.spool_failures.items()))
        lines.append(f"spool failures: {failures or 0}")
        if self.dead_letters is not None:
            try:
                dead = str(len(self.dead_letters))
            except MeterError as e:
                dead = f"unreadable ({e})"
            moved = self.publisher.stats.dead_lettered if self.publisher else 0
            lines.append(f"dead letters: {dead} (moved since start: {moved})")
        if self.rejected:
            lines.append(f"rejected (spool full): {self.rejected}")
        if self.keys is not None:
            lines.append(f"unknown keys (billed unattributed): {self.unknown_keys}")
        for (api, outcome, source), n in sorted(self.metered.items()):
            lines.append(f"metered {api} {outcome} {source}: {n}")
        for reason, n in sorted(self.unmetered.items()):
            lines.append(f"not metered ({reason}): {n}")
        for reason, n in sorted(self.anomalies.items()):
            lines.append(f"metered despite {reason}: {n}")
        return "\n".join(lines)


addons: Sequence[object] = [Meter()]
