"""The downstream contract: a model of the seed's billing consumer (what it books, skips for good
or redelivers forever), and the edge check and routing that keep the rest off its subject.

The consumer (sme-billing's `MeteringConsumer.Handle`, durable `org-billing-metering` on
`CATALYST_SME` filtered to `catalyst.usage.recorded`) decodes each message with Go's
`encoding/json` into `events.UsageRecordedPayload`, then, in this order: a payload that does not
decode is acked and skipped; an empty `metadata.request_id`, `customer_id` or `reason` is acked
and skipped; an amount that is not negative (`amount_micro_omr`, or `amount_omr` times 10⁶ when that
is 0) is acked and skipped; a customer it does not know is created only when
`metadata.tenant_id` is not empty, else the message is nak'ed and redelivered every 5 s, forever.
Everything else is booked once per `metadata.request_id`.

`consume` is that model, run on the bytes a message carries; `check` is the edge's version of it,
run on every envelope before it is spooled: one dict walk instead of a JSON parse, and it
assumes the worst (the customer is new to billing). The tests hold the two to each other on
every envelope the corpus and the fuzz tests produce.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

# Why an envelope would not be booked: metadata.unbillable_reason, the header of the
# reconciliation subject, and the label of the counters.
UNDECODABLE: Final = "undecodable"
NO_REQUEST_ID: Final = "no_request_id"
NO_REASON: Final = "no_reason"
ZERO_AMOUNT: Final = "zero_amount"
POSITIVE_AMOUNT: Final = "positive_amount"
UNKNOWN_KEY: Final = "unknown_key"
NO_CUSTOMER: Final = "no_customer"
NO_TENANT: Final = "no_tenant"
# In the order `check` tests them: whatever a house account cannot mend comes first.
REASONS: Final = (
    UNDECODABLE,
    NO_REQUEST_ID,
    NO_REASON,
    ZERO_AMOUNT,
    POSITIVE_AMOUNT,
    UNKNOWN_KEY,
    NO_CUSTOMER,
    NO_TENANT,
)
# What booking the request to a house account mends: nobody, or nobody billing can create.
ATTRIBUTION_REASONS: Final = frozenset({UNKNOWN_KEY, NO_CUSTOMER, NO_TENANT})

Verdict = Literal["book", "skip", "redeliver"]
Destination = Literal["billing", "reconciliation", "house"]

# The seed's struct (core/services/shared/events/nats.go), by JSON name: the Go kind of each
# field. Go's `int` is 64 bits wide on the platforms the consumer runs on.
_PAYLOAD: Final = {
    "customer_id": "string",
    "amount_omr": "float64",
    "amount_micro_omr": "int64",
    "reason": "string",
    "metadata": "object",
}
_METADATA: Final = {
    "tokens_used": "int64",
    "model": "string",
    "request_id": "string",
    "tenant_id": "string",
    "latency_ms": "int64",
    "completed_at": "string",
}
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_FLOAT64_MAX: Final = 1.7976931348623157e308


class GoDecodeError(ValueError):
    """json.Unmarshal would return an error: the consumer acks and skips the message."""


def go_decode(data: bytes) -> dict[str, Any]:
    """`json.Unmarshal(data, &payload)` into the seed's struct, as Go's encoding/json (v1) does
    it: unknown fields are ignored; keys match a field exactly or case-insensitively (Unicode
    simple folding), the last one winning; null leaves a field as it was; a string field takes
    only a string, a float64 any finite number, an integer field only an integer literal that
    fits (`1.0` and `1e3` do not). Returns every field of the struct, zero values included."""
    try:
        # Go reads UTF-8 only (bad bytes in strings become U+FFFD), and refuses NaN/Infinity.
        value = json.loads(
            data.decode("utf-8", "replace"), object_pairs_hook=_Pairs, parse_constant=_refuse
        )
    except (ValueError, RecursionError) as e:
        raise GoDecodeError(f"syntax: {e}") from None
    payload = _zero(_PAYLOAD)
    payload["metadata"] = _zero(_METADATA)
    if value is None:
        return payload  # `null` into a struct is no error, and changes nothing
    _fill(payload, _PAYLOAD, value)
    return payload


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in order, duplicates kept (as Go reads them)."""


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _zero(fields: Mapping[str, str]) -> dict[str, Any]:
    zeros = {"string": "", "float64": 0.0, "int64": 0, "object": None}
    return {name: zeros[kind] for name, kind in fields.items()}


