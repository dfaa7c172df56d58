"""The admin endpoint: /healthz, /readyz and /metrics (Prometheus text), served on the proxy's own
event loop, so a loop that stops answering fails the liveness probe too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgemeter.errors import AdminError
from edgemeter.metering.contract import ATTRIBUTION_REASONS, REASONS
from edgemeter.metering.usage import TOKEN_KINDS
from edgemeter.stats import Distribution, GenAI, Histograms, Snapshot

logger = logging.getLogger(__name__)

_MAX_REQUEST_LINE: Final = 4096
_READ_TIMEOUT_S: Final = 5.0


# How the admin endpoint of `edgemeter serve --workers N` combines a gauge over its workers
# (edgemeter.aggregate): summed, the right rule for a quantity each worker holds (envelopes,
# bytes, dead letters), unless it is named here. Counters and histograms are always summed.
GROUP_GAUGES: Final[dict[str, Literal["min", "max"]]] = {
    "edgemeter_spool_writable": "min",  # 1 only if every worker's spool takes envelopes
    "edgemeter_broker_connected": "min",  # 1 only if every worker is connected
    "edgemeter_stream_missing": "max",  # 1 if any worker finds no stream
    "edgemeter_spool_oldest_age_seconds": "max",  # the oldest envelope of all
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When /readyz says not ready; 0 disables a check. A spool that takes nothing makes the
    meter unready only where it refuses requests for it (meter_on_spool_full=reject): with
    `serve` the operator chose to keep traffic flowing, and a sidecar's readiness is its
    gateway's."""

    broker_down_s: int = 0
    spool_age_s: int = 0
    spool_full_unready: bool = True


