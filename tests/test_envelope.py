from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edgemeter.metering import envelope
from edgemeter.metering.envelope import MAX_RAW_BYTES, Facts, bounded_raw, build, encode, rfc3339
from edgemeter.metering.prices import flat_price
from edgemeter.metering.usage import Usage

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


def strftime_rfc3339(ts: float) -> str:
    """What rfc3339 formatted before it cached the last second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


SECOND_EDGES = [
    0.0, 0.5, 0.9, 0.999999, 0.9999994, 0.9999995, 0.9999996, math.nextafter(1.0, 0.0), 1.0,
    59.999, 60.0, 86_399.9999999, 86_400.0,
    951_782_400.0, 951_868_799.9999997, 951_868_800.0,  # 2000-02-29, a leap day; 2000-03-01
    1_709_164_800.25, 1_709_251_199.999999, 1_709_251_200.0,  # 2024-02-29 and the day after
    1_795_000_000.0, 1_795_000_000.812, 1_795_000_000.9999995, math.nextafter(1_795_000_001.0, 0.0),
    1_795_000_001.0, 4_102_444_799.9999996, 4_102_444_800.0,  # the last second of 2099, 2100
    253_402_300_799.0, 1_800_000_000,  # the last second datetime formats; an int
]  # fmt: skip


def test_rfc3339_formats_every_timestamp_as_datetime_does() -> None:
    rng = random.Random(7)
    stamps = SECOND_EDGES + [rng.uniform(0, 4_102_444_800) for _ in range(2000)]
    # Ascending (mostly cache hits, as envelopes come), each twice, then in any order.
    bursts = [
        ts + d for ts in stamps for d in (0.0, 0.0, 0.3, 0.0000004, -0.0000004) if ts + d >= 0
    ]
    for ts in sorted(bursts) + bursts:
        assert rfc3339(ts) == strftime_rfc3339(ts), repr(ts)


def test_rfc3339_fails_on_what_datetime_cannot_format() -> None:
    for ts in (math.nan, math.inf, 1e20):
        with pytest.raises((ValueError, OverflowError)):
            strftime_rfc3339(ts)
        with pytest.raises((ValueError, OverflowError)):
            rfc3339(ts)


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


class Tokens(int):
    pass


class Named(str):
    pass


def nested(depth: int) -> dict[str, Any]:
    """An object whose innermost value sits `depth` levels below it."""
    obj: Any = 1
    for level in range(depth):
        obj = {f"l{level}": obj}
    return dict(obj)


TRICKY_RAW: list[Any] = [
    {},
    {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": None}},
    {"service_tier": "standard", "speed": 1.5, "zero": -0.0, "big": 1e308, "flag": True},
    {"queue_time": float("nan")},
    {"details": {"queue_time": float("nan")}},
    {"a": float("inf"), "b": {"c": float("-inf")}},
    {"x": [float("nan"), 1.5, [float("inf")]]},
    nested(6),
    nested(7),
    {"a": [[[[[1]]]]]},
    {"a": [[[[[[1]]]]]]},
    {f"k{i}": i for i in range(511)},  # 512 values, the object itself included
    {f"k{i}": i for i in range(512)},
    {"d": {f"k{i}": i for i in range(510)}},
    {"d": {f"k{i}": i for i in range(511)}},
    {"note": "x" * 8181},  # {"note":"…"} is exactly MAX_RAW_BYTES
    {"note": "x" * 8182},
    {"note": "x" * 10_000},
    {"emoji": "\U0001f600" * 680},  # 12 characters each once escaped
    {"emoji": "\U0001f600" * 690},
    {"control": "\x00" * 1300, "lone": "\ud800"},  # 6 characters each once escaped
    {"control": "\x00" * 1300, "and": "\x01" * 100},
    {1: 2, "a": {2: "x"}},
    {"a": {None: 1}},
    {"ok": True, "no": False, "nested": {"yes": True}},
    {"list": [1, 2, 3], "objects": [{"input_tokens": 1}] * 20},
    {"huge": 10**30, "negative": -(10**18), "edge": 10**18 - 1},
    {"sub": Tokens(5), "name": Named("x")},
    {"bytes": b"raw"},
    {"set": {1, 2}},
    {"tuple": (1, 2)},
    [1, 2],
    "not an object",
]


@pytest.mark.parametrize("raw", TRICKY_RAW, ids=range(len(TRICKY_RAW)))
def test_the_fast_and_the_exact_path_of_bounded_raw_agree(raw: Any) -> None:
    fast, exact = bounded_raw(raw), envelope._bounded_copy(raw)
    assert fast == exact
    assert encode({"r": fast}) == encode({"r": exact})
    assert len(encode(fast)) <= MAX_RAW_BYTES


def usage_shaped(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A usage-like object: mostly counts, some names, numbers, flags, nulls and sub-objects,
    now and then a NaN, an infinity, a long string or a list."""
    obj: dict[str, Any] = {}
    for _ in range(rng.randint(0, 12)):
        key = rng.choice(["prompt_tokens", "cached", "é", "\U0001f600", "", "k" * 40])
        key += str(rng.randrange(100))
        pick = rng.random()
        if pick < 0.5:
            value: Any = rng.randrange(-(10**19), 10**19) if pick < 0.02 else rng.randrange(10**6)
        elif pick < 0.6:
            value = rng.choice(
                ["standard", "\u00e9" * rng.randrange(700), "x" * rng.randrange(9000)]
            )
        elif pick < 0.7:
            value = rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf")])
        elif pick < 0.8:
            value = rng.choice([True, False, None])
        elif pick < 0.95 and depth < 2:
            value = usage_shaped(rng, depth + 1)
        else:
            value = [rng.randrange(10)]
        obj[key] = value
    return obj


