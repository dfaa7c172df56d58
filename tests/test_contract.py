"""The downstream contract: the model of the seed's billing consumer (Go decoding and its rules,
case by case), the edge check held to that model on any payload, and where each envelope goes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from edgemeter.addon import Meter
from edgemeter.metering.attribution import fingerprint
from edgemeter.metering.contract import (
    ATTRIBUTION_REASONS,
    REASONS,
    House,
    check,
    consume,
    go_decode,
    route,
)
from edgemeter.metering.envelope import Facts, build, encode
from edgemeter.metering.prices import flat_price
from edgemeter.metering.usage import Usage
from tests.corpus import is_stream, wire_body
from tests.flows import KEY, assert_contract, make_flow, published, run_flow, spooled

CONTRACT = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def envelope(
    *,
    customer: str = "cus_42",
    tenant: str = "t_7",
    tokens: tuple[int, int] = (120, 31),
    price: int = 156,
    attribution: str = "headers",
) -> dict[str, Any]:
    """An envelope as the meter builds it."""
    facts = Facts(
        request_id="0193a6f0-0000-7000-8000-000000000001",
        api="openai.chat",
        path="/v1/chat/completions",
        stream=False,
        status_code=200,
        model="gpt-4o-mini",
        tenant_id=tenant,
        customer_id=customer,
        started_at=1.0,
        completed_at=2.0,
        first_byte_at=1.5,
        outcome="complete",
        usage_source="reported",
        currency="OMR",
        attribution=attribution,
    )
    usage = Usage(input_tokens=tokens[0], output_tokens=tokens[1])
    return build(facts, usage, flat_price(usage, price))


GOOD = encode(envelope())


def edited(text: str) -> bytes:
    """GOOD's JSON with one textual edit, old=>new (the edit must apply)."""
    old, new = text.split("=>")
    assert old.encode() in GOOD, old
    return GOOD.replace(old.encode(), new.encode(), 1)


def wrapped(**top: str) -> bytes:
    """A payload written by hand: top-level members as raw JSON texts around GOOD's metadata."""
    metadata = json.dumps(json.loads(GOOD)["metadata"])
    members = {
        "customer_id": '"cus_42"',
        "amount_omr": "-0.023556",
        "amount_micro_omr": "-23556",
        "reason": '"usage:newapi:gpt-4o-mini"',
        "metadata": metadata,
    }
    members.update(top)
    return ("{" + ",".join(f'"{k.rstrip("_")}":{v}' for k, v in members.items()) + "}").encode()


