"""docs/RECONCILIATION.md does what it says: its re-booking script, run against a real
nats-server on what `edgemeter tail --unbillable --json` prints, books the request once to the
customer it is given; its alert rules name series the meter exposes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from edgemeter.admin import render_metrics
from edgemeter.cli import main
from edgemeter.ids import uuid7
from edgemeter.metering.contract import consume, route
from edgemeter.metering.envelope import Facts, build, encode
from edgemeter.metering.prices import flat_price
from edgemeter.metering.usage import Usage
from edgemeter.stats import Histograms
from tests.test_admin import SNAPSHOT
from tools.harness import NatsServer
from tools.streams import ensure_stream

DOC = (Path(__file__).resolve().parent.parent / "docs" / "RECONCILIATION.md").read_text()
STREAM = "CATALYST_SME"


def unbillable(request_id: str, *, customer: str = "", tokens: int = 151) -> dict[str, Any]:
    """An envelope as the meter sends it to reconciliation."""
    facts = Facts(
        request_id=request_id,
        api="openai.chat",
        path="/v1/chat/completions",
        stream=False,
        status_code=200,
        model="gpt-4o-mini",
        tenant_id="",
        customer_id=customer,
        started_at=1.0,
        completed_at=2.0,
        first_byte_at=1.5,
        outcome="complete",
        usage_source="reported",
        currency="OMR",
    )
    usage = Usage(input_tokens=tokens, output_tokens=0)
    routed = route(build(facts, usage, flat_price(usage, 156)))
    assert routed.destination == "reconciliation"
    return routed.envelope


async def published(url: str, subject: str) -> list[tuple[dict[str, str], bytes]]:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        jsm = nc.jsm()
        state = (await jsm.stream_info(STREAM)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await jsm.get_msg(STREAM, seq)
            if msg.subject == subject:
                found.append((dict(msg.headers or {}), msg.data or b""))
        return found
    finally:
        await nc.close()


async def publish(url: str, subject: str, envelope: dict[str, Any]) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        msg_id = envelope["metadata"]["request_id"]
        await nc.jetstream().publish(subject, encode(envelope), headers={"Nats-Msg-Id": msg_id})
    finally:
        await nc.close()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    [code] = re.findall(r"```python\n(.*?)```", DOC, re.S)
    path = tmp_path / "rebook.py"
    path.write_text(code)
    return path


def test_the_documented_script_rebooks_one_request_once(
    nats_server: NatsServer, script: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    request_id, other = uuid7(), uuid7()
    for envelope in (unbillable(other, customer="cus_x"), unbillable(request_id)):
        asyncio.run(publish(nats_server.url, "catalyst.usage.unbillable", envelope))
    # As the doc says: what `edgemeter tail --unbillable --json` prints, into the script.
    argv = ["tail", "--unbillable", "--all", "--json", "--count", "2", "--timeout", "30"]
    assert main([*argv, "--nats-url", nats_server.url]) == 0
    lines = capsys.readouterr().out

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            input=lines,
            capture_output=True,
            text=True,
            timeout=60,
            env={"NATS_URL": nats_server.url, "PATH": ""},
        )

    done = run(request_id, "cus_42", "t_7")
    assert done.returncode == 0, done.stderr
    assert f"re-booked {request_id} to cus_42" in done.stdout
    assert run(request_id, "cus_42", "t_7").returncode == 0  # twice by mistake: still once

    [(headers, data)] = asyncio.run(published(nats_server.url, "catalyst.usage.recorded"))
    assert headers["Nats-Msg-Id"] == f"{request_id}:rebooked"
    assert consume(data) == ("book", "")
    copy = json.loads(data)
    meta = copy["metadata"]
    assert (copy["customer_id"], meta["tenant_id"], meta["request_id"]) == (
        "cus_42",
        "t_7",
        request_id,
    )
    assert meta["rebooked"] == {
        "reason": "no_customer",
        "customer_id": "",
        "tenant_id": "",
        "amount_micro_omr": -151 * 156,
    }
    assert "unbillable_reason" not in meta


def test_the_script_refuses_a_copy_billing_would_still_not_book(
    nats_server: NatsServer, script: Path
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    request_id = uuid7()
    zero = unbillable(request_id, customer="cus_42", tokens=0)  # zero_amount comes first
    line = json.dumps(zero) + "\n"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), request_id, "cus_42", "t_7", *args],
            input=line,
            capture_output=True,
            text=True,
            timeout=60,
            env={"NATS_URL": nats_server.url, "PATH": ""},
        )

    refused = run()
    assert refused.returncode == 1
    assert "billing would still not book it: zero_amount" in refused.stderr
    assert asyncio.run(published(nats_server.url, "catalyst.usage.recorded")) == []
    charged = run("1200")  # the billing team decided what it costs
    assert charged.returncode == 0, charged.stderr
    [(_, data)] = asyncio.run(published(nats_server.url, "catalyst.usage.recorded"))
    assert json.loads(data)["amount_micro_omr"] == -1200
    assert consume(data) == ("book", "")


def test_the_alert_rules_name_series_the_meter_exposes() -> None:
    [rules] = [YAML(typ="safe").load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC, re.S)]
    snapshot = replace(SNAPSHOT, unbillable={("no_customer", "reconciliation"): 2})
    exposed = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(
            render_metrics(snapshot, Histograms()).decode()
        )
        for sample in family.samples
    }
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) == 2
    for expr in exprs:
        name, label, value = re.search(r'(\w+)\{(\w+)="(\w+)"\}', expr).groups()  # type: ignore[union-attr]
        assert any(n == name and (label, value) in labels for n, labels in exposed), expr
        assert "sum by (reason)" in expr