def test_the_paths_agree_on_random_usage_shaped_objects() -> None:
    rng = random.Random(5)
    fast_taken = 0
    for _ in range(3000):
        raw = usage_shaped(rng)
        fast, exact = bounded_raw(raw), envelope._bounded_copy(raw)
        assert encode({"r": fast}) == encode({"r": exact}), raw
        fast_taken += fast is raw
    assert fast_taken > 300  # the comparison covered the fast path, not just the slow one


def test_recorded_usage_objects_take_the_fast_path_as_they_are(recorded: Path) -> None:
    usages = [
        body["usage"]
        for path in sorted(recorded.glob("*.json"))
        if isinstance(body := json.loads(path.read_bytes()), dict)
        and isinstance(body.get("usage"), dict)
    ]
    assert len(usages) >= 5
    for usage in usages:
        assert bounded_raw(usage) is usage
        assert usage == envelope._bounded_copy(usage)


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


def test_billed_dimensions_are_written_only_where_reported_after_every_other_field() -> None:
    plain = build(FACTS, USAGE, flat_price(USAGE, 156))
    assert not {"tokens_detail", "units", "service_tier"} & set(plain["metadata"])
    rich = replace(
        USAGE,
        detail={"output_audio": 12, "input_text": 108},
        units={"image_size": "1024x1024", "images": 2},
        service_tier="flex",
    )
    meta = build(FACTS, rich, flat_price(rich, 156))["metadata"]
    # The fields every envelope has come first, unchanged; the new ones in a fixed order.
    assert list(meta)[: len(plain["metadata"])] == list(plain["metadata"])
    assert list(meta)[len(plain["metadata"]) :] == ["tokens_detail", "units", "service_tier"]
    assert meta["tokens_detail"] == {"input_text": 108, "output_audio": 12}
    assert list(meta["tokens_detail"]) == ["input_text", "output_audio"]
    assert list(meta["units"]) == ["images", "image_size"]
    assert meta["tokens_used"] == 151  # input + output, whatever the parts


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def test_the_encoder_made_once_writes_what_json_dumps_writes() -> None:
    # envelope._dumps calls the C encoder json.dumps makes (a private API of the stdlib):
    # the same text for everything an envelope holds, the same ValueError for a NaN, and
    # still right after one (no state kept between calls).
    rng = random.Random(7)
    objects: list[Any] = [
        build(FACTS, USAGE, flat_price(USAGE, 156)),
        {"s": 'caf\u00e9 \U0001f600 \ud800 "q" \\ \n\t\x00', 1: 2, 1.5: None, None: [False]},
        {"f": [0.1, -0.0, 1e308, 1e-320, 2**63, -(2**70)], "n": None, "e": {}, "l": []},
        *(usage_shaped(rng) for _ in range(300)),
    ]
    for obj in objects:
        try:
            expected = _json_dumps(obj)
        except ValueError:
            with pytest.raises(ValueError):
                envelope._dumps(obj)
            continue
        assert envelope._dumps(obj) == expected
        assert encode(obj) == expected.encode()
    with pytest.raises(TypeError):
        envelope._dumps({"set": {1}})
    assert envelope._C_ENCODE is not None  # the C speedups are there: what is measured
