"""The Grafana dashboard (deploy/grafana/edgemeter.json) and the chart's alerts: the JSON
parses, every PromQL expression parses, and every metric they name is one a running meter
exposes, scraped from a real mitmdump that metered requests through the demo upstream."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_helm import CHART, FULL, prometheus_rules, render
from tools.demo_upstream import BackgroundDemo
from tools.harness import ROOT, MeterFactory, NatsServer, free_port
from tools.streams import ensure_stream

DASHBOARD = ROOT / "deploy" / "grafana" / "edgemeter.json"
# Grafana's own variables, as a query sees them once Grafana has filled them in.
_GRAFANA = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h"}
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<metric>[^,]+),\s*)?(?P<label>\w+)\)$")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            m = _LABEL_VALUES.match(variable["query"]["query"])
            assert m is not None, variable
            found.append(m["metric"])
    return found


def grafana_filled(expr: str) -> str:
    for name, value in _GRAFANA.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(grafana_filled(expr)), visit)
    return names


def test_the_dashboard_is_grafana_json() -> None:
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)) > 20
    assert board["uid"] == "edgemeter" and board["schemaVersion"] >= 36
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()


def test_every_expression_parses_as_promql() -> None:
    exprs = expressions(dashboard())
    assert len(exprs) > 25
    for expr in exprs:
        promql_parser.parse(grafana_filled(expr))


def test_a_broken_expression_does_not_parse() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (reason (rate(edgemeter_unmetered_requests_total[1m]))")


@pytest.mark.parametrize(
    ("topic", "metric"),
    [
        ("spend by model", "edgemeter_model_amount_micro_total"),
        ("spend in total", "edgemeter_amount_micro_total"),
        ("tokens by model", "gen_ai_client_token_usage_sum"),
        ("tokens in total", "edgemeter_tokens_total"),
        ("requests by model", "gen_ai_server_request_duration_seconds_count"),
        ("latency", "gen_ai_server_request_duration_seconds_bucket"),
        ("time to first token", "gen_ai_server_time_to_first_token_seconds_bucket"),
        ("unmetered reasons", "edgemeter_unmetered_requests_total"),
        ("reconciliation reasons", "edgemeter_unbillable_requests_total"),
        ("spool depth", "edgemeter_spool_envelopes"),
        ("spool age", "edgemeter_spool_oldest_age_seconds"),
        ("publish results", "edgemeter_publishes_total"),
        ("publish latency", "edgemeter_publish_latency_seconds_bucket"),
        ("dead letters", "edgemeter_dead_letters"),
    ],
)
def test_the_dashboard_shows(topic: str, metric: str) -> None:
    named = set().union(*(metric_names(e) for e in expressions(dashboard())))
    assert metric in named, topic


def test_no_query_breaks_figures_down_by_tenant_or_customer() -> None:
    """Totals only: per-customer figures are the ledger's, and no metric carries them."""
    for expr in expressions(dashboard()):
        assert "tenant" not in expr and "customer" not in expr, expr


# --- against a running meter --------------------------------------------------------------


def _get(port: int) -> bytes:
    return httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=10).content


@pytest.fixture(scope="module")
def exposed(
    module_meter_factory: MeterFactory,
    module_nats_server: NatsServer,
    demo_upstream: BackgroundDemo,
) -> set[str]:
    """Every sample name a meter exposes once it has metered a plain and a streamed chat, an
    Anthropic message, an upstream error and a request with a hostile customer header, and
    published them: the labelled series exist."""
    asyncio.run(ensure_stream(module_nats_server.url))
    admin = free_port()
    proxy = module_meter_factory.start(
        demo_upstream.url, module_nats_server.url, f"meter_admin_listen=127.0.0.1:{admin}"
    )
    headers = {"x-customer-id": "cus_dash", "x-tenant-id": "t_dash"}
    with openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key="sk-dash", default_headers=headers, max_retries=0
    ) as client:
        messages: Any = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="demo-chat", messages=messages)
        for _ in client.chat.completions.create(model="demo-chat", messages=messages, stream=True):
            pass
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="demo-chat", messages=messages, extra_headers={"x-demo-status": "500"}
            )
        client.chat.completions.create(
            model="demo-chat", messages=messages, extra_headers={"x-customer-id": "c" * 500}
        )
    httpx2.post(
        f"{proxy.url}/v1/messages",
        json={"model": "claude-demo", "max_tokens": 16, "messages": messages},
        headers={"x-api-key": "sk-dash", "anthropic-version": "2023-06-01"} | headers,
        timeout=10,
    ).raise_for_status()
    deadline = time.monotonic() + 30
    while True:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(_get(admin).decode())
            for s in family.samples
        }
        acked = samples.get(("edgemeter_publishes_total", (("error", ""), ("result", "acked"))))
        if acked == 4:
            break
        assert time.monotonic() < deadline, f"4 envelopes not acked in time: {acked}"
        time.sleep(0.1)
    return {name for name, _ in samples}


def test_every_metric_the_dashboard_names_is_exposed_by_a_running_meter(
    exposed: set[str],
) -> None:
    named = set().union(*(metric_names(e) for e in expressions(dashboard())))
    missing = named - exposed
    assert missing == set(), f"the dashboard names metrics the meter does not expose: {missing}"


def test_every_alert_of_the_chart_parses_and_names_an_exposed_metric(exposed: set[str]) -> None:
    rules = prometheus_rules(render(CHART, FULL))
    assert len(rules) >= 5
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names and names <= exposed, (rule["alert"], names - exposed)


def test_the_genai_series_carry_a_model_label(exposed: set[str]) -> None:
    assert {
        "gen_ai_client_token_usage_bucket",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_sum",
    } <= exposed
