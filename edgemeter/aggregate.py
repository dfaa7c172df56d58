"""One Prometheus exposition for a group of workers (`edgemeter serve --workers N`): each worker's
/metrics parsed, combined sample by sample (metric name and label set), and rendered again.

The rule depends on what a sample is, never on knowing the metric, so families added later
(histograms, counters by model) are combined without a change here:

- counters, histograms (buckets, _count, _sum) and summaries: summed;
- gauges: summed (a quantity each worker holds: spooled envelopes, bytes, dead letters), unless
  `edgemeter.admin.GROUP_GAUGES` names another rule for the family: `min` for a state every worker
  must be in (the broker connected, the spool writable), `max` for the worst one (the oldest
  envelope's age, a stream missing);
- `*_created` samples (when a series started): the earliest;
- untyped samples: summed.

A worker that exits takes its counters with it; the supervisor keeps the last figures it read of
every worker that is gone (`retired`) and adds them back, so the group's counters never go down
(a decrease would read as a reset to Prometheus, and rate() as a burst).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from edgemeter.admin import GROUP_GAUGES

Rule = Literal["sum", "min", "max"]
Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]

# Series whose value only grows while a worker runs: what a worker that is gone leaves behind.
CUMULATIVE: Final = frozenset({"counter", "histogram", "summary"})
_CREATED: Final = "_created"


@dataclass
class Family:
    """One metric family: its samples by (sample name, sorted labels)."""

    name: str
    type: str
    help: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


Families = dict[str, Family]


def parse(text: str) -> Families:
    """A Prometheus text exposition; ValueError if it is not one."""
    families: Families = {}
    try:
        for metric in text_string_to_metric_families(text):
            family = families.setdefault(
                metric.name, Family(metric.name, metric.type, metric.documentation)
            )
            for sample in metric.samples:
                labels = tuple(sorted((str(k), str(v)) for k, v in sample.labels.items()))
                family.samples[(sample.name, labels)] = float(sample.value)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f"not a Prometheus exposition: {e}") from None
    return families


def rule(family: Family, sample: str) -> Rule:
    """How one sample of `family` is combined over workers (see the module docstring)."""
    if sample.endswith(_CREATED):
        return "min"
    if family.type == "gauge":
        return GROUP_GAUGES.get(family.name, "sum")
    return "sum"


def combine(live: Sequence[Families], retired: Iterable[Families] = ()) -> Families:
    """The workers' families combined: `live` as they are now, `retired` (the last figures of
    workers that are gone) for their cumulative series only."""
    out: Families = {}

    def add(family: Family, samples: Iterable[tuple[SampleKey, float]]) -> None:
        into = out.get(family.name)
        if into is None:
            into = out[family.name] = Family(family.name, family.type, family.help)
        for key, value in samples:
            before = into.samples.get(key)
            if before is None:
                into.samples[key] = value
                continue
            how = rule(family, key[0])
            if how == "sum":
                into.samples[key] = before + value
            elif how == "min":
                into.samples[key] = min(before, value)
            else:
                into.samples[key] = max(before, value)

    for families in live:
        for family in families.values():
            add(family, family.samples.items())
    for families in retired:
        for family in families.values():
            if family.type in CUMULATIVE:
                add(family, family.samples.items())
    return out


def cumulative(families: Families) -> Families:
    """Only the series a worker leaves behind when it is gone (see `combine`)."""
    return {name: family for name, family in families.items() if family.type in CUMULATIVE}


class _Families(Collector):
    def __init__(self, families: Iterable[Family]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            metric = Metric(family.name, family.help, family.type)
            for (name, labels), value in family.samples.items():
                metric.add_sample(name, dict(labels), value)
            yield metric


def render(families: Mapping[str, Family]) -> bytes:
    """The Prometheus text exposition of `families`, in their order."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


__all__ = ["CUMULATIVE", "Family", "combine", "cumulative", "parse", "render", "rule"]