# -- the model of the consumer, rule by rule --------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "verdict"),
    [
        (GOOD, ("book", "")),
        # Go's decoder: an integer field takes only an integer literal that fits int64.
        (edited('"amount_micro_omr":-23556=>"amount_micro_omr":-23556.0'), ("skip", "undecodable")),
        (
            edited('"amount_micro_omr":-23556=>"amount_micro_omr":-2.3556e4'),
            ("skip", "undecodable"),
        ),
        (edited('"amount_micro_omr":-23556=>"amount_micro_omr":"-23556"'), ("skip", "undecodable")),
        (
            edited('"amount_micro_omr":-23556=>"amount_micro_omr":-9223372036854775809'),
            ("skip", "undecodable"),
        ),
        (
            edited('"amount_micro_omr":-23556=>"amount_micro_omr":-9223372036854775808'),
            ("book", ""),
        ),
        (edited('"tokens_used":151=>"tokens_used":151.5'), ("skip", "undecodable")),
        (edited('"tokens_used":151=>"tokens_used":true'), ("skip", "undecodable")),
        (edited('"latency_ms":1000=>"latency_ms":1000.25'), ("skip", "undecodable")),
        # ... a float64 field any finite number, integer or not; a string field only strings.
        (edited('"amount_omr":-0.023556=>"amount_omr":-1'), ("book", "")),
        (edited('"amount_omr":-0.023556=>"amount_omr":-1e400'), ("skip", "undecodable")),
        (edited('"amount_omr":-0.023556=>"amount_omr":NaN'), ("skip", "undecodable")),
        (edited('"customer_id":"cus_42"=>"customer_id":42'), ("skip", "undecodable")),
        (edited('"model":"gpt-4o-mini"=>"model":["gpt"]'), ("skip", "undecodable")),
        # Unknown members are ignored, whatever they hold; null leaves a field as it was.
        (edited('"schema":"edgemeter.usage/1"=>"schema":1.5e999'), ("book", "")),
        (edited('"latency_ms":1000=>"latency_ms":null'), ("book", "")),
        (wrapped(customer_id='"cus_42","customer_id":null'), ("book", "")),
        # Keys match case-insensitively (Unicode simple folding), the last one winning.
        (wrapped(customer_id='"cus_42","Customer_ID":""'), ("skip", "no_customer")),
        (wrapped(customer_id='"cus_42","CUSTOMER_ID":"cus_43","customer_id_":""'), ("book", "")),
        (wrapped(customer_id='"cus_42","cu\u017ftomer_id":""'), ("skip", "no_customer")),
        (edited('"request_id":"=>"Request_Id":"","request_id":"'), ("book", "")),
        (edited('"tenant_id":"t_7"=>"tenant_id":"t_7","TENANT_ID":""'), ("redeliver", "no_tenant")),
        # A second metadata object merges into the first.
        (wrapped(metadata_='{"request_id":"r1"},"metadata":{"tenant_id":"t"}'), ("book", "")),
        (wrapped(metadata='"metadata"'), ("skip", "undecodable")),
        (wrapped(metadata="null"), ("skip", "no_request_id")),
        (b"null", ("skip", "no_request_id")),
        (b"[]", ("skip", "undecodable")),
        (b"{", ("skip", "undecodable")),
        (GOOD + b"{}", ("skip", "undecodable")),
        # The rules, in the consumer's order.
        (
            edited('"request_id":"0193a6f0-0000-7000-8000-000000000001"=>"request_id":""'),
            ("skip", "no_request_id"),
        ),
        (edited('"customer_id":"cus_42"=>"customer_id":""'), ("skip", "no_customer")),
        (edited('"reason":"usage:newapi:gpt-4o-mini"=>"reason":""'), ("skip", "no_reason")),
        (wrapped(amount_micro_omr="0", amount_omr="0"), ("skip", "zero_amount")),
        (wrapped(amount_micro_omr="0", amount_omr="0.0"), ("skip", "zero_amount")),
        (wrapped(amount_micro_omr="23556"), ("skip", "positive_amount")),
        # A zero amount_micro_omr is derived from amount_omr, rounded half away from zero.
        (wrapped(amount_micro_omr="0", amount_omr="-0.0000005"), ("book", "")),
        (wrapped(amount_micro_omr="0", amount_omr="-0.0000004"), ("skip", "zero_amount")),
        (wrapped(amount_micro_omr="0", amount_omr="0.000001"), ("skip", "positive_amount")),
        (edited('"tenant_id":"t_7"=>"tenant_id":""'), ("redeliver", "no_tenant")),
        (edited('"tenant_id":"t_7"=>"tenant_id":null'), ("redeliver", "no_tenant")),
    ],
)
def test_the_model_decides_as_the_consumer_does(payload: bytes, verdict: tuple[str, str]) -> None:
    assert consume(payload) == verdict


def test_a_known_customer_without_a_tenant_is_booked() -> None:
    payload = edited('"tenant_id":"t_7"=>"tenant_id":""')
    assert consume(payload, known_customers={"cus_42"}) == ("book", "")


def test_go_decode_gives_every_field_of_the_struct() -> None:
    assert go_decode(b"{}") == {
        "customer_id": "",
        "amount_omr": 0.0,
        "amount_micro_omr": 0,
        "reason": "",
        "metadata": {
            "tokens_used": 0,
            "model": "",
            "request_id": "",
            "tenant_id": "",
            "latency_ms": 0,
            "completed_at": "",
        },
    }


# -- the edge check, held to the model ----------------------------------------------------------

# What a hostile or broken builder could put in a field: every JSON type, edge numbers.
values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(["", "x", "cus_42", 0, -1, 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1]),
    st.sampled_from([0.0, -0.0, -1.0, -0.0000005, -0.0000004, 1e308, float("nan"), float("inf")]),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
TOP_FIELDS = ["customer_id", "amount_omr", "amount_micro_omr", "reason", "metadata"]
META_FIELDS = ["tokens_used", "model", "request_id", "tenant_id", "latency_ms", "completed_at"]


