"""The group's /metrics: workers' expositions combined sample by sample, by a rule that depends on
the kind of sample (and a table for gauges), so families nobody listed are combined too."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgemeter.admin import GROUP_GAUGES, render_metrics
from edgemeter.aggregate import Families, combine, cumulative, parse, render
from edgemeter.stats import Histograms, Snapshot


def worker(
    requests: dict[str, float],
    latencies: list[float],
    depth: float,
    connected: float,
    age: float,
    created: float = 100.0,
) -> Families:
    """A worker's exposition with families the meter does not have (a new counter by model, a
    new histogram, a new gauge), plus two of the meter's own gauges."""
    registry = CollectorRegistry()
    by_model = Counter("genai_requests", "Requests by model.", ["model"], registry=registry)
    for model, n in requests.items():
        by_model.labels(model).inc(n)
    tokens = Histogram("genai_tokens", "Tokens per request.", buckets=(10, 100), registry=registry)
    for value in latencies:
        tokens.observe(value)
    Gauge("genai_queue", "A new gauge: summed.", registry=registry).set(depth)
    Gauge("edgemeter_broker_connected", "1 while connected.", registry=registry).set(connected)
    Gauge("edgemeter_spool_oldest_age_seconds", "Oldest.", registry=registry).set(age)
    text = generate_latest(registry).decode()
    # When each series started, as prometheus_client writes it: a timestamp, not a quantity.
    lines = [
        f"{line.rsplit(' ', 1)[0]} {created}"
        if line.startswith("genai_requests_created{")
        else line
        for line in text.splitlines()
    ]
    return parse("\n".join(lines) + "\n")


def sample(families: Families, family: str, name: str, **labels: str) -> float:
    return families[family].samples[(name, tuple(sorted(labels.items())))]


def test_counters_histograms_and_unlisted_gauges_are_summed_by_name_and_labels() -> None:
    a = worker({"gpt-4o": 3, "claude": 1}, [5, 50], depth=4, connected=1, age=2.0)
    b = worker({"gpt-4o": 2}, [500], depth=6, connected=0, age=9.5)
    group = combine([a, b])
    assert sample(group, "genai_requests", "genai_requests_total", model="gpt-4o") == 5
    assert sample(group, "genai_requests", "genai_requests_total", model="claude") == 1
    assert sample(group, "genai_tokens", "genai_tokens_bucket", le="10.0") == 1
    assert sample(group, "genai_tokens", "genai_tokens_bucket", le="100.0") == 2
    assert sample(group, "genai_tokens", "genai_tokens_bucket", le="+Inf") == 3
    assert sample(group, "genai_tokens", "genai_tokens_count") == 3
    assert sample(group, "genai_tokens", "genai_tokens_sum") == 555
    assert sample(group, "genai_queue", "genai_queue") == 10


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("edgemeter_broker_connected", 0.0),  # min: connected only if every worker is
        ("edgemeter_spool_oldest_age_seconds", 9.5),  # max: the oldest envelope of all
    ],
)
def test_a_gauge_listed_for_the_group_takes_its_rule(family: str, expected: float) -> None:
    a = worker({"m": 1}, [], depth=0, connected=1, age=2.0)
    b = worker({"m": 1}, [], depth=0, connected=0, age=9.5)
    assert sample(combine([a, b]), family, family) == expected


def test_when_a_series_started_is_the_earliest_of_the_workers() -> None:
    a = worker({"m": 1}, [], 0, 1, 0, created=200.0)
    b = worker({"m": 1}, [], 0, 1, 0, created=150.0)
    created = sample(combine([a, b]), "genai_requests_created", "genai_requests_created", model="m")
    assert created == 150.0


def test_a_worker_that_is_gone_keeps_its_counters_in_the_sum_not_its_gauges() -> None:
    gone = worker({"gpt-4o": 7}, [5], depth=3, connected=1, age=1.0)
    live = worker({"gpt-4o": 2}, [50], depth=1, connected=1, age=1.0)
    group = combine([live], [cumulative(gone)])
    assert sample(group, "genai_requests", "genai_requests_total", model="gpt-4o") == 9
    assert sample(group, "genai_tokens", "genai_tokens_count") == 2
    assert sample(group, "genai_queue", "genai_queue") == 1


def test_the_meters_own_exposition_survives_a_round_trip() -> None:
    snapshot = Snapshot(
        metered={("openai.chat", "complete", "reported"): 3},
        unmetered={"non_2xx": 1},
        anomalies={},
        tokens={"input": 5, "output": 2},
        amount_micro=1092,
        currency="OMR",
        rejected=0,
        unknown_keys=0,
        spool_failures={},
        spool_writable=True,
        spool_envelopes=2,
        spool_bytes=100,
        spool_oldest_age_s=None,
        dead_letters=0,
        acked=3,
        duplicates=0,
        publish_errors={"timeout": 1},
        broker_connected=True,
        broker_down_s=None,
        stream_missing=False,
    )
    histograms = Histograms()
    histograms.publish.observe(0.003)
    one = parse(render_metrics(snapshot, histograms).decode())
    again = parse(render(one).decode())
    assert again.keys() == one.keys()
    for name, family in one.items():
        assert (again[name].type, again[name].samples) == (family.type, family.samples), name
    doubled = combine([one, one])
    assert (
        sample(doubled, "edgemeter_amount_micro", "edgemeter_amount_micro_total", currency="OMR")
        == 2184
    )
    assert sample(doubled, "edgemeter_spool_writable", "edgemeter_spool_writable") == 1
    assert sample(doubled, "edgemeter_spool_envelopes", "edgemeter_spool_envelopes") == 4


def test_every_gauge_rule_names_a_gauge_the_meter_exposes() -> None:
    snapshot_text = render_metrics(
        Snapshot(
            {}, {}, {}, {}, 0, "OMR", 0, 0, {}, True, 0, 0, None, 0, 0, 0, {}, True, None, False
        ),
        Histograms(),
    ).decode()
    gauges = {name for name, family in parse(snapshot_text).items() if family.type == "gauge"}
    assert set(GROUP_GAUGES) <= gauges


@pytest.mark.parametrize("text", ["not a metric line at all {", 'x{a="1"} one'])
def test_an_exposition_that_cannot_be_read_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Prometheus exposition"):
        parse(text)
