from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from edgemeter.envelope import MAX_RAW_BYTES, Facts, bounded_raw, build, encode, rfc3339
from edgemeter.pricing import flat_price
from edgemeter.usage import Usage

FACTS = Facts(
    request_id="0193a6f0-0000-7000-8000-000000000001",
    api="openai.chat",
    path="/v1/chat/completions",
    stream=True,
    status_code=200,
    model="GPT-4o-Mini",
    tenant_id="t_7",
    customer_id="cus_42",
    started_at=1_795_000_000.0,
    completed_at=1_795_000_000.812,
    first_byte_at=1_795_000_000.095,
    outcome="complete",
    usage_source="reported",
    currency="OMR",
    client_request_id="abc",
    upstream_id="chatcmpl-1",
    api_key_fingerprint="9f86d081884c7d65",
)
USAGE = Usage(120, 100, 0, 31, 12, {"prompt_tokens": 120, "completion_tokens": 31})

# The six metadata fields and four top-level fields of the seed's UsageRecordedPayload.
SEED_TOP = {"customer_id", "amount_omr", "amount_micro_omr", "reason", "metadata"}
SEED_META = {"tokens_used", "model", "request_id", "tenant_id", "latency_ms", "completed_at"}


def test_envelope_carries_the_seed_fields_with_exact_amounts() -> None:
    env = build(FACTS, USAGE, flat_price(USAGE, 156))
    assert set(env) == SEED_TOP
    assert set(env["metadata"]) >= SEED_META
    assert env["customer_id"] == "cus_42"
    assert env["amount_micro_omr"] == -151 * 156 == -23556
    assert env["amount_omr"] == -0.023556
    assert env["reason"] == "usage:newapi:gpt-4o-mini"
    meta = env["metadata"]
    assert meta["tokens_used"] == 151
    assert meta["model"] == "GPT-4o-Mini"
    assert meta["latency_ms"] == 812
    assert meta["ttft_ms"] == 95
    assert meta["completed_at"] == "2026-11-18T11:06:40Z"
    assert meta["price_version"] == "flat:156"
    assert meta["schema"] == "edgemeter.usage/1"
    assert (meta["input_tokens"], meta["cached_input_tokens"], meta["output_tokens"]) == (
        120,
        100,
        31,
    )


def test_encoding_is_compact_strict_json() -> None:
    raw = Usage(1, 0, 0, 1, 0, {"queue_time": float("nan"), "x": [float("inf"), 1.5]})
    data = encode(build(FACTS, raw, flat_price(raw, 156)))
    decoded = json.loads(data)
    assert decoded["metadata"]["usage_raw"] == {"queue_time": None, "x": [None, 1.5]}
    assert b"NaN" not in data and b": " not in data


def test_amount_survives_a_float_round_trip_exactly() -> None:
    for micro in (0, -1, -156, -23556, -(2**40) * 156):
        usage = Usage(0, 0, 0, -micro // 156 if micro else 0, 0, {})
        env = build(FACTS, usage, flat_price(usage, 156))
        assert round(json.loads(encode(env))["amount_omr"] * 1_000_000) == env["amount_micro_omr"]


def test_rfc3339_is_utc_seconds() -> None:
    assert rfc3339(0.9) == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}, True),
        ({"iterations": [{"input_tokens": 1}] * 20, "server_tool_use": {"web_search_requests": 1}}, True),
        ({"queue_time": float("nan")}, True),
        ({"note": "x" * 10_000}, False),
        ({f"k{i}": i for i in range(2000)}, False),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}, False),
        ({"a": [[[[[[[1]]]]]]]}, False),
    ],
)  # fmt: skip
def test_usage_raw_is_kept_only_while_it_is_small_plain_json(
    raw: dict[str, Any], kept: bool
) -> None:
    bounded = bounded_raw(raw)
    assert (bounded != {}) is kept
    assert len(encode({"r": bounded})) <= MAX_RAW_BYTES + 10
    if kept:
        # As it came, NaN as null.
        assert json.loads(encode({"r": bounded})) == json.loads(encode({"r": raw}))


@pytest.mark.parametrize(
    ("model", "upstream_id", "want_model", "want_id"),
    [
        ("GPT-4o-Mini", "chatcmpl-1", "GPT-4o-Mini", "chatcmpl-1"),
        ("gpt-4o\x00evil", "id\nforged", "unknown", ""),
        ("m" * 100_000, "i" * 100_000, "unknown", ""),
        ("gpt\u202e4o", "\ud800", "unknown", ""),
    ],
)
def test_names_unfit_for_an_envelope_never_reach_it(
    model: str, upstream_id: str, want_model: str, want_id: str
) -> None:
    facts = replace(FACTS, model=model, upstream_id=upstream_id)
    env = json.loads(encode(build(facts, USAGE, flat_price(USAGE, 156))))
    assert env["metadata"]["model"] == want_model
    assert env["reason"] == "usage:newapi:" + want_model.lower()
    assert env["metadata"]["upstream_id"] == want_id


def test_an_absurd_usage_raw_is_left_out_and_the_counts_kept() -> None:
    usage = Usage(5, 0, 0, 7, 0, {"prompt_tokens": 5, "completion_tokens": 7, "x": "y" * 50_000})
    meta = json.loads(encode(build(FACTS, usage, flat_price(usage, 156))))["metadata"]
    assert meta["usage_raw"] == {}
    assert (meta["input_tokens"], meta["output_tokens"], meta["tokens_used"]) == (5, 7, 12)
