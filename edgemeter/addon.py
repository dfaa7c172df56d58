"""The meter, edgemeter's mitmproxy addon: each metered request's path through the metering wing
into the write-ahead spool that the publisher drains to NATS JetStream (docs/ARCHITECTURE.md).
"""

# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
# (mitmproxy's OptionsError and command decorator carry no annotations)
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from mitmproxy import command, contentviews, ctx, exceptions, http
from mitmproxy.version import VERSION

from edgemeter import hookcache
from edgemeter.admin import AdminServer, Thresholds, bind
from edgemeter.adoption import Adopter, own_spool_dir
from edgemeter.errors import DecodeError, MeterError, SettingsError
from edgemeter.ids import uuid7, uuid7_ms
from edgemeter.metering import apis, cloudevents
from edgemeter.metering import stream_usage as include_usage
from edgemeter.metering.attribution import (
    Spec as AttributionSpec,
)
from edgemeter.metering.attribution import (
    attribute,
    header_id,
    header_names,
    picked_headers,
)
from edgemeter.metering.contract import Routed, route
from edgemeter.metering.decoding import decode_body
from edgemeter.metering.envelope import encode
from edgemeter.metering.flow import DEFAULT_LIMITS, FlowMeter, Limits, Request, Result
from edgemeter.metering.keymap import KeyBook
from edgemeter.metering.prices import Price, PriceBook
from edgemeter.metering.realtime import RealtimeMeter
from edgemeter.metering.usage import Usage, clean_name
from edgemeter.options import OPTIONS
from edgemeter.settings import Settings, nats_config, parse_settings
from edgemeter.stats import Snapshot, Stats, status_text
from edgemeter.webview import UsageContentview, not_billed, record
from spool.deadletter import DeadLetters
from spool.errors import SpoolError, SpoolFullError, describe
from spool.lock import SpoolLock
from spool.publisher import Publisher, check_creds_file
from spool.routing import Route, pack
from spool.store import Spool

logger = logging.getLogger("edgemeter")

_ERROR_LOG_INTERVAL_S = 60.0
# The header that says why an envelope on the unbillable subject is there.
UNBILLABLE_REASON_HEADER = "Edgemeter-Unbillable-Reason"
# Models told about once each (units without a price): past this many, no more are remembered.
_MAX_WARNED_MODELS = 1024
# Longer paths (or ones with characters unfit for an envelope) are left out of metadata.path.
_MAX_PATH_CHARS = 2048
# The routes requestheaders remembers: paths up to this long, this many (then it starts over).
_MAX_ROUTED_PATH_CHARS = 256
_MAX_ROUTED_PATHS = 256

# The answer to a metered request while the spool takes nothing (meter_on_spool_full=reject):
# OpenAI-shaped, so SDKs surface the message, and retryable.
_SPOOL_FULL_BODY = (
    b'{"error":{"message":"the usage meter cannot record requests right now (spool full or '
    b'not writable); retry later","type":"server_error","code":"meter_spool_full"}}'
)


# The answer to a metered request that arrives while the meter shuts down: it could end after
# the spool closed, unbilled. OpenAI-shaped and retryable (another replica takes it).
_SHUTTING_DOWN_BODY = (
    b'{"error":{"message":"the usage meter is shutting down; retry","type":"server_error",'
    b'"code":"meter_shutting_down"}}'
)


def headers_get(
    fields: tuple[tuple[bytes, bytes], ...], first: bytes, second: bytes = b"\0"
) -> tuple[str, str]:
    """`Headers.get(first, "")` and `Headers.get(second, "")` of mitmproxy (names given in lower
    case): repeated fields folded with ", ", values decoded as it decodes them. One pass over
    the raw fields, where each `get` lower-cases every field name through three Python calls
    (measured: 1.4 µs a get, 0.5 µs for both here)."""
    one: bytes | None = None
    two: bytes | None = None
    for name, value in fields:
        name = name.lower()
        if name == first:
            one = value if one is None else one + b", " + value
        elif name == second:
            two = value if two is None else two + b", " + value
    return (
        "" if one is None else one.decode("utf-8", "surrogateescape"),
        "" if two is None else two.decode("utf-8", "surrogateescape"),
    )


