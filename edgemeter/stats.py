"""What the meter counted since it started: one `Stats` the addon updates as requests end, and
the `Snapshot` that /metrics, /readyz and `meter.status` all read at one instant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import Histogram

from edgemeter.metering.usage import TOKEN_KINDS

# Milliseconds to seconds: publishes take a few ms locally, seconds when the broker struggles.
_PUBLISH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The write-ahead wait before a response's last byte: ~0.1 ms normally, more under disk pressure.
_ADDED_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1)


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
    histograms: Histograms = field(default_factory=Histograms)

    def billed(self, envelope: Mapping[str, Any], anomaly: str = "") -> None:
        """Count an envelope on its way to the spool."""
        meta = envelope["metadata"]
        self.metered[(meta["api"], meta["outcome"], meta["usage_source"])] += 1
        tokens = self.tokens
        for kind in TOKEN_KINDS:
            tokens[kind] += meta[f"{kind}_tokens"]
        self.amount_micro -= envelope["amount_micro_omr"]
        if anomaly:
            self.anomalies[anomaly] += 1


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
    # Envelopes published from spools nobody else published (edgemeter.adoption).
    adopted: int = 0


def status_text(s: Snapshot) -> str:
    """`meter.status`: spool depth, publisher state and what was metered since start."""
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
    return "\n".join(lines)
