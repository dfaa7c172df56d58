"""What the meter counted since it started: one `Stats` the addon updates as requests end, and
the `Snapshot` that /metrics, /readyz and `meter.status` all read at one instant.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Histogram

from edgemeter.metering.usage import TOKEN_KINDS

# (kind, the envelope's field of it), made once: billed() runs for every request.
_TOKEN_FIELDS: Final = tuple((kind, f"{kind}_tokens") for kind in TOKEN_KINDS)

# Milliseconds to seconds: publishes take a few ms locally, seconds when the broker struggles.
_PUBLISH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The write-ahead wait before a response's last byte: ~0.1 ms normally, more under disk pressure.
_ADDED_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)

# The OpenTelemetry GenAI semantic conventions' bucket boundaries (gen-ai-metrics.md, v1.41):
# tokens per request, request duration, time per output token. Time to first token takes
# Envoy AI Gateway's extension of the spec's boundaries past 10 s (reasoning models think longer).
TOKEN_BUCKETS: Final = tuple(float(4**n) for n in range(14))
DURATION_BUCKETS: Final = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                           20.48, 40.96, 81.92)  # fmt: skip
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                       5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)  # fmt: skip
TPOT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# gen_ai.operation.name of each API shape (semconv: OpenAI's Responses API and Anthropic's
# Messages are "chat"); a shape not listed here is named by its API.
OPERATIONS: Final = {
    "openai.chat": "chat",
    "openai.responses": "chat",
    "anthropic.messages": "chat",
    "openai.completions": "text_completion",
    "openai.embeddings": "embeddings",
}
# gen_ai.token.type beside semconv's input and output: the custom values Envoy AI Gateway emits
# for the parts of them (cached input, cache writes, reasoning), with the envelope's field.
_TOKEN_PARTS: Final = (
    ("cached_input", "cached_input_tokens"),
    ("cache_creation_input", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)
# The model label of every model past meter_metrics_max_models.
OTHER_MODEL: Final = "other"
DEFAULT_MAX_MODELS: Final = 100


class Distribution:
    """One histogram by label set as plain numbers: each series is its per-bucket counts (not
    cumulative; the last is +Inf) followed by the sum of what was observed. Two distributions
    with the same bounds add up series by series (`merged`), so per-process ones can be summed."""

    __slots__ = ("bounds", "series")

    def __init__(
        self, bounds: tuple[float, ...], series: Mapping[tuple[str, ...], list[float]] | None = None
    ) -> None:
        self.bounds = bounds
        self.series: dict[tuple[str, ...], list[float]] = dict(series or {})

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        values = self.values(labels)
        values[bisect_left(self.bounds, value)] += 1
        values[-1] += value

    def values(self, labels: tuple[str, ...]) -> list[float]:
        """The series of a label set, made (empty) the first time: a caller may keep it and
        update it in place, as `observe` does."""
        values = self.series.get(labels)
        if values is None:
            values = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        return values

    def copy(self) -> Distribution:
        return Distribution(self.bounds, {k: list(v) for k, v in self.series.items()})

    def merged(self, *others: Distribution) -> Distribution:
        total = self.copy()
        for other in others:
            if other.bounds != self.bounds:
                raise ValueError("distributions with different buckets do not add up")
            for labels, values in other.series.items():
                mine = total.series.setdefault(labels, [0.0] * len(values))
                for i, value in enumerate(values):
                    mine[i] += value
        return total


@dataclass(slots=True)
class _Series:
    """What one API and model label observe on every envelope, kept to skip the lookups."""

    base: tuple[str, str, str]
    input: list[float]
    output: list[float]
    complete: list[float] | None = None


@dataclass
class GenAI:
    """The per-model metrics under the OpenTelemetry GenAI names: tokens per request by type,
    request duration, time to first token and per output token (streams), and the amount billed,
    each by operation, provider and model; the model label is capped at `max_models` names."""

    max_models: int = DEFAULT_MAX_MODELS
    # (operation, provider, model, token type)
    token_usage: Distribution = field(default_factory=lambda: Distribution(TOKEN_BUCKETS))
    # (operation, provider, model, error type: "" when complete, else the outcome)
    duration: Distribution = field(default_factory=lambda: Distribution(DURATION_BUCKETS))
    # (operation, provider, model)
    ttft: Distribution = field(default_factory=lambda: Distribution(TTFT_BUCKETS))
    tpot: Distribution = field(default_factory=lambda: Distribution(TPOT_BUCKETS))
    # (model, currency) → micro-units billed
    amount: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The model names that have a label of their own (the first max_models seen).
    models: set[str] = field(default_factory=set)
    _series: dict[tuple[str, str], _Series] = field(default_factory=dict)

    def model_label(self, model: str) -> str:
        models = self.models
        if model in models:
            return model
        if len(models) < self.max_models:
            models.add(model)
            return model
        return OTHER_MODEL

    def record(self, meta: Mapping[str, Any], amount_micro: int) -> None:
        """Count one envelope's metadata (every observation comes from it: no work per chunk).
        About 2 µs: the series of an API and model are looked up once and kept (`_Series`)."""
        model = meta["model"]
        if model not in self.models:
            model = self.model_label(model)
        key = (meta["api"], model)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new_series(*key)
        bisect_tokens = TOKEN_BUCKETS
        for values, count in (
            (series.input, meta["input_tokens"]),
            (series.output, meta["output_tokens"]),
        ):
            values[bisect_left(bisect_tokens, count)] += 1
            values[-1] += count
        for token_type, name in _TOKEN_PARTS:
            # The parts only when present, so their _count says how many requests had any.
            if count := meta[name]:
                self.token_usage.observe((*series.base, token_type), count)
        outcome = meta["outcome"]
        latency = meta["latency_ms"] / 1000
        if outcome == "complete":
            done = series.complete
            if done is None:
                done = series.complete = self.duration.values((*series.base, ""))
            done[bisect_left(DURATION_BUCKETS, latency)] += 1
            done[-1] += latency
        else:
            self.duration.observe((*series.base, outcome), latency)
        ttft_ms = meta["ttft_ms"]
        if meta["stream"] and ttft_ms is not None:
            self.ttft.observe(series.base, ttft_ms / 1000)
            output = meta["output_tokens"]
            if output > 1 and outcome == "complete":
                self.tpot.observe(series.base, (latency - ttft_ms / 1000) / (output - 1))
        self.amount[(model, meta["currency"])] += amount_micro

    def _new_series(self, api: str, model: str) -> _Series:
        family, _, _ = api.partition(".")
        base = (OPERATIONS.get(api, api), family, model)
        return _Series(
            base,
            self.token_usage.values((*base, "input")),
            self.token_usage.values((*base, "output")),
        )

    def copy(self) -> GenAI:
        return GenAI(
            self.max_models,
            self.token_usage.copy(),
            self.duration.copy(),
            self.ttft.copy(),
            self.tpot.copy(),
            Counter(self.amount),
            set(self.models),
        )

    @classmethod
    def summed(cls, parts: Iterable[GenAI]) -> GenAI:
        """Several processes' metrics as one (label sets added up)."""
        total = cls()
        for part in parts:
            total = GenAI(
                max(total.max_models, part.max_models),
                total.token_usage.merged(part.token_usage),
                total.duration.merged(part.duration),
                total.ttft.merged(part.ttft),
                total.tpot.merged(part.tpot),
                total.amount + part.amount,
                total.models | part.models,
            )
        return total