def set_body(message: http.Message, body: bytes) -> None:
    """`message.content = body` for a message without Content-Encoding, the same fields in the
    end: Content-Length set to the body's length unless Transfer-Encoding is there (the first
    Content-Length field keeps its place and name, others go, one is added if none was), in one
    pass over the raw fields instead of mitmproxy's three lookups that lower-case every field
    name through Python calls (the request hook of a stream: ~121k -> ~61k Ir, callgrind)."""
    length = b"%d" % len(body)
    fields: list[tuple[bytes, bytes]] = []
    replaced = False
    for name, value in message.headers.fields:
        lower = name.lower()
        if lower == b"content-length":
            if not replaced:
                fields.append((name, length))
                replaced = True
        elif lower == b"transfer-encoding":
            message.raw_content = body
            return
        else:
            fields.append((name, value))
    if not replaced:
        fields.append((b"content-length", length))
    message.headers.fields = tuple(fields)
    message.raw_content = body


class Meter:
    def __init__(
        self, worker: int | None = None, admin_socket: socket.socket | None = None
    ) -> None:
        # Worker `worker` of `edgemeter serve --workers N` (edgemeter.supervisor): its spool is
        # meter_spool_dir/worker-<worker>, and its admin endpoint listens on `admin_socket`, the
        # supervisor's private listener for it (meter_admin_listen is the supervisor's).
        self.worker = worker
        self.admin_socket = admin_socket
        self.settings: Settings | None = None
        # The request headers requestheaders reads, picked in one pass over the fields
        # (mitmproxy's Headers lower-cases every field on every lookup).
        self.header_names: frozenset[str] = frozenset()
        self.limits = DEFAULT_LIMITS
        self.spool: Spool | None = None
        # Next to the spool; created only when the broker first refuses an envelope for good.
        self.dead_letters: DeadLetters | None = None
        self.publisher: Publisher | None = None
        # Publishes the spools of other meters under meter_spool_dir that nobody publishes.
        self.adopter: Adopter | None = None
        self.prices = PriceBook(None)
        # The key map of meter_attribution=keymap.
        self.keys: KeyBook | None = None
        self.who = AttributionSpec()
        self.is_running = False
        self.flows: dict[str, FlowMeter] = {}
        # (path, method) -> its shape and metadata.path: a handful of routes take nearly all
        # requests (measured: route and clean_name 0.8-1.5 µs a request, a hit 0.1).
        self._routes: dict[tuple[str, str], tuple[apis.Shape | None, str | None]] = {}
        # Realtime sessions (WebSockets), from the upgrade request to websocket_end.
        self.sessions: dict[str, RealtimeMeter] = {}
        # Models whose envelopes carried units without a price, each logged once.
        self._unpriced_models: set[str] = set()
        self.stats = Stats()
        self.admin: AdminServer | None = None
        self._last_spool_error_log = 0.0
        # Per reason: when the last unbillable request was logged, and how many since then.
        self._unbillable_logged: dict[str, float] = {}
        self._unbillable_unlogged: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set by done(): new metered requests are answered 503 while the open ones finish.
        self.shutting_down = False
        # Spool writes awaited right now (done() waits for them before the final drain).
        self._spooling = 0
        # The addon manager this meter tuned (meter_tune_mitmproxy): it made it dispatch through
        # a hook cache, and froze the startup objects out of garbage collection with it.
        self._dispatching: Any = None
        # The one log line saying this mitmproxy is not the release the hook cache was proven on.
        self._told_unproven = False

    def load(self, loader: Any) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.one_paragraph)
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
            except SpoolError as e:
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
        self.stats.genai.max_models = settings.metrics_max_models
        self.who = settings.attribution_spec
        self.header_names = header_names(self.who, "x-request-id", *apis.KEY_HEADERS)
        self.limits = Limits(settings.max_body_bytes, settings.max_event_bytes)
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
        if self.admin_socket is not None:
            return  # a worker's is its supervisor's listener for it (serve_admin)
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
            self.admin = AdminServer(sock, self._snapshot, self._thresholds, self.stats.histograms)
            self._keep(self.admin.start())

    def _open_spool(self, settings: Settings) -> None:
        directory = own_spool_dir(settings.spool_dir, self.worker)
        spool = Spool(
            directory,
            sync_full=settings.spool_sync == "full",
            max_bytes=settings.spool_max_bytes,
        )
        try:
            spool.open()
        except SpoolError as e:
            raise exceptions.OptionsError(f"meter_spool_dir: {e}") from e
        if self.spool is not None:
            self.spool.close()
        if self.dead_letters is not None:
            self.dead_letters.close()
        self.spool = spool
        self.dead_letters = DeadLetters.of(directory)

    def running(self) -> None:
        self.is_running = True
        self._start_publisher()
        assert self.settings is not None and self.spool is not None
        self.adopter = Adopter(
            self.settings.spool_dir, self.spool.directory, nats_config(self.settings)
        )
        self.adopter.start()
        self._tune(self.settings.tune_mitmproxy)
        if self.admin_socket is not None:
            return  # a worker's: its runner serves it once startup is through (serve_admin)
        # Bound here, not in configure: mitmproxy configures a script with the default options
        # before its --set values, and the default port may belong to someone else.
        try:
            self._rebind_admin(self.settings)
        except exceptions.OptionsError as e:
            # An ERROR before startup has finished makes mitmdump exit, with this message.
            logger.error(f"cannot start the admin endpoint: {e}")

    def serve_admin(self) -> None:
        """A worker's admin endpoint, on its supervisor's listener: the supervisor takes its
        first answer as "this worker started", so its runner calls this only once mitmproxy's
        startup is through without an error."""
        if self.admin_socket is not None and self.admin is None and self.is_running:
            self.admin = AdminServer(
                self.admin_socket, self._snapshot, self._thresholds, self.stats.histograms
            )
            self._keep(self.admin.start())

    def _tune(self, on: bool) -> None:
        """Tune mitmproxy as the lean runner is tuned, or undo it. Only a stock addon manager
        of the proven mitmproxy release is tuned: the lean runner's is tuned already, and
        freezes on its own."""
        manager = ctx.master.addons
        if on and self._dispatching is None:
            if not hookcache.proven():
                if not self._told_unproven:
                    self._told_unproven = True
                    logger.info(
                        f"meter: mitmproxy {VERSION} is not the release the hook cache "
                        f"was proven against ({hookcache.PROVEN_MITMPROXY}): dispatch left as it is"
                    )
                return
            if hookcache.install(manager):
                self._dispatching = manager
                hookcache.freeze()
                logger.info(
                    "meter: mitmproxy now hands each event only to the addons implementing it, "
                    "and its startup objects are frozen out of garbage collection"
                )
        elif not on and self._dispatching is not None:
            hookcache.uninstall(self._dispatching)
            self._dispatching = None
            hookcache.unfreeze()

    def _start_publisher(self) -> None:
        assert self.settings is not None and self.spool is not None
        self.publisher = Publisher(
            self.spool,
            nats_config(self.settings),
            self.dead_letters,
            # Taken in the background: a predecessor (a reloaded script, a meter still running
            # on this spool) publishes until it lets go; never both at once.
            lock=SpoolLock(self.spool.directory),
        )
        self.publisher.on_ack = self.stats.histograms.publish.observe
        self.publisher.start()

    def _restart_publisher(self) -> None:
        old = self.publisher
        self._start_publisher()
        if self.adopter is not None and self.settings is not None:
            self.adopter.config = nats_config(self.settings)  # from its next round on
        if old is not None:
            self._keep(old.stop(drain_timeout=0))

    # -- hooks, in flow order -------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        settings = self.settings
        if settings is None:
            return
        if not flow.live or flow.is_replay:
            # Never billed: a replay, or a flow read from a file (-r, mitmweb's Open), which
            # carries the envelope of the run that billed it.
            not_billed(flow, "replayed" if flow.is_replay else "loaded")
            return
        req = flow.request
        path = req.path
        if not path.startswith(settings.paths):
            return
        method = req.method
        # Keyed without the query: routing ignores it, and it may hold a key (Gemini's ?key=).
        bare = path.partition("?")[0] if "?" in path else path
        known = self._routes.get((bare, method))
        if known is None:
            known = apis.route(bare, method), clean_name(bare, _MAX_PATH_CHARS)
            if len(bare) <= _MAX_ROUTED_PATH_CHARS:
                if len(self._routes) >= _MAX_ROUTED_PATHS:
                    self._routes.clear()
                self._routes[(bare, method)] = known
        shape, clean_path = known
        if shape is None or shape.free:
            # Never silently ignored: a request on a metered path without an envelope is
            # counted, by why (a route no shape meters, a free one such as moderations).
            self.stats.unmetered["free" if shape is not None else "unknown_endpoint"] += 1
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
            self.stats.rejected += 1
            flow.response = http.Response.make(
                503, _SPOOL_FULL_BODY, {"content-type": "application/json", "retry-after": "5"}
            )
            return
        headers = picked_headers(req.headers.fields, self.header_names)
        own: list[str] = []  # keys only this route's API sends (Gemini's), after the usual ones
        if shape.key_header:
            own += headers.get_all(shape.key_header)
        if shape.key_param and "?" in path:
            own += req.query.get_all(shape.key_param)
        who = attribute(headers, self.who, self.keys.lookup if self.keys else None, own)
        if who.source == "unknown_key":
            self.stats.unknown_keys += 1
            if self.keys is not None:
                self.keys.report_unknown(who.fingerprint)
        if who.refused:
            self.stats.anomalies["invalid_attribution_header"] += 1
        client_request_id = header_id(headers, "x-request-id") or ""
        facts = Request(
            request_id=uuid7(),
            api=shape.api,
            path=clean_path or "",
            started_at=req.timestamp_start,
            tenant_id=who.tenant_id,
            customer_id=who.customer_id,
            client_request_id=client_request_id,
            api_key_fingerprint=who.fingerprint,
            attribution=who.source,
        )
        if shape.websocket:
            # Billed per event of the session, each envelope with an id of its own.
            model = req.query.get("model", "") if "?" in path else ""
            self.sessions[flow.id] = RealtimeMeter(facts, model, uuid7)
            return
        self.flows[flow.id] = FlowMeter(facts, self.limits)

    def request(self, flow: http.HTTPFlow) -> None:
        meter = self.flows.get(flow.id)
        if meter is None or self.settings is None:
            return
        # Kept for the requested model and estimates, parsed only if the answer lacks them.
        # Decoded within bounds: the body and its Content-Encoding are the client's.
        req = flow.request
        encoding, content_type = headers_get(
            req.headers.fields, b"content-encoding", b"content-type"
        )
        try:
            body = decode_body(req.raw_content or b"", encoding, self.settings.max_body_bytes)
        except DecodeError:
            return  # too large, a bomb or unreadable: left as it is, estimated as empty
        meter.request_body = body
        if meter.shape.asks:
            meter.request_type = content_type
        if self.settings.stream_usage == "off" or not meter.shape.stream_options:
            return
        if (injected := include_usage.inject(body)) is not None:
            if encoding:
                req.content = injected  # encoded as the client's body was
            else:
                set_body(req, injected)
            meter.injected = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meter = self.flows.get(flow.id)
        if meter is None or flow.response is None:
            if flow.id in self.sessions and flow.response is not None:
                self._session_answered(flow, flow.response.status_code)
            return
        resp = flow.response
        if not 200 <= resp.status_code < 300:
            del self.flows[flow.id]
            self.stats.unmetered["non_2xx"] += 1
            record(flow, None, {"not_billed": "non_2xx"})
            return
        content_type, encoding = headers_get(
            resp.headers.fields, b"content-type", b"content-encoding"
        )
        meter.response_type = content_type
        if content_type.startswith("text/event-stream"):
            strip = self.settings is not None and self.settings.stream_usage == "inject-strip"
            if meter.start_stream(resp.status_code, encoding, strip):
                # Stripping a compressed stream sends it decoded: say so before headers go out.
                del resp.headers["content-encoding"]
            meter.on_final = self._spool_early
            # The bound method, not the meter: calling an object through its type's __call__
            # costs ~950 Ir more per chunk (callgrind).
            resp.stream = meter.__call__

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None or flow.response is None:
            return None
        if flow.is_replay:
            # Server replay answered from a file (its request hook runs after the meter's): no
            # upstream served it.
            record(flow, None, {"not_billed": "replayed"})
            return None
        resp = flow.response
        if not meter.stream:
            encoding = headers_get(resp.headers.fields, b"content-encoding")[0]
            meter.body(resp.status_code, resp.raw_content, encoding, resp.timestamp_start)
        # Awaited by mitmproxy before it sends the end of the response: the envelope is on disk
        # before the client has its last byte, without blocking the event loop on the write.
        return self._finish(meter, aborted=False, flow=flow)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        meter = self.flows.pop(flow.id, None)
        if meter is None:
            if flow.websocket is None and self.sessions.pop(flow.id, None) is not None:
                self.stats.unmetered["no_response"] += 1  # the upgrade was never answered
            return None
        if flow.response is None:
            self.stats.unmetered["no_response"] += 1
            record(flow, None, {"not_billed": "no_response"})
            return None
        return self._finish(meter, aborted=True, flow=flow)

    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A Realtime message: a server event that bills (response.done, a transcription with
        usage) is spooled before mitmproxy passes it on, as a stream's last event is. Any
        live WebSocket flow keeps at most twice meter_websocket_keep messages in memory."""
        settings, websocket = self.settings, flow.websocket
        if settings is None or websocket is None:
            return None
        messages, keep = websocket.messages, settings.websocket_keep
        if keep and len(messages) > 2 * keep and flow.live and not flow.is_replay:
            # One cut per `keep` messages, not a shift of the list per message. Never a flow
            # read from a file (mitmweb's Open replays its messages through this hook): a
            # session kept for a dispute keeps all of it.
            del messages[:-keep]
        session = self.sessions.get(flow.id)
        if session is None:
            return None
        message = messages[-1]
        if message.from_client:
            session.client(message.content)
            return None
        results = session.server(
            message.content,
            now=time.time(),
            currency=settings.currency,
            price_of=self._price_of,
        )
        return self._spool_results(results, flow) if results else None

    def websocket_end(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The session is over (closed or broken): responses still open are billed cut off."""
        session = self.sessions.pop(flow.id, None)
        if session is None or self.settings is None:
            return None
        results = session.end(
            now=time.time(), currency=self.settings.currency, price_of=self._price_of
        )
        return self._spool_results(results, flow) if results else None

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
        if self.adopter is not None:
            # What it adopts stays for the next look of a meter that runs (kept: its count).
            self._keep(self.adopter.stop())
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
            if spool is not None:
                # The journal's last envelopes into the database now, so the final drain
                # publishes them. Bounded like the drain: a database another process keeps
                # locked must not hold the shutdown (the journal keeps them for the next start).
                try:
                    await asyncio.wait_for(spool.flush(), max(drain_s, 1.0))
                except (SpoolError, TimeoutError) as e:
                    logger.warning(
                        f"spool journal not flushed before the final drain: {describe(e)}"
                    )
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
        if self.sessions and self.settings is not None:
            # A Realtime session lasts as long as its client wants: what it has open is billed
            # now, as cut off, like a stream still open.
            sessions, self.sessions = list(self.sessions.values()), {}
            settings = self.settings
            for session in sessions:
                results = session.end(
                    now=time.time(), currency=settings.currency, price_of=self._price_of
                )
                if results and (write := self._spool_results(results)) is not None:
                    await write
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
                self.stats.unmetered["no_response"] += 1
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
            routed, value, reason = self._result(meter, aborted=False)
            if value is None:
                meter.early = (routed, None, 0.0, reason)  # nothing to spool, and counted so
                return
            key = meter.request.request_id
            meter.early = (routed, self._submit(spool, key, value), time.monotonic(), reason)
        except Exception:
            # Never out of the stream callable: the end of the flow spools it instead.
            logger.warning("early spooling failed; spooling at the end of the response")

    def _finish(
        self, meter: FlowMeter, *, aborted: bool, flow: http.HTTPFlow | None = None
    ) -> Awaitable[None] | None:
        spool, key = self.spool, meter.request.request_id
        routed: Routed | None
        future: asyncio.Future[None] | None = None
        started = 0.0
        if meter.early is not None:
            routed, future, started, reason = meter.early
        elif spool is None:
            return None
        else:
            routed, value, reason = self._result(meter, aborted=aborted)
            if value is not None:
                future, started = self._submit(spool, key, value), time.monotonic()
        if flow is not None:
            # For mitmweb: what was billed, where it went and what the meter changed.
            done = {
                "injected": meter.injected,
                "stripped": meter.stripped,
                "trimmed": meter.trimmed,
                "decoded": meter.decoded_out,
            }
            done["despite" if routed is not None else "not_billed"] = reason
            record(flow, routed, done)
        if future is None:
            return None
        return self._spooled(future, key, started)

    def _result(
        self, meter: FlowMeter, *, aborted: bool
    ) -> tuple[Routed | None, bytes | None, str]:
        """The request's envelope, where it goes (contract.route), the spool value that sends
        it there and the reason finish gave (billed despite, or why none), counted in the stats;
        no value for a request that is not billable."""
        settings = self.settings
        if settings is None:
            return None, None, "not_configured"
        result = meter.finish(
            aborted=aborted,
            now=time.time(),
            currency=settings.currency,
            price_of=self._price_of,
            anthropic_counts=settings.anthropic_counts,
        )
        return self._routed(meter.request.request_id, result)

    def _price_of(self, usage: Usage, model: str) -> Price:
        """The price of a usage; units the rule has no price for are counted (`unpriced`) and
        logged once per model, since they were billed nothing."""
        assert self.settings is not None
        price = self.prices.price(usage, model, self.settings.price_micro_per_token)
        if price.unpriced:
            self.stats.anomalies["unpriced"] += 1
            if (
                model not in self._unpriced_models
                and len(self._unpriced_models) < _MAX_WARNED_MODELS
            ):
                self._unpriced_models.add(model)
                logger.warning(
                    f"meter: {model!r} is billed in {', '.join(price.unpriced)} that "
                    f"{price.version} has no price for: those are billed nothing (the envelopes "
                    "carry them in metadata.units); add them to the price table (docs/PRICES.md)"
                )
        return price

    def _routed(self, request_id: str, result: Result) -> tuple[Routed | None, bytes | None, str]:
        """Where finish's envelope goes (contract.route) and the spool value that sends it
        there, counted in the stats; no value for a request that is not billable."""
        settings = self.settings
        assert settings is not None
        if result.envelope is None:
            self.stats.unmetered[result.reason] += 1
            return None, None, result.reason
        routed = route(result.envelope, house=settings.house)
        booked = routed.destination != "reconciliation"
        self.stats.billed(routed.envelope, result.reason, booked=booked)
        if routed.destination != "billing":
            self._unbillable(request_id, routed, settings)
        return routed, self._value(routed, result.data, settings), result.reason

    @staticmethod
    def _value(routed: Routed, built: bytes, settings: Settings) -> bytes:
        """The spool value that sends the envelope where it goes: for billing, the bytes
        finish encoded, as they are (unless meter_cloudevents adds its headers); else a value
        routed to the unbillable subject with the reason, or the re-attributed envelope."""
        unbillable = routed.destination == "reconciliation"
        data = built if routed.destination == "billing" else encode(routed.envelope)
        subject = settings.unbillable_subject if unbillable else ""
        headers = {UNBILLABLE_REASON_HEADER: routed.reason} if unbillable else {}
        if settings.cloudevents:
            headers |= cloudevents.headers(routed.envelope, unbillable=unbillable)
        return pack(Route(subject, headers), data) if subject or headers else data

    def _unbillable(self, request_id: str, routed: Routed, settings: Settings) -> None:
        """Count a request the consumer could not book as it came; log it, once a minute per
        reason (WARNING for reconciliation, INFO for the house account the operator chose)."""
        reason, destination = routed.reason, routed.destination
        self.stats.unbillable[(reason, destination)] += 1
        self.stats.last_unbillable = (request_id, reason, destination, time.time())
        now = time.monotonic()
        last = self._unbillable_logged.get(reason)
        if last is not None and now - last < _ERROR_LOG_INTERVAL_S:
            self._unbillable_unlogged[reason] += 1
            return
        self._unbillable_logged[reason] = now
        unlogged = self._unbillable_unlogged.pop(reason, 0)
        more = f" ({unlogged} more since the last such line)" if unlogged else ""
        if destination == "house":
            logger.info(
                f"request {request_id} cannot be billed as it came ({reason}): booked to the "
                f"house account {routed.envelope['customer_id']}{more}"
            )
            return
        logger.warning(
            f"request {request_id} cannot be billed ({reason}): published on "
            f"{settings.unbillable_subject} for reconciliation{more}"
        )

    def _session_answered(self, flow: http.HTTPFlow, status: int) -> None:
        """A Realtime upgrade's answer: 101 opens the session; anything else ends it unbilled."""
        if status == 101:
            return
        del self.sessions[flow.id]
        self.stats.unmetered["non_2xx" if not 200 <= status < 300 else "no_session"] += 1

    def _spool_results(
        self, results: list[Result], flow: http.HTTPFlow | None = None
    ) -> Awaitable[None] | None:
        """Spool a session's envelopes; the returned awaitable ends when all are committed."""
        spool = self.spool
        writes = []
        for result in results:
            if result.envelope is None:
                self.stats.unmetered[result.reason] += 1
                continue
            key = result.envelope["metadata"]["request_id"]
            routed, value, reason = self._routed(key, result)
            if value is not None and spool is not None:
                future, started = self._submit(spool, key, value), time.monotonic()
                if (write := self._spooled(future, key, started)) is not None:
                    writes.append(write)
            if flow is not None:
                # For mitmweb, as on HTTP flows: the session's latest envelope.
                record(flow, routed, {"despite": reason})
        if not writes:
            return None

        async def committed() -> None:
            await asyncio.gather(*writes)

        return self._counted(committed())

    def _submit(self, spool: Spool, key: str, data: bytes) -> asyncio.Future[None]:
        """Spool the envelope's bytes; a refusal comes back in the future. It comes back done
        when the spool's journal took it (nearly always: see Spool.enqueue)."""
        try:
            return spool.enqueue(key, data)
        except Exception as e:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed

    def _spooled(
        self, future: asyncio.Future[None], key: str, started: float
    ) -> Coroutine[Any, Any, None] | None:
        """What to await for an envelope handed to the spool: nothing once journaled (on disk
        already: no coroutine, no turn of the loop), else its commit (see _spool)."""
        if future.done() and not future.cancelled() and future.exception() is None:
            self.stats.histograms.added.observe(time.monotonic() - started)
            return None
        return self._spool(future, key, started)

    async def _spool(self, future: asyncio.Future[None], key: str, started: float) -> None:
        # Counted here, not by wrapping it in _counted: one coroutine a request, not two.
        self._spooling += 1
        try:
            await future
            self.stats.histograms.added.observe(time.monotonic() - started)
        except Exception as e:
            # The customer's traffic is never broken by the meter: count, log, move on.
            failures = self.stats.spool_failures
            failures["full" if isinstance(e, SpoolFullError) else "write_failed"] += 1
            now = time.monotonic()
            if now - self._last_spool_error_log >= _ERROR_LOG_INTERVAL_S:
                self._last_spool_error_log = now
                lost = sum(failures.values())
                logger.error(
                    f"envelope could not be spooled, request {key} goes unbilled "
                    f"({lost} so far): {e}"
                )
        finally:
            self._spooling -= 1

    async def _snapshot(self) -> Snapshot:
        """Counters read on the loop, spool figures read in a thread (they touch the disk)."""
        return self.snapshot(await asyncio.to_thread(self._disk))

    def _disk(self) -> tuple[int, str | None, int, str | None]:
        """Spooled envelopes, the oldest one's key, dead letters and how those read."""
        spool, dead = self.spool, self.dead_letters
        try:
            envelopes = spool.count() if spool is not None else 0
            oldest = spool.oldest_key() if spool is not None else None
        except SpoolError:
            envelopes, oldest = 0, None
        if dead is None:
            return envelopes, oldest, 0, None
        try:
            dead_letters = len(dead)
        except SpoolError as e:
            return envelopes, oldest, 0, f"unreadable ({e})"
        return envelopes, oldest, dead_letters, str(dead_letters)

    def snapshot(self, disk: tuple[int, str | None, int, str | None] | None = None) -> Snapshot:
        """The stats, the spool's figures (`_disk`, read now if not given) and the publisher's."""
        envelopes, oldest, dead_letters, dead_shown = disk or self._disk()
        spool, publisher, st = self.spool, self.publisher, self.stats
        minted = uuid7_ms(oldest) if oldest else None
        pub = publisher.stats if publisher is not None else None
        down_since = pub.down_since if pub is not None else None
        return Snapshot(
            metered=dict(st.metered),
            unmetered=dict(st.unmetered),
            anomalies=dict(st.anomalies),
            tokens=dict(st.tokens),
            amount_micro=st.amount_micro,
            currency=self.settings.currency if self.settings else "",
            rejected=st.rejected,
            unknown_keys=st.unknown_keys,
            spool_failures=dict(st.spool_failures),
            spool_writable=spool is not None and spool.accepting,
            spool_envelopes=envelopes,
            spool_bytes=spool.held_bytes if spool is not None else 0,
            spool_oldest_age_s=max(time.time() - minted / 1000, 0.0) if minted else None,
            dead_letters=dead_letters,
            acked=pub.acked if pub else 0,
            duplicates=pub.duplicates if pub else 0,
            publish_errors=dict(pub.errors) if pub else {},
            broker_connected=bool(pub and pub.connected),
            broker_down_s=time.monotonic() - down_since if down_since is not None else None,
            stream_missing=bool(pub and pub.stream_missing),
            publishing=publisher is not None,
            keymap=self.keys is not None,
            dead_letters_shown=dead_shown,
            dead_lettered=pub.dead_lettered if pub else 0,
            genai=st.genai.copy(),
            unbillable=dict(st.unbillable),
            last_unbillable=self._last_unbillable(),
            unbillable_subject=self.settings.unbillable_subject if self.settings else "",
            house_customer=self.settings.house.customer_id
            if self.settings and self.settings.house
            else "",
            adopted=self.adopter.published if self.adopter is not None else 0,
        )

    def _last_unbillable(self) -> tuple[str, str, str, float] | None:
        """The latest unbillable request, with how long ago it ended instead of when."""
        last = self.stats.last_unbillable
        if last is None:
            return None
        request_id, reason, destination, at = last
        return request_id, reason, destination, max(time.time() - at, 0.0)

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
        return f"publishing {self.spool.count()} spooled envelopes"

    @command.command("meter.status")
    def status(self) -> str:
        """Spool depth, publisher state and what was metered since start."""
        # mitmweb's command bar shows a result as one JSON string (a line break would read
        # as "\n"); the console shows lines.
        web = sys.modules.get("mitmproxy.tools.web.master")
        one_line = web is not None and isinstance(ctx.master, web.WebMaster)
        return status_text(self.snapshot(), one_line=one_line)