@CONTRACT
@example(top={"amount_micro_omr": -(2**63) - 1}, meta={}, dropped=[])
@example(top={}, meta={"tokens_used": 2**63}, dropped=[])
@example(top={"amount_omr": -1, "amount_micro_omr": 0}, meta={}, dropped=[])
@example(top={"customer_id": True}, meta={"tenant_id": None}, dropped=[])
@example(top={"metadata": None}, meta={}, dropped=[])
@given(
    top=st.dictionaries(st.sampled_from(TOP_FIELDS), values, max_size=3),
    meta=st.dictionaries(st.sampled_from(META_FIELDS), values, max_size=3),
    dropped=st.lists(st.sampled_from(TOP_FIELDS + META_FIELDS), max_size=2),
)
def test_the_edge_check_passes_exactly_what_the_consumer_books(
    top: dict[str, Any], meta: dict[str, Any], dropped: list[str]
) -> None:
    env = envelope()
    env["metadata"].update(meta)
    for name in dropped:
        (env if name in TOP_FIELDS else env.get("metadata", {})).pop(name, None)
    env.update(top)
    verdict, why = consume(encode(env))
    found = check(env)
    assert (found == "") == (verdict == "book"), (found, verdict, why, env)
    if found:
        # The same reason, but where the consumer sees only the first of several, and cannot
        # tell an unknown key from a missing customer.
        assert found in REASONS


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({}, ""),
        ({"customer": ""}, "no_customer"),
        ({"customer": "", "attribution": "unknown_key", "tenant": ""}, "unknown_key"),
        ({"tenant": ""}, "no_tenant"),
        ({"tokens": (0, 0)}, "zero_amount"),
        ({"price": 0}, "zero_amount"),
        # What the house account cannot mend comes first.
        ({"tokens": (0, 0), "customer": ""}, "zero_amount"),
    ],
)
def test_the_edge_check_names_why(edit: dict[str, Any], reason: str) -> None:
    assert check(envelope(**edit)) == reason


# -- where envelopes go ---------------------------------------------------------------------------

HOUSE = House("cus_house", "t_house")


def test_a_billable_envelope_goes_to_billing_untouched() -> None:
    env = envelope()
    routed = route(env, house=HOUSE)
    assert (routed.destination, routed.reason) == ("billing", "")
    assert routed.envelope is env
    assert encode(routed.envelope) == GOOD


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"customer": ""}, "no_customer"),
        ({"customer": "", "attribution": "unknown_key", "tenant": ""}, "unknown_key"),
        ({"tenant": ""}, "no_tenant"),
        ({"tokens": (0, 0)}, "zero_amount"),
    ],
)
def test_without_a_house_account_an_unbillable_envelope_is_marked_for_reconciliation(
    edit: dict[str, Any], reason: str
) -> None:
    env = envelope(**edit)
    routed = route(env)
    assert (routed.destination, routed.reason) == ("reconciliation", reason)
    assert routed.envelope == {**env, "metadata": {**env["metadata"], "unbillable_reason": reason}}
    assert "unbillable_reason" not in env["metadata"]  # the original is left as it was


@pytest.mark.parametrize("edit", [{"customer": ""}, {"tenant": ""}, {"customer": "", "tenant": ""}])
def test_a_house_account_books_what_nobody_can_be_billed_for_marked(edit: dict[str, Any]) -> None:
    env = envelope(**edit)
    routed = route(env, house=HOUSE)
    assert routed.destination == "house"
    booked = routed.envelope
    assert (booked["customer_id"], booked["metadata"]["tenant_id"]) == ("cus_house", "t_house")
    assert booked["metadata"]["house_account"] == {
        "reason": routed.reason,
        "customer_id": env["customer_id"],
        "tenant_id": env["metadata"]["tenant_id"],
    }
    assert "unbillable_reason" not in booked["metadata"]
    assert consume(encode(booked)) == ("book", "")
    # Everything else is the request's own.
    assert booked["amount_micro_omr"] == env["amount_micro_omr"]
    assert booked["metadata"]["request_id"] == env["metadata"]["request_id"]


def test_a_house_account_does_not_take_what_it_cannot_mend() -> None:
    routed = route(envelope(tokens=(0, 0), customer=""), house=HOUSE)
    assert (routed.destination, routed.reason) == ("reconciliation", "zero_amount")
    assert ATTRIBUTION_REASONS.isdisjoint({"zero_amount"})