def _fold(name: str) -> str:
    # Unicode simple folding of a key, as far as it can reach the ASCII field names: the
    # Kelvin sign folds to k, the long s to s, and ASCII letters to their lower case.
    return name.lower().replace("\u212a", "k").replace("\u017f", "s")


def _fill(target: dict[str, Any], fields: Mapping[str, str], value: Any) -> None:
    if not isinstance(value, _Pairs):
        raise GoDecodeError(f"cannot unmarshal {_kind(value)} into a struct")
    folded = {_fold(name): name for name in fields}
    for key, item in value:
        name = key if key in fields else folded.get(_fold(key))
        if name is None or item is None:
            continue
        kind = fields[name]
        if kind == "object":
            if target[name] is None:
                target[name] = _zero(_METADATA)
            _fill(target[name], _METADATA, item)
        elif kind == "string":
            if not isinstance(item, str):
                raise GoDecodeError(f"cannot unmarshal {_kind(item)} into string field {name}")
            target[name] = item
        elif kind == "float64":
            if type(item) not in (int, float) or not abs(item) <= _FLOAT64_MAX:
                raise GoDecodeError(f"cannot unmarshal {_kind(item)} into float64 field {name}")
            target[name] = float(item)
        else:
            if type(item) is not int or not _INT64_MIN <= item <= _INT64_MAX:
                raise GoDecodeError(f"cannot unmarshal {_kind(item)} into int64 field {name}")
            target[name] = item