def readiness(snapshot: Snapshot, thresholds: Thresholds) -> list[str]:
    """Why the meter is not ready; empty when it is."""
    reasons = []
    if thresholds.spool_full_unready and not snapshot.spool_writable:
        reasons.append("spool is full or not writable")
    down = snapshot.broker_down_s
    if thresholds.broker_down_s and down is not None and down >= thresholds.broker_down_s:
        reasons.append(f"broker unreachable for {down:.0f}s (limit {thresholds.broker_down_s}s)")
    age = snapshot.spool_oldest_age_s
    if thresholds.spool_age_s and age is not None and age >= thresholds.spool_age_s:
        reasons.append(
            f"oldest spooled envelope is {age:.0f}s old (limit {thresholds.spool_age_s}s)"
        )
    return reasons


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        metered = CounterMetricFamily(
            "edgemeter_metered_requests",
            "Requests an envelope was spooled for.",
            labels=("api", "outcome", "usage_source"),
        )
        for (api, outcome, source), n in sorted(s.metered.items()):
            metered.add_metric((api, outcome, source), n)
        yield metered
        unmetered = CounterMetricFamily(
            "edgemeter_unmetered_requests",
            "Requests on a metered path that produced no envelope.",
            labels=("reason",),
        )
        for reason, n in sorted(s.unmetered.items()):
            unmetered.add_metric((reason,), n)
        yield unmetered
        anomalies = CounterMetricFamily(
            "edgemeter_metered_anomalies",
            "Envelopes billed despite a problem with the answer (invalid or oversize usage, "
            "hostile headers...): usage estimated or ids left out.",
            labels=("reason",),
        )
        for reason, n in sorted(s.anomalies.items()):
            anomalies.add_metric((reason,), n)
        yield anomalies
        tokens = CounterMetricFamily(
            "edgemeter_tokens", "Tokens in spooled envelopes, by kind.", labels=("kind",)
        )
        for kind in TOKEN_KINDS:
            tokens.add_metric((kind,), s.tokens.get(kind, 0))
        yield tokens
        amount = CounterMetricFamily(
            "edgemeter_amount_micro",
            "Amount debited in spooled envelopes billing will book (not those sent to "
            "reconciliation), in micro-units of the currency.",
            labels=("currency",),
        )
        amount.add_metric((s.currency,), s.amount_micro)
        yield amount
        yield CounterMetricFamily(
            "edgemeter_rejected_requests",
            "Metered requests answered 503 because the spool took nothing "
            "(meter_on_spool_full=reject).",
            value=s.rejected,
        )
        unbillable = CounterMetricFamily(
            "edgemeter_unbillable_requests",
            "Envelopes the billing consumer could not book as they came (no customer, no "
            "tenant, unknown key, zero amount...), by reason and where they went: "
            "reconciliation (meter_unbillable_subject) or house (the house account).",
            labels=("reason", "destination"),
        )
        # Every reason from the start at 0, so increase() sees the first one.
        series = {(reason, "reconciliation") for reason in REASONS}
        series |= {(reason, "house") for reason in ATTRIBUTION_REASONS}
        for reason, destination in sorted(series | set(s.unbillable)):
            unbillable.add_metric((reason, destination), s.unbillable.get((reason, destination), 0))
        yield unbillable
        yield CounterMetricFamily(
            "edgemeter_unknown_keys",
            "Metered requests whose API key the key map does not know (meter_attribution=keymap): "
            "billed without tenant and customer.",
            value=s.unknown_keys,
        )
        failures = CounterMetricFamily(
            "edgemeter_spool_failures",
            "Envelopes that could not be spooled (requests that go unbilled), by reason.",
            labels=("reason",),
        )
        for reason in sorted({"full", "write_failed", *s.spool_failures}):
            failures.add_metric((reason,), s.spool_failures.get(reason, 0))
        yield failures
        yield GaugeMetricFamily(
            "edgemeter_spool_writable", "1 when the spool takes envelopes.", s.spool_writable
        )
        yield GaugeMetricFamily(
            "edgemeter_spool_envelopes", "Envelopes waiting in the spool.", s.spool_envelopes
        )
        yield GaugeMetricFamily(
            "edgemeter_spool_bytes", "Bytes of envelopes waiting in the spool.", s.spool_bytes
        )
        yield GaugeMetricFamily(
            "edgemeter_spool_oldest_age_seconds",
            "Age of the oldest envelope in the spool (0 when empty).",
            s.spool_oldest_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "edgemeter_dead_letters",
            "Envelopes the broker refused for good, waiting in the dead-letter area.",
            s.dead_letters,
        )
        publishes = CounterMetricFamily(
            "edgemeter_publishes",
            "Publishes to JetStream by result: acked (new), duplicate (acked, already stored), "
            "error (by class).",
            labels=("result", "error"),
        )
        publishes.add_metric(("acked", ""), s.acked - s.duplicates)
        publishes.add_metric(("duplicate", ""), s.duplicates)
        for kind, n in sorted(s.publish_errors.items()):
            publishes.add_metric(("error", kind), n)
        yield publishes
        yield CounterMetricFamily(
            "edgemeter_adopted_envelopes",
            "Envelopes published from spools under meter_spool_dir that no running meter "
            "published (a worker that is gone, a single meter replaced by workers or back).",
            value=s.adopted,
        )
        yield GaugeMetricFamily(
            "edgemeter_broker_connected", "1 while connected to NATS.", s.broker_connected
        )
        yield GaugeMetricFamily(
            "edgemeter_stream_missing",
            "1 while no JetStream stream is bound to the subject.",
            s.stream_missing,
        )
        yield _model_amounts(s.genai)