@dataclass
class Histograms:
    """The two distributions the meter observes as it goes (everything else is a snapshot)."""

    publish: Histogram = field(
        default_factory=lambda: Histogram(
            "edgemeter_publish_latency_seconds",
            "Time from publishing an envelope to the broker's ack.",
            buckets=_PUBLISH_BUCKETS,
            registry=None,
        )
    )
    added: Histogram = field(
        default_factory=lambda: Histogram(
            "edgemeter_added_latency_seconds",
            "Time a response's end waits for its envelope to be committed to the spool "
            "(the latency the meter adds to a metered request).",
            buckets=_ADDED_BUCKETS,
            registry=None,
        )
    )


@dataclass
class Stats:
    """The meter's counters. Updated on the event loop only, so plain ints and Counters."""

    # (api, outcome, usage_source) of every envelope spooled.
    metered: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # Requests on a metered path that produced no envelope, by reason.
    unmetered: Counter[str] = field(default_factory=Counter)
    # Envelopes spooled despite an anomaly (oversize, oversize_event, decompression_limit,
    # invalid_usage, invalid_model, invalid_attribution_header), by reason: billed on what
    # could be read or estimated.
    anomalies: Counter[str] = field(default_factory=Counter)
    # Envelopes that could not be spooled (lost to billing), by reason: full, write_failed.
    spool_failures: Counter[str] = field(default_factory=Counter)
    # Tokens (by kind) and amount (micro-units, positive) of every envelope spooled.
    tokens: Counter[str] = field(default_factory=Counter)
    amount_micro: int = 0
    # Metered requests answered 503 because the spool took nothing (meter_on_spool_full).
    rejected: int = 0
    # Metered requests in keymap mode with no key in the map (billed unattributed).
    unknown_keys: int = 0
    # Envelopes the billing consumer could not book as they came, by (reason, destination):
    # reconciliation (the unbillable subject) or house (booked to the house account).
    unbillable: Counter[tuple[str, str]] = field(default_factory=Counter)
    # The latest of them: (request_id, reason, destination, wall-clock time).
    last_unbillable: tuple[str, str, str, float] | None = None
    histograms: Histograms = field(default_factory=Histograms)
    genai: GenAI = field(default_factory=GenAI)

    def billed(
        self, envelope: Mapping[str, Any], anomaly: str = "", *, booked: bool = True
    ) -> None:
        """Count an envelope on its way to the spool; its amount only if billing will book it
        (not one that goes to reconciliation)."""
        meta = envelope["metadata"]
        self.metered[(meta["api"], meta["outcome"], meta["usage_source"])] += 1
        tokens = self.tokens
        for kind, name in _TOKEN_FIELDS:
            tokens[kind] += meta[name]
        # Spend counts what billing will book: not an envelope sent to reconciliation.
        amount = -envelope["amount_micro_omr"] if booked else 0
        self.amount_micro += amount
        if anomaly:
            self.anomalies[anomaly] += 1
        self.genai.record(meta, amount)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything /readyz, /metrics and meter.status report, read at one instant."""

    metered: Mapping[tuple[str, str, str], int]
    unmetered: Mapping[str, int]
    anomalies: Mapping[str, int]
    tokens: Mapping[str, int]
    amount_micro: int
    currency: str
    rejected: int
    unknown_keys: int
    spool_failures: Mapping[str, int]
    spool_writable: bool
    spool_envelopes: int
    spool_bytes: int
    spool_oldest_age_s: float | None
    dead_letters: int
    acked: int
    duplicates: int
    publish_errors: Mapping[str, int]
    broker_connected: bool
    broker_down_s: float | None
    stream_missing: bool
    # Whether a publisher runs, a key map is in use, and what the dead-letter area reads as
    # (None: not there yet; else a count or why it cannot be read): what meter.status shows.
    publishing: bool = False
    keymap: bool = False
    dead_letters_shown: str | None = None
    dead_lettered: int = 0
    # A copy of the per-model GenAI metrics at the snapshot's instant.
    genai: GenAI = field(default_factory=GenAI)
    unbillable: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # The latest unbillable request (request_id, reason, destination, seconds ago), where
    # reconciliation envelopes go, and the house account's customer ("" without one).
    last_unbillable: tuple[str, str, str, float] | None = None
    unbillable_subject: str = ""
    house_customer: str = ""
    # Envelopes published from spools nobody else published (edgemeter.adoption).
    adopted: int = 0


def status_text(s: Snapshot, *, one_line: bool = False) -> str:
    """`meter.status`: spool depth, publisher state and what was metered since start; a line
    each, or one line for mitmweb's command bar."""
    lines = [f"spooled: {s.spool_envelopes}"]
    if s.publishing:
        lines.append(
            f"broker: {'connected' if s.broker_connected else 'disconnected'}, acked {s.acked}, "
            f"duplicates {s.duplicates}, errors {sum(s.publish_errors.values())}"
        )
    failures = ", ".join(f"{k} {n}" for k, n in sorted(s.spool_failures.items()))
    lines.append(f"spool failures: {failures or 0}")
    if s.dead_letters_shown is not None:
        lines.append(f"dead letters: {s.dead_letters_shown} (moved since start: {s.dead_lettered})")
    if s.rejected:
        lines.append(f"rejected (spool full): {s.rejected}")
    if s.keymap:
        lines.append(f"unknown keys (billed unattributed): {s.unknown_keys}")
    for (api, outcome, source), n in sorted(s.metered.items()):
        lines.append(f"metered {api} {outcome} {source}: {n}")
    for reason, n in sorted(s.unmetered.items()):
        lines.append(f"not metered ({reason}): {n}")
    for reason, n in sorted(s.anomalies.items()):
        lines.append(f"metered despite {reason}: {n}")
    for (reason, destination), n in sorted(s.unbillable.items()):
        lines.append(f"unbillable ({reason}): {n} {_where(s, destination)}")
    if s.last_unbillable is not None:
        request_id, reason, destination, ago = s.last_unbillable
        lines.append(
            f"last unbillable: request {request_id} ({reason}) {ago:.0f}s ago, "
            + _where(s, destination)
        )
    return (" · " if one_line else "\n").join(lines)


def _where(s: Snapshot, destination: str) -> str:
    if destination == "house":
        return f"booked to the house account {s.house_customer}".rstrip()
    return f"sent to reconciliation on {s.unbillable_subject}".rstrip()