def _kind(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "object"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else type(value).__name__


def _go_int64(value: float) -> int:
    # int64(float64) on amd64: out of range (or NaN) gives the most negative int64.
    if not math.isfinite(value) or not _INT64_MIN <= value < 2.0**63:
        return _INT64_MIN
    return int(value)  # truncates toward zero, as Go does


def consume(data: bytes, known_customers: Container[str] = frozenset()) -> tuple[Verdict, str]:
    """What the billing consumer does with one message on its subject: ("book", ""), or
    ("skip", reason) when it acks it without booking, or ("redeliver", reason) when it naks it
    every 5 s forever. `known_customers` are the customers billing already has a row for."""
    try:
        payload = go_decode(data)
    except GoDecodeError:
        return "skip", UNDECODABLE
    meta = payload["metadata"]
    if meta["request_id"] == "":
        return "skip", NO_REQUEST_ID
    if payload["customer_id"] == "":
        return "skip", NO_CUSTOMER
    if payload["reason"] == "":
        return "skip", NO_REASON
    micro, omr = payload["amount_micro_omr"], payload["amount_omr"]
    if micro == 0 and omr != 0:
        # round half away from zero, then Go's conversion.
        micro = _go_int64(omr * 1_000_000 - 0.5 if omr < 0 else omr * 1_000_000 + 0.5)
    if micro >= 0:
        return "skip", ZERO_AMOUNT if micro == 0 else POSITIVE_AMOUNT
    if payload["customer_id"] not in known_customers and meta["tenant_id"] == "":
        return "redeliver", NO_TENANT
    return "book", ""


# -- the edge ------------------------------------------------------------------------------------


def check(envelope: Mapping[str, Any]) -> str:
    """The first reason (in REASONS order) the consumer would not book this envelope of a
    customer it has never seen; "" when it books it. The envelope as `envelope.encode` writes
    it: a str is a JSON string, an int (never a bool) an integer literal, a float a number with
    a fraction, a NaN or an infinity null. Keys in metadata that Go would fold onto a field are
    the builder's business (see the tests); the fields' values, types and ranges are checked
    here."""
    meta = _field(envelope, "metadata")
    if not _built(envelope, meta):
        # Not the types the builder writes: the general rules, field by field.
        if meta is None:
            meta = {}  # null, or no metadata at all: Go's zero struct
        elif type(meta) is not dict or not _typed(meta, _METADATA):
            return UNDECODABLE
        if not _typed(envelope, _PAYLOAD):
            return UNDECODABLE
    if not _field(meta, "request_id"):
        return NO_REQUEST_ID
    if not _field(envelope, "reason"):
        return NO_REASON
    micro = _field(envelope, "amount_micro_omr") or 0
    omr = _field(envelope, "amount_omr") or 0.0
    if micro == 0 and omr != 0:
        micro = _go_int64(omr * 1_000_000 - 0.5 if omr < 0 else omr * 1_000_000 + 0.5)
    if micro >= 0:
        return ZERO_AMOUNT if micro == 0 else POSITIVE_AMOUNT
    if not _field(envelope, "customer_id"):
        return UNKNOWN_KEY if meta.get("attribution") == UNKNOWN_KEY else NO_CUSTOMER
    if not _field(meta, "tenant_id"):
        return NO_TENANT
    return ""


def _built(envelope: Mapping[str, Any], meta: Any) -> bool:
    """Whether every field has the type `envelope.build` gives it, within int64 where Go wants
    one: the one test of nearly every envelope (measured: 0.37 µs, against 1.35 µs for _typed
    on both objects; the whole check of a billable envelope 0.75 µs)."""
    return (
        type(meta) is dict
        and type(envelope.get("customer_id")) is str
        and type(envelope.get("reason")) is str
        and type(envelope.get("amount_omr")) is float
        and type(micro := envelope.get("amount_micro_omr")) is int
        and type(meta.get("request_id")) is str
        and type(meta.get("tenant_id")) is str
        and type(meta.get("model")) is str
        and type(meta.get("completed_at")) is str
        and type(tokens := meta.get("tokens_used")) is int
        and type(latency := meta.get("latency_ms")) in _LATENCY_TYPES
        and _INT64_MIN <= micro <= _INT64_MAX
        and _INT64_MIN <= tokens <= _INT64_MAX
        and (latency is None or _INT64_MIN <= latency <= _INT64_MAX)
        and math.isfinite(envelope["amount_omr"])
    )


_LATENCY_TYPES: Final = (int, type(None))


def _field(obj: Mapping[str, Any], name: str) -> Any:
    """A member as its JSON will read: absent, null, NaN and the infinities are all null."""
    value = obj.get(name)
    if type(value) is float and not math.isfinite(value):
        return None
    return value


def _typed(obj: Mapping[str, Any], fields: Mapping[str, str]) -> bool:
    """Whether each field present (null or absent is Go's zero) decodes into its Go kind."""
    for name, kind in fields.items():
        value = _field(obj, name)
        if value is None:
            continue
        if kind == "string":
            fits = type(value) is str
        elif kind == "int64":
            fits = type(value) is int and _INT64_MIN <= value <= _INT64_MAX
        elif kind == "float64":
            fits = type(value) in (int, float) and abs(value) <= _FLOAT64_MAX
        else:
            continue
        if not fits:
            return False
    return True


@dataclass(frozen=True, slots=True)
class House:
    """The house account (meter_house_customer, meter_house_tenant) that takes what no one can
    be billed for."""

    customer_id: str
    tenant_id: str


@dataclass(frozen=True, slots=True)
class Routed:
    """Where an envelope goes, and as what: `envelope` is what is published (the one given, or
    a copy marked for reconciliation or re-attributed to the house account); `reason` is why it
    is not on the billing subject as it came ("" when it is)."""

    envelope: dict[str, Any]
    destination: Destination
    reason: str = ""


def route(envelope: dict[str, Any], *, house: House | None = None) -> Routed:
    """Billing when the consumer books the envelope as it is; else the house account, when one
    is set and all that is wrong is whom to bill (marked in metadata.house_account with the
    reason and the attribution it replaced); else reconciliation, marked with
    metadata.unbillable_reason. (A call free by nature, such as a moderation, never gets here:
    the addon counts it `free` when it arrives and meters nothing.)"""
    reason = check(envelope)
    if not reason:
        return Routed(envelope, "billing")
    meta = envelope["metadata"]
    if house is not None and reason in ATTRIBUTION_REASONS:
        booked = {
            **envelope,
            "customer_id": house.customer_id,
            "metadata": {
                **meta,
                "tenant_id": house.tenant_id,
                "house_account": {
                    "reason": reason,
                    "customer_id": envelope.get("customer_id"),
                    "tenant_id": meta.get("tenant_id"),
                },
            },
        }
        if not check(booked):
            return Routed(booked, "house", reason)
    marked = {**envelope, "metadata": {**meta, "unbillable_reason": reason}}
    return Routed(marked, "reconciliation", reason)


__all__ = [
    "ATTRIBUTION_REASONS",
    "REASONS",
    "GoDecodeError",
    "House",
    "Routed",
    "check",
    "consume",
    "go_decode",
    "route",
]
