"""The usage envelope of SPEC §4: the seed's `UsageRecordedPayload` plus edgemeter's metadata.

`build` is pure; `encode` gives the compact UTF-8 JSON bytes that are spooled and published.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from json import encoder as _json_encoder
from typing import Any, Literal

from edgemeter.metering.prices import Price
from edgemeter.metering.usage import DETAIL_KINDS, IMAGE_FACTS, UNIT_KINDS, Usage, clean_name

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
    # Where tenant and customer came from: headers, keymap or unknown_key.
    attribution: str = "headers"


def _ms(start: float, end: float | None) -> int | None:
    if end is None:
        return None
    return max(0, round((end - start) * 1000))


# The last whole second rfc3339 formatted: envelopes are built in completion order, so most
# share it with the one before (strftime costs ~2 µs, a hit ~0.2).
_second: tuple[float, str] = (math.nan, "")
# datetime rounds a timestamp to whole µs, half to even: a fraction below this stays in its
# second, one above may round up into the next (left to datetime, never cached).
_STAYS_IN_SECOND = 0.999999


def rfc3339(ts: float) -> str:
    """The UTC time of a Unix timestamp to the second, as datetime formats it."""
    global _second
    whole = int(ts)
    cached, text = _second
    # The chained test also sends a negative fraction (int() truncates toward 0) to datetime.
    if whole == cached and 0.0 <= ts - whole < _STAYS_IN_SECOND:
        return text
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if 0.0 <= ts - whole < _STAYS_IN_SECOND:
        _second = (whole, text)
    return text


def build(facts: Facts, usage: Usage, price: Price) -> dict[str, Any]:
    """The envelope. The names an upstream controls pass `usage.clean_name` here too (the
    caller has checked them already; an unfit one becomes "unknown" / ""), and usage_raw is
    bounded (`bounded_raw`)."""
    model = clean_name(facts.model) or UNKNOWN_MODEL
    envelope: dict[str, Any] = {
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
            "attribution": facts.attribution,
        },
    }
    if usage.detail or usage.units or usage.service_tier:
        _billed_dimensions(envelope["metadata"], usage)
    return envelope


def _billed_dimensions(metadata: dict[str, Any], usage: Usage) -> None:
    """What the provider bills besides the token kinds, only where the answer reported it (an
    answer that bills tokens alone gives the envelope it always gave): tokens by modality,
    units, and a service tier other than the base one."""
    if usage.detail:
        metadata["tokens_detail"] = {k: usage.detail[k] for k in DETAIL_KINDS if k in usage.detail}
    if usage.units:
        metadata["units"] = {k: usage.units[k] for k in _UNIT_ORDER if k in usage.units}
    if usage.service_tier:
        metadata["service_tier"] = usage.service_tier


_UNIT_ORDER = UNIT_KINDS + IMAGE_FACTS


class _Absurd(Exception):
    pass


def bounded_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The provider's usage object as it came, with NaN and infinities as null (a consumer's
    strict JSON decoder would reject the whole envelope); {} when it is nested deeper, holds
    more values or encodes larger than the bounds above. An object already within the bounds
    (every usage object seen so far) is returned itself, not a copy."""
    if type(raw) is dict and _values_within_bounds(raw):
        return raw
    return _bounded_copy(raw)


def _bounded_copy(raw: dict[str, Any]) -> dict[str, Any]:
    """bounded_raw's exact path: a plain copy within the bounds, or {}."""
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


# Bounds of the ASCII-only JSON text of a value: one code point of a str can take up to 12
# characters (an escaped surrogate pair), any other scalar (int below _INT_LIMIT, float) 24.
_CHARS_PER_CODE_POINT = 12
_INT_LIMIT = 10**18
_SCALAR_CHARS = 24


def _values_within_bounds(raw: dict[str, Any]) -> bool:
    """Whether `raw` is a usage object of the usual shape (str keys; str, finite number, bool
    or null values, or objects of those) that is certainly within the bounds: the 2 µs fast
    path of bounded_raw. False just means "take the exact slow path"."""
    size = 2
    count = 1 + len(raw)
    for key, value in raw.items():
        if type(key) is not str:
            return False
        if type(value) is dict:
            count += len(value)
            inner = _flat_chars(value)
            if inner < 0:
                return False
        else:
            inner = _scalar_chars(value)
            if inner < 0:
                return False
        size += _CHARS_PER_CODE_POINT * len(key) + 4 + inner
    return size <= MAX_RAW_BYTES and count <= _MAX_RAW_VALUES


def _flat_chars(obj: dict[Any, Any]) -> int:
    """A bound of the JSON text of an object of scalars; -1 for any other object."""
    size = 2
    for key, value in obj.items():
        if type(key) is not str:
            return -1
        inner = _scalar_chars(value)
        if inner < 0:
            return -1
        size += _CHARS_PER_CODE_POINT * len(key) + 4 + inner
    return size


def _scalar_chars(value: Any) -> int:
    """A bound of the JSON text of a str, finite number, bool or null; -1 for anything else
    (subclasses included: they take the slow path)."""
    kind = type(value)
    if kind is str:
        return _CHARS_PER_CODE_POINT * len(value) + 2
    if kind is int:
        return _SCALAR_CHARS if -_INT_LIMIT < value < _INT_LIMIT else -1
    if kind is float:
        # value - value is nan for NaN and the infinities, which the slow path makes null.
        return _SCALAR_CHARS if value - value == 0.0 else -1
    if kind is bool or value is None:
        return _SCALAR_CHARS
    return -1


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
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(obj, 0))
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _not_serializable(obj: Any) -> Any:
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


# The C encoder json.dumps makes on every call with these arguments (a JSONEncoder and its
# encoder object each time), made once: the same bytes, 9.4 -> 5.1 µs for a chat envelope.
# Without circular-reference markers, which a reused encoder would keep stale after a NaN's
# ValueError (an envelope is a tree built here from parsed JSON: it cannot be circular).
_c_make_encoder: Any = getattr(_json_encoder, "c_make_encoder", None)
_C_ENCODE: Any = (
    _c_make_encoder(
        None,
        _not_serializable,
        _json_encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    if _c_make_encoder is not None
    else None
)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