# The labels of the GenAI metrics: the OpenTelemetry attributes with dots as underscores, as
# Envoy AI Gateway's Prometheus exporter writes them.
_GENAI_LABELS: Final = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_response_model")
# (name, help, label names, the GenAI attribute holding the distribution)
_GENAI_HISTOGRAMS: Final = (
    (
        "gen_ai_client_token_usage",
        "Tokens per billed request by gen_ai_token_type: input and output (every request), "
        "cached_input, cache_creation_input and reasoning (requests that had any; parts of "
        "input and output).",
        (*_GENAI_LABELS, "gen_ai_token_type"),
        "token_usage",
    ),
    (
        "gen_ai_server_request_duration_seconds",
        "Billed requests from their start to the response's last byte; error_type is the "
        "outcome of requests that did not complete (client_aborted, upstream_error).",
        (*_GENAI_LABELS, "error_type"),
        "duration",
    ),
    (
        "gen_ai_server_time_to_first_token_seconds",
        "Streamed billed requests from their start to the first byte of the response body.",
        _GENAI_LABELS,
        "ttft",
    ),
    (
        "gen_ai_server_time_per_output_token_seconds",
        "Completed streams: time after the first byte per output token after the first.",
        _GENAI_LABELS,
        "tpot",
    ),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def histogram_text(name: str, documentation: str, labels: tuple[str, ...], d: Distribution) -> str:
    """One histogram family in the Prometheus text format, written directly: prometheus-client's
    families took 186 ms for a hundred streamed models with every token type, this 8.5 ms."""
    les = [*(_go(bound) for bound in d.bounds), "+Inf"]
    doc = documentation.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
    add = lines.append
    for series in sorted(d.series):
        values = d.series[series]
        labelled = ",".join(f'{k}="{_label(v)}"' for k, v in zip(labels, series, strict=True))
        bucket = f'{name}_bucket{{{labelled},le="'
        running = 0.0
        for le, count in zip(les, values, strict=False):
            running += count
            add(f'{bucket}{le}"}} {running!r}')
        add(f"{name}_sum{{{labelled}}} {_go(values[-1])}")
        add(f"{name}_count{{{labelled}}} {running!r}")
    return "\n".join(lines) + "\n"


def _go(value: float) -> str:
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def genai_text(g: GenAI) -> bytes:
    """The per-model histograms under the OpenTelemetry GenAI semantic-convention names."""
    return "".join(
        histogram_text(name, doc, labels, getattr(g, attribute))
        for name, doc, labels, attribute in _GENAI_HISTOGRAMS
    ).encode()


def _model_amounts(g: GenAI) -> Metric:
    amount = CounterMetricFamily(
        "edgemeter_model_amount_micro",
        "Amount debited in spooled envelopes by model, in micro-units of the currency "
        "(models past meter_metrics_max_models as other).",
        labels=("gen_ai_response_model", "currency"),
    )
    for (model, currency), value in sorted(g.amount.items()):
        amount.add_metric((model, currency), value)
    return amount


def render_metrics(snapshot: Snapshot, histograms: Histograms) -> bytes:
    """The Prometheus text exposition of a snapshot and the histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    registry.register(histograms.publish)
    registry.register(histograms.added)
    return generate_latest(registry) + genai_text(snapshot.genai)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for the endpoint, bound now so a taken port stops startup."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as e:
        raise AdminError(f"cannot listen: {e.strerror or e}", host=host, port=port) from None


Response = tuple[int, str, bytes]


class Endpoint:
    """A tiny HTTP/1.1 server: GET only, one request per connection; `respond` answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.sock)
        host, port = self.address
        logger.info("admin endpoint at http://%s:%d (/healthz, /readyz, /metrics)", host, port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            self.sock.close()
            return
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()

    async def respond(self, method: str, path: str) -> Response:
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                line = await reader.readline()
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    if len(header) > _MAX_REQUEST_LINE:
                        return
            parts = line.decode("latin-1").split()
            if len(line) > _MAX_REQUEST_LINE or len(parts) != 3:
                status, ctype, body = 400, "text/plain; charset=utf-8", b"bad request\n"
            else:
                status, ctype, body = await self.respond(parts[0], parts[1])
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if parts[:1] == ["HEAD"] else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception as e:
            logger.warning(f"admin endpoint failed to answer: {e!r}")
            logger.debug("admin endpoint failed to answer", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class AdminServer(Endpoint):
    """The meter's admin endpoint."""

    def __init__(
        self,
        sock: socket.socket,
        snapshot: Callable[[], Awaitable[Snapshot]],
        thresholds: Callable[[], Thresholds],
        histograms: Histograms,
    ) -> None:
        super().__init__(sock)
        self.snapshot = snapshot
        self.thresholds = thresholds
        self.histograms = histograms

    async def respond(self, method: str, path: str) -> Response:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET\n"
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            reasons = readiness(await self.snapshot(), self.thresholds())
            if reasons:
                body = "not ready: " + "; ".join(reasons) + "\n"
                return 503, "text/plain; charset=utf-8", body.encode()
            return 200, "text/plain; charset=utf-8", b"ready\n"
        if path == "/metrics":
            # Rendered in a thread: with many models it takes milliseconds, which the proxy's
            # loop would otherwise spend not serving (the snapshot is a copy; the two
            # prometheus-client histograms lock themselves).
            snapshot = await self.snapshot()
            text = await asyncio.to_thread(render_metrics, snapshot, self.histograms)
            return 200, CONTENT_TYPE_LATEST, text
        return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /readyz, /metrics\n"


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


__all__ = [
    "GROUP_GAUGES",
    "AdminError",
    "AdminServer",
    "Endpoint",
    "Histograms",
    "Snapshot",
    "Thresholds",
    "bind",
    "readiness",
    "render_metrics",
]
