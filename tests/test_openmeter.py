"""docs/OPENMETER.md held to the meter: the collector configuration reads the subject, the ce-*
headers and the envelope fields the meter publishes, and the meters count what it maps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from edgemeter.metering import cloudevents
from edgemeter.metering.envelope import Facts, build
from edgemeter.metering.prices import flat_price
from edgemeter.metering.usage import Usage
from edgemeter.options import DEFAULTS

DOC = Path(__file__).resolve().parent.parent / "docs" / "OPENMETER.md"


def yaml_blocks() -> list[Any]:
    text = DOC.read_text(encoding="utf-8")
    return [YAML(typ="safe").load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


@pytest.fixture
def collector() -> dict[str, Any]:
    config: dict[str, Any] = yaml_blocks()[0]
    return config


@pytest.fixture
def mapping(collector: dict[str, Any]) -> str:
    [processor] = collector["pipeline"]["processors"]
    text: str = processor["mapping"]
    return text


def envelope() -> dict[str, Any]:
    facts = Facts(
        request_id="0193a6f0-0000-7000-8000-000000000001",
        api="openai.chat",
        path="/v1/chat/completions",
        stream=True,
        status_code=200,
        model="gpt-4o-mini",
        tenant_id="t_7",
        customer_id="cus_42",
        started_at=1.0,
        completed_at=2.0,
        first_byte_at=1.5,
        outcome="complete",
        usage_source="reported",
        currency="OMR",
    )
    usage = Usage(input_tokens=120, output_tokens=31)
    return build(facts, usage, flat_price(usage, 156))


def test_the_collector_reads_the_billing_subject_with_a_durable_consumer_of_its_own(
    collector: dict[str, Any],
) -> None:
    source = collector["input"]["nats_jetstream"]
    assert source["subject"] == DEFAULTS["meter_subject"]
    assert source["durable"] not in ("", "org-billing-metering", "sme-billing-metering")
    assert set(collector["output"]) == {"openmeter"}


def test_every_header_the_collector_reads_is_one_the_meter_sends(mapping: str) -> None:
    read = set(re.findall(r'metadata\("([^"]+)"\)', mapping))
    sent = cloudevents.headers(envelope())
    assert read and read <= set(sent)
    # Its fallbacks (meter_cloudevents off) are the values the headers would carry.
    assert f'.or("{sent["ce-source"]}")' in mapping
    assert f'.or("{cloudevents.TYPE_RECORDED}")' in mapping
    assert f'.or("{cloudevents.SPECVERSION}")' in mapping


def test_every_envelope_field_the_collector_maps_exists(mapping: str) -> None:
    env = envelope()
    paths = re.findall(r"this\.([a-z_.]+)", mapping)
    assert len(paths) >= 10
    for path in paths:
        value: Any = env
        for part in path.split("."):
            assert isinstance(value, dict) and part in value, path
            value = value[part]


def test_the_meters_count_events_of_the_meters_type_by_fields_the_collector_maps(
    mapping: str,
) -> None:
    mapped = set(re.findall(r'^\s*"([a-z_]+)":', mapping, re.M))
    meters = yaml_blocks()[1]["meters"]
    assert {m["eventType"] for m in meters} == {cloudevents.TYPE_RECORDED}
    for meter in meters:
        fields = [meter["valueProperty"], *meter["groupBy"].values()]
        assert {f.removeprefix("$.") for f in fields} <= mapped, meter["slug"]
