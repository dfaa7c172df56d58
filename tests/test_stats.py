"""The meter's counters: the per-model GenAI metrics each envelope adds to, the cap on the model
label, and distributions that add up across processes."""

from __future__ import annotations

from typing import Any

import pytest

from edgemeter.stats import (
    DURATION_BUCKETS,
    OTHER_MODEL,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Distribution,
    GenAI,
    Stats,
)


def envelope(amount: int = -156, **meta: Any) -> dict[str, Any]:
    """An envelope with what the stats read of it (the rest of the schema does not matter)."""
    metadata = {
        "api": "openai.chat",
        "model": "gpt-4o-mini",
        "outcome": "complete",
        "usage_source": "reported",
        "stream": False,
        "latency_ms": 800,
        "ttft_ms": 95,
        "currency": "OMR",
        "input_tokens": 120,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 31,
        "reasoning_tokens": 0,
    }
    return {"amount_micro_omr": amount, "metadata": metadata | meta}


def series_count(d: Distribution, labels: tuple[str, ...]) -> float:
    return sum(d.series[labels][:-1])


def test_a_billed_envelope_adds_its_tokens_by_type_and_model() -> None:
    stats = Stats()
    stats.billed(envelope(cached_input_tokens=100, reasoning_tokens=12))
    usage = stats.genai.token_usage
    base = ("chat", "openai", "gpt-4o-mini")
    assert {labels[-1]: values[-1] for labels, values in usage.series.items()} == {
        "input": 120,
        "output": 31,
        "cached_input": 100,
        "reasoning": 12,
    }
    assert series_count(usage, (*base, "input")) == 1
    # 120 tokens lie in the bucket le=256 (the fifth bound): one observation there.
    assert usage.series[(*base, "input")][TOKEN_BUCKETS.index(256)] == 1


def test_parts_of_input_and_output_are_observed_only_when_present() -> None:
    stats = Stats()
    stats.billed(envelope())
    assert {labels[-1] for labels in stats.genai.token_usage.series} == {"input", "output"}


@pytest.mark.parametrize(
    ("api", "operation", "provider"),
    [
        ("openai.chat", "chat", "openai"),
        ("openai.responses", "chat", "openai"),
        ("openai.completions", "text_completion", "openai"),
        ("openai.embeddings", "embeddings", "openai"),
        ("anthropic.messages", "chat", "anthropic"),
        ("vendor.newthing", "vendor.newthing", "vendor"),
    ],
)
def test_operation_and_provider_follow_the_semantic_conventions(
    api: str, operation: str, provider: str
) -> None:
    stats = Stats()
    stats.billed(envelope(api=api))
    assert {labels[:2] for labels in stats.genai.duration.series} == {(operation, provider)}


@pytest.mark.parametrize(
    ("outcome", "error_type"),
    [("complete", ""), ("client_aborted", "client_aborted"), ("upstream_error", "upstream_error")],
)
def test_duration_names_the_outcome_of_requests_that_did_not_complete(
    outcome: str, error_type: str
) -> None:
    stats = Stats()
    stats.billed(envelope(outcome=outcome, latency_ms=1500))
    [(labels, values)] = stats.genai.duration.series.items()
    assert labels[-1] == error_type
    assert values[-1] == 1.5
    assert values[DURATION_BUCKETS.index(2.56)] == 1


def test_time_to_first_token_and_per_output_token_come_from_streams_only() -> None:
    stats = Stats()
    stats.billed(envelope(stream=False))
    assert not stats.genai.ttft.series
    stats.billed(envelope(stream=True, latency_ms=3095, ttft_ms=95, output_tokens=31))
    base = ("chat", "openai", "gpt-4o-mini")
    assert stats.genai.ttft.series[base][-1] == pytest.approx(0.095)
    assert stats.genai.ttft.series[base][TTFT_BUCKETS.index(0.1)] == 1
    # 3 s after the first byte for 30 tokens after the first: 0.1 s each.
    assert stats.genai.tpot.series[base][-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "meta",
    [
        {"stream": True, "ttft_ms": None},  # no byte of the body ever came
        {"stream": True, "output_tokens": 1},
        {"stream": True, "outcome": "client_aborted"},
    ],
)
def test_time_per_output_token_needs_a_completed_stream_of_tokens(meta: dict[str, Any]) -> None:
    stats = Stats()
    stats.billed(envelope(**meta))
    assert not stats.genai.tpot.series


def test_amount_by_model_is_the_debit_as_a_positive_count() -> None:
    stats = Stats()
    stats.billed(envelope(amount=-23556))
    stats.billed(envelope(amount=-44, model="claude-3-5-haiku", currency="USD"))
    assert stats.genai.amount == {("gpt-4o-mini", "OMR"): 23556, ("claude-3-5-haiku", "USD"): 44}
    assert stats.amount_micro == 23600


def test_models_past_the_cap_share_the_other_label() -> None:
    genai = GenAI(max_models=2)
    stats = Stats(genai=genai)
    for model in ("a", "b", "c", "d", "a"):
        stats.billed(envelope(model=model))
    models = {labels[2] for labels in genai.duration.series}
    assert models == {"a", "b", OTHER_MODEL}
    assert series_count(genai.duration, ("chat", "openai", OTHER_MODEL, "")) == 2
    assert genai.models == {"a", "b"}, "a model past the cap is not remembered"


def test_a_cap_of_zero_labels_every_model_other() -> None:
    stats = Stats(genai=GenAI(max_models=0))
    stats.billed(envelope(model="gpt-4o"))
    assert {labels[2] for labels in stats.genai.duration.series} == {OTHER_MODEL}


def test_distributions_of_two_processes_add_up_to_one_that_saw_everything() -> None:
    first, second, both = Stats(), Stats(), Stats()
    envelopes = [
        envelope(model="a", latency_ms=20, stream=True),
        envelope(model="b", latency_ms=5000, output_tokens=4000),
        envelope(model="a", outcome="client_aborted", input_tokens=9),
    ]
    for i, env in enumerate(envelopes):
        (first if i % 2 else second).billed(env)
        both.billed(env)
    summed = GenAI.summed([first.genai, second.genai])
    for name in ("token_usage", "duration", "ttft", "tpot"):
        assert getattr(summed, name).series == getattr(both.genai, name).series, name
    assert summed.amount == both.genai.amount


def test_distributions_with_other_buckets_refuse_to_add_up() -> None:
    with pytest.raises(ValueError, match="different buckets"):
        Distribution(TOKEN_BUCKETS).merged(Distribution(DURATION_BUCKETS))


def test_a_copy_does_not_move_with_the_original() -> None:
    stats = Stats()
    stats.billed(envelope())
    copy = stats.genai.copy()
    stats.billed(envelope())
    assert series_count(copy.duration, ("chat", "openai", "gpt-4o-mini", "")) == 1