def test_a_zero_amount_is_reconciled_not_dropped() -> None:
    # Free by nature (moderations) is counted on arrival; a zero amount here is an accident.
    assert route(envelope(tokens=(5, 0), price=0)).destination == "reconciliation"
    assert route(envelope(tokens=(5, 0))).destination == "billing"


# -- through the addon ------------------------------------------------------------------------

CHAT = "openai-chat-nonstream.json"  # 379 tokens


async def answer(
    addon: Meter,
    recorded: Path,
    *,
    drop: tuple[str, ...] = (),
    fixture: str = CHAT,
    path: str = "/v1/chat/completions",
    key: str = KEY,
) -> http.HTTPFlow:
    """One metered request answered with a recorded file, without the headers in `drop`."""
    flow = make_flow(path)
    flow.request.headers["authorization"] = f"Bearer {key}"
    for header in drop:
        del flow.request.headers[header]
    file = recorded / fixture
    await run_flow(addon, flow, 200, wire_body(file), is_stream(file))
    return flow


async def test_a_billable_envelope_is_spooled_exactly_as_built(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = await answer(addon, recorded)
    assert addon.spool is not None
    addon.spool.drain_journal()
    [(_, value)] = addon.spool.read_page("", 10)
    assert value == encode(flow.metadata["edgemeter"])  # plain: no route, no extra header
    assert published(addon) == [("catalyst.usage.recorded", {}, value)]


async def test_an_unbillable_request_goes_to_reconciliation_counted_and_shown(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = await answer(addon, recorded, drop=("x-customer-id",))
    [(subject, headers, body)] = published(addon)
    assert subject == "catalyst.usage.unbillable"
    assert headers == {"Edgemeter-Unbillable-Reason": "no_customer"}
    envelope = json.loads(body)
    assert envelope["metadata"]["unbillable_reason"] == "no_customer"
    assert envelope == flow.metadata["edgemeter"]
    assert assert_contract(addon) == ["no_customer"]
    # Counted, but nothing is debited.
    assert addon.stats.unbillable == {("no_customer", "reconciliation"): 1}
    assert sum(addon.stats.metered.values()) == 1
    assert addon.stats.amount_micro == 0
    request_id = envelope["metadata"]["request_id"]
    status = addon.status()
    assert (
        "unbillable (no_customer): 1 sent to reconciliation on catalyst.usage.unbillable" in status
    )
    assert f"last unbillable: request {request_id} (no_customer) 0s ago" in status
    assert flow.marked == ":warning:"
    assert flow.comment.endswith("; UNBILLABLE (no_customer): sent to reconciliation")


async def test_an_unknown_key_in_keymap_mode_goes_to_reconciliation_as_such(
    meter: tuple[Meter, Any], recorded: Path, tmp_path: Path
) -> None:
    addon, tctx = meter
    keymap = tmp_path / "keys.toml"
    keymap.write_text(f'[keys."{fingerprint("sk-known")}"]\ntenant = "t_k"\ncustomer = "cus_k"\n')
    tctx.configure(addon, meter_attribution="keymap", meter_keymap=str(keymap))
    await answer(addon, recorded, key="sk-known")
    await answer(addon, recorded, key="sk-unknown")
    assert assert_contract(addon) == ["unknown_key"]
    assert [env["customer_id"] for env in spooled(addon)] == ["cus_k", ""]


async def test_one_warning_per_reason_and_minute(
    meter: tuple[Meter, Any], recorded: Path, caplog: pytest.LogCaptureFixture
) -> None:
    addon, _ = meter
    caplog.set_level(logging.WARNING, logger="edgemeter")
    for _ in range(3):
        await answer(addon, recorded, drop=("x-customer-id",))
    await answer(addon, recorded, drop=("x-tenant-id",))
    lines = [r.getMessage() for r in caplog.records if r.name == "edgemeter"]
    assert len(lines) == 2
    assert "cannot be billed (no_customer): published on catalyst.usage.unbillable" in lines[0]
    assert "(no_tenant)" in lines[1]
    # A minute later, the next one says how many went unlogged meanwhile.
    addon._unbillable_logged["no_customer"] -= 61
    await answer(addon, recorded, drop=("x-customer-id",))
    assert caplog.records[-1].getMessage().endswith("(2 more since the last such line)")


async def test_a_house_account_books_the_unattributed_marked(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_house_customer="cus_house", meter_house_tenant="t_house")
    flow = await answer(addon, recorded, drop=("x-customer-id", "x-tenant-id"))
    await answer(addon, recorded)
    assert assert_contract(addon) == []
    house, own = spooled(addon)
    assert (house["customer_id"], house["metadata"]["tenant_id"]) == ("cus_house", "t_house")
    assert house["metadata"]["house_account"] == {
        "reason": "no_customer",
        "customer_id": "",
        "tenant_id": "",
    }
    assert own["customer_id"] == "cus_42" and "house_account" not in own["metadata"]
    assert addon.stats.unbillable == {("no_customer", "house"): 1}
    assert addon.stats.amount_micro == 2 * 379 * 156  # both are booked
    assert "unbillable (no_customer): 1 booked to the house account cus_house" in addon.status()
    assert flow.marked == ":house:"
    assert flow.comment.endswith("; booked to the house account cus_house (no_customer)")


async def test_a_zero_amount_is_reconciled_even_with_a_house_account(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, tctx = meter
    tctx.configure(
        addon,
        meter_house_customer="cus_house",
        meter_house_tenant="t_house",
        meter_price_micro_per_token=0,
    )
    await answer(addon, recorded)
    assert assert_contract(addon) == ["zero_amount"]


@pytest.mark.parametrize("house", [False, True])
async def test_cloudevents_headers_ride_along_and_the_body_stays_the_same(
    meter: tuple[Meter, Any], recorded: Path, house: bool
) -> None:
    addon, tctx = meter
    tctx.configure(addon, meter_cloudevents=True)
    if house:
        tctx.configure(addon, meter_house_customer="cus_house", meter_house_tenant="t_house")
    billed = await answer(addon, recorded)
    unbillable = await answer(addon, recorded, drop=("x-tenant-id",))
    (subject, headers, body), (subject2, headers2, body2) = published(addon)
    envelope = billed.metadata["edgemeter"]
    assert (subject, body) == ("catalyst.usage.recorded", encode(envelope))
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": envelope["metadata"]["request_id"],
        "ce-source": "edgemeter",
        "ce-type": "edgemeter.usage.recorded",
        "ce-time": envelope["metadata"]["completed_at"],
        "ce-subject": "cus_42",
        "content-type": "application/json",
    }
    other = unbillable.metadata["edgemeter"]
    assert body2 == encode(other)
    if house:
        assert subject2 == "catalyst.usage.recorded"
        assert (headers2["ce-type"], headers2["ce-subject"]) == (
            "edgemeter.usage.recorded",
            "cus_house",
        )
    else:
        assert subject2 == "catalyst.usage.unbillable"
        assert headers2["Edgemeter-Unbillable-Reason"] == "no_tenant"
        assert (headers2["ce-type"], headers2["ce-subject"]) == (
            "edgemeter.usage.unbillable",
            "cus_42",
        )
    assert headers2["ce-id"] == other["metadata"]["request_id"]


async def test_a_free_call_is_counted_and_never_published(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    flow = await answer(addon, recorded, fixture="openai-moderations.json", path="/v1/moderations")
    assert published(addon) == []
    assert addon.stats.unmetered == {"free": 1}
    assert addon.stats.metered == {} and addon.stats.unbillable == {}
    assert "edgemeter" not in flow.metadata and flow.marked == ""
    assert "not metered (free): 1" in addon.status()


@pytest.mark.parametrize(
    ("options", "option", "message"),
    [
        ({"meter_unbillable_subject": "catalyst.usage.recorded"}, "meter_unbillable_subject", "must differ from meter_subject"),
        ({"meter_unbillable_subject": "catalyst.>"}, "meter_unbillable_subject", "not a publishable NATS subject"),
        ({"meter_house_customer": "cus_house"}, "meter_house_tenant", "set meter_house_customer and meter_house_tenant together"),
        ({"meter_house_tenant": "t_house"}, "meter_house_customer", "set meter_house_customer and meter_house_tenant together"),
        ({"meter_house_customer": " cus", "meter_house_tenant": "t"}, "meter_house_customer", "not an id"),
    ],
)  # fmt: skip
def test_a_bad_contract_option_stops_startup_naming_it(
    tmp_path: Path, options: dict[str, str], option: str, message: str
) -> None:
    addon = Meter()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"^{option}.*{message}"):
            tctx.configure(addon, meter_spool_dir=str(tmp_path / "spool"), **options)
        if addon.spool is not None:
            addon.spool.close()
