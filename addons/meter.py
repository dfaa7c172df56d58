"""edgemeter's mitmproxy addon: meters /v1/* LLM responses into a write-ahead spool that a
background task publishes to NATS JetStream. Load it with `mitmdump -s addons/meter.py`.
"""

from __future__ import annotations

import asyncio
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

from mitmproxy import command, ctx, exceptions, http

from edgemeter import envelope as envelope_mod
from edgemeter import include_usage
from edgemeter.attribution import api_key, fingerprint
from edgemeter.errors import MeterError, SettingsError
from edgemeter.flowmeter import FlowMeter, Request
from edgemeter.ids import uuid7
from edgemeter.prices import PriceBook
from edgemeter.settings import Settings, default_spool_dir, parse_settings
from edgemeter.usage import classify
from spool.publisher import NatsConfig, Publisher
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
        "meter_shutdown_drain_ms",
        int,
        5000,
        """On shutdown, how long to keep publishing what is spooled, in milliseconds. What is
        not acknowledged by then stays spooled for the next start.""",
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
        "meter_admin_listen",
        str,
        "127.0.0.1:9464",
        """host:port of the admin endpoint (/healthz, /readyz, /metrics). Empty disables it.""",
    ),
)

_ERROR_LOG_INTERVAL_S = 60.0


# Only these accept stream_options; adding it elsewhere would make the upstream reject the request.
_INJECTABLE = frozenset({"openai.chat", "openai.completions"})


def nats_config(settings: Settings) -> NatsConfig:
    return NatsConfig(
        servers=settings.nats_servers,
        subject=settings.subject,
        publish_timeout_ms=settings.publish_timeout_ms,
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
        self.spool: Spool | None = None
        self.publisher: Publisher | None = None
        self.prices = PriceBook(None)
        self.is_running = False
        self.flows: dict[str, FlowMeter] = {}
        # (api, outcome, usage_source) of every envelope spooled.
        self.metered: Counter[tuple[str, str, str]] = Counter()
        # Requests on a metered path that produced no envelope, by reason.
        self.unmetered: Counter[str] = Counter()
        self.spool_failures = 0
        self._last_spool_error_log = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()

    def load(self, loader: Any) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, " ".join(help_text.split()))

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("meter_") for name in updated):
            return
        try:
            settings = parse_settings({name: getattr(ctx.options, name) for name, *_ in OPTIONS})
        except SettingsError as e:
            option, value = e.fields.get("option", "meter"), e.fields.get("value", "")
            raise exceptions.OptionsError(f"{option}={value!r}: {e.message}") from None
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
        self.settings, self.prices = settings, prices
        if self.is_running and previous and nats_config(previous) != nats_config(settings):
            self._restart_publisher()

    def _open_spool(self, settings: Settings) -> None:
        spool = Spool(settings.spool_dir, sync_full=settings.spool_sync == "full")
        try:
            spool.open()
        except MeterError as e:
            raise exceptions.OptionsError(f"meter_spool_dir: {e}") from e
        if self.spool is not None:
            self.spool.close()
        self.spool = spool

    def running(self) -> None:
        self.is_running = True
        self._start_publisher()

    def _start_publisher(self) -> None:
        assert self.settings is not None and self.spool is not None
        self.publisher = Publisher(self.spool, nats_config(self.settings))
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
        headers = req.headers
        self.flows[flow.id] = FlowMeter(
            Request(
                request_id=uuid7(),
                api=api,
                path=path.split("?", 1)[0],
                started_at=req.timestamp_start,
                tenant_id=headers.get(settings.tenant_header, ""),
                customer_id=headers.get(settings.customer_header, ""),
                client_request_id=headers.get("x-request-id", ""),
                api_key_fingerprint=fingerprint(api_key(headers)),
            )
        )

    def request(self, flow: http.HTTPFlow) -> None:
        meter = self.flows.get(flow.id)
        if meter is None or self.settings is None:
            return
        # Kept for the requested model and estimates, parsed only if the answer lacks them.
        body = meter.request_body = flow.request.get_content(strict=False) or b""
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
            resp.stream = meter

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None or flow.response is None:
            return None
        resp = flow.response
        if not meter.stream:
            try:
                content = resp.get_content(strict=False)
            except ValueError:
                content = None
            meter.body(resp.status_code, content, resp.timestamp_start)
        # Awaited by mitmproxy before it sends the end of the response: the envelope is on disk
        # before the client has its last byte, without blocking the event loop on the write.
        return self._finish(meter, aborted=False)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None:
            return None
        if flow.response is None:
            self.unmetered["no_response"] += 1
            return None
        return self._finish(meter, aborted=True)

    def done(self) -> Awaitable[None] | None:
        """Returns the final drain as a task: mitmproxy awaits it on shutdown, and on a script
        reload (where hooks are called synchronously) it still runs on the loop."""
        self.is_running = False
        publisher, spool = self.publisher, self.spool
        self.publisher = self.spool = None
        if publisher is None:
            if spool is not None:
                spool.close()
            return None
        drain_s = (self.settings.shutdown_drain_ms if self.settings else 0) / 1000

        async def shutdown() -> None:
            left = await publisher.stop(drain_timeout=drain_s)
            if spool is not None:
                await asyncio.to_thread(spool.close)
            if left:
                logger.warning(f"{left} envelopes stay spooled for the next start")

        return self._keep(shutdown())

    # -- internals ----------------------------------------------------------------------------

    def _finish(self, meter: FlowMeter, *, aborted: bool) -> Awaitable[None] | None:
        settings, spool = self.settings, self.spool
        if settings is None or spool is None:
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
        meta = result.envelope["metadata"]
        self.metered[(meta["api"], meta["outcome"], meta["usage_source"])] += 1
        return self._spool(spool, meta["request_id"], envelope_mod.encode(result.envelope))

    async def _spool(self, spool: Spool, key: str, data: bytes) -> None:
        try:
            await spool.put(key, data)
        except Exception as e:
            # The customer's traffic is never broken by the meter: count, log, move on.
            self.spool_failures += 1
            now = time.monotonic()
            if now - self._last_spool_error_log >= _ERROR_LOG_INTERVAL_S:
                self._last_spool_error_log = now
                logger.error(f"envelope could not be spooled ({self.spool_failures} so far): {e}")

    def _keep(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- commands -----------------------------------------------------------------------------

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
        lines.append(f"spool failures: {self.spool_failures}")
        for (api, outcome, source), n in sorted(self.metered.items()):
            lines.append(f"metered {api} {outcome} {source}: {n}")
        for reason, n in sorted(self.unmetered.items()):
            lines.append(f"not metered ({reason}): {n}")
        return "\n".join(lines)


addons: Sequence[object] = [Meter()]
