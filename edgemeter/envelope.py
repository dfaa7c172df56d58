"""The usage envelope of SPEC §4: the seed's `UsageRecordedPayload` plus edgemeter's metadata.

`build` is pure; `encode` gives the compact UTF-8 JSON bytes that are spooled and published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from edgemeter.pricing import Price
from edgemeter.usage import Usage, clean_name

SCHEMA = "edgemeter.usage/1"
REASON_PREFIX = "usage:newapi:"
UNKNOWN_MODEL = "unknown"

# usage_raw is informative, and a few hundred bytes in every recorded answer: one past these
# bounds is not usage but garbage (or an attack on the consumer), and is left out ({}).
MAX_RAW_BYTES = 8192
_MAX_RAW_DEPTH = 6
_MAX_RAW_VALUES = 512

Outcome = Literal["complete", "client_aborted", "upstream_error"]
UsageSource = Literal["reported", "estimated"]


@dataclass(frozen=True, slots=True)
class Facts:
    """What the meter observed about one request, independent of its usage and price."""

    request_id: str
    api: str
    path: str
    stream: bool
    status_code: int
    model: str
    tenant_id: str
    customer_id: str
    started_at: float
    completed_at: float
    first_byte_at: float | None
    outcome: Outcome
    usage_source: UsageSource
    currency: str
    client_request_id: str = ""
    upstream_id: str = ""
    api_key_fingerprint: str = ""


def _ms(start: float, end: float | None) -> int | None:
    if end is None:
        return None
    return max(0, round((end - start) * 1000))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(facts: Facts, usage: Usage, price: Price) -> dict[str, Any]:
    """The envelope. The names an upstream controls pass `usage.clean_name` here too (the
    caller has checked them already; an unfit one becomes "unknown" / ""), and usage_raw is
    bounded (`bounded_raw`)."""
    model = clean_name(facts.model) or UNKNOWN_MODEL
    return {
        "customer_id": facts.customer_id,
        "amount_omr": price.amount_micro / 1_000_000,
        "amount_micro_omr": price.amount_micro,
        "reason": REASON_PREFIX + model.lower(),
        "metadata": {
            "tokens_used": usage.tokens_used,
            "model": model,
            "request_id": facts.request_id,
            "tenant_id": facts.tenant_id,
            "latency_ms": _ms(facts.started_at, facts.completed_at),
            "completed_at": rfc3339(facts.completed_at),
            "schema": SCHEMA,
            "api": facts.api,
            "path": facts.path,
            "stream": facts.stream,
            "status_code": facts.status_code,
            "outcome": facts.outcome,
            "usage_source": facts.usage_source,
            "input_tokens": usage.input_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "output_tokens": usage.output_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "usage_raw": bounded_raw(usage.raw),
            "price_version": price.version,
            "currency": facts.currency,
            "client_request_id": facts.client_request_id,
            "upstream_id": clean_name(facts.upstream_id) or "",
            "api_key_fingerprint": facts.api_key_fingerprint,
            "ttft_ms": _ms(facts.started_at, facts.first_byte_at),
        },
    }


class _Absurd(Exception):
    pass


def bounded_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The provider's usage object as it came, with NaN and infinities as null (a consumer's
    strict JSON decoder would reject the whole envelope); {} when it is nested deeper, holds
    more values or encodes larger than the bounds above."""
    budget = [_MAX_RAW_VALUES]

    def plain(obj: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > _MAX_RAW_DEPTH:
            raise _Absurd
        if isinstance(obj, float):
            return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
        if isinstance(obj, dict):
            return {str(k): plain(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(v, depth + 1) for v in obj]
        if isinstance(obj, str) and len(obj) > MAX_RAW_BYTES:
            raise _Absurd
        if obj is None or isinstance(obj, str | int):
            return obj
        raise _Absurd

    try:
        clean = plain(raw, 0)
        if len(_dumps(clean)) > MAX_RAW_BYTES:
            return {}
    except (_Absurd, ValueError):
        return {}
    return clean if isinstance(clean, dict) else {}


def encode(envelope: dict[str, Any]) -> bytes:
    """Strict JSON: NaN or Infinity in a provider's raw usage become null, since a consumer's
    JSON decoder (Go's included) would reject the whole envelope."""
    try:
        text = _dumps(envelope)
    except ValueError:
        text = _dumps(_finite(envelope))
    return text.encode()


def _dumps(obj: Any) -> str:
    # ensure_ascii keeps the bytes valid UTF-8 even for lone surrogates a provider might send.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
