"""The admin endpoint: readiness rules, the Prometheus exposition, the HTTP server, and the meter
serving it from a real mitmdump."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgemeter.admin import (
    AdminError,
    AdminServer,
    Histograms,
    Snapshot,
    Thresholds,
    bind,
    histogram_text,
    readiness,
    render_metrics,
)
from edgemeter.stats import Distribution, Stats
from tests.test_stats import envelope
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, NatsServer, free_port
from tools.streams import ensure_stream

SNAPSHOT = Snapshot(
    metered={("openai.chat", "complete", "reported"): 3},
    unmetered={"non_2xx": 2},
    anomalies={"invalid_usage": 1},
    tokens={"input": 30, "output": 12},
    amount_micro=6552,
    currency="OMR",
    rejected=0,
    unknown_keys=2,
    spool_failures={},
    spool_writable=True,
    spool_envelopes=1,
    spool_bytes=900,
    spool_oldest_age_s=4.0,
    dead_letters=0,
    acked=5,
    duplicates=1,
    publish_errors={"timeout": 2},
    broker_connected=True,
    broker_down_s=None,
    stream_missing=False,
)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_ready_when_the_spool_takes_envelopes() -> None:
    assert readiness(SNAPSHOT, Thresholds(broker_down_s=60, spool_age_s=60)) == []


@pytest.mark.parametrize(
    ("change", "thresholds", "reason"),
    [
        ({"spool_writable": False}, Thresholds(), "spool is full or not writable"),
        ({"broker_down_s": 61.0}, Thresholds(broker_down_s=60), "broker unreachable for 61s"),
        ({"spool_oldest_age_s": 900.0}, Thresholds(spool_age_s=600), "900s old"),
    ],
)
def test_not_ready_says_why(change: dict[str, object], thresholds: Thresholds, reason: str) -> None:
    [found] = readiness(dataclasses.replace(SNAPSHOT, **change), thresholds)  # type: ignore[arg-type]
    assert reason in found


def test_a_full_spool_leaves_a_serving_meter_ready() -> None:
    full = dataclasses.replace(SNAPSHOT, spool_writable=False)
    assert readiness(full, Thresholds(spool_full_unready=False)) == []


def test_a_zero_threshold_disables_its_check() -> None:
    late = dataclasses.replace(SNAPSHOT, broker_down_s=10_000.0, spool_oldest_age_s=10_000.0)
    assert readiness(late, Thresholds(broker_down_s=0, spool_age_s=0)) == []


def test_metrics_expose_every_family_with_labels() -> None:
    histograms = Histograms()
    histograms.publish.observe(0.004)
    histograms.added.observe(0.0002)
    found = samples(render_metrics(SNAPSHOT, histograms))
    assert (
        found[
            (
                "edgemeter_metered_requests_total",
                (("api", "openai.chat"), ("outcome", "complete"), ("usage_source", "reported")),
            )
        ]
        == 3
    )
    assert found[("edgemeter_unmetered_requests_total", (("reason", "non_2xx"),))] == 2
    assert found[("edgemeter_tokens_total", (("kind", "input"),))] == 30
    assert found[("edgemeter_tokens_total", (("kind", "reasoning"),))] == 0
    assert found[("edgemeter_amount_micro_total", (("currency", "OMR"),))] == 6552
    assert found[("edgemeter_publishes_total", (("error", ""), ("result", "acked")))] == 4
    assert found[("edgemeter_publishes_total", (("error", ""), ("result", "duplicate")))] == 1
    assert found[("edgemeter_publishes_total", (("error", "timeout"), ("result", "error")))] == 2
    assert found[("edgemeter_spool_envelopes", ())] == 1
    assert found[("edgemeter_spool_bytes", ())] == 900
    assert found[("edgemeter_spool_oldest_age_seconds", ())] == 4.0
    assert found[("edgemeter_spool_failures_total", (("reason", "full"),))] == 0
    assert found[("edgemeter_unknown_keys_total", ())] == 2
    assert found[("edgemeter_metered_anomalies_total", (("reason", "invalid_usage"),))] == 1
    assert found[("edgemeter_broker_connected", ())] == 1
    assert found[("edgemeter_publish_latency_seconds_count", ())] == 1
    assert found[("edgemeter_added_latency_seconds_bucket", (("le", "0.00025"),))] == 1


def test_genai_metrics_carry_the_semantic_convention_names_and_labels() -> None:
    stats = Stats()
    stats.billed(envelope(amount=-23556, stream=True, cached_input_tokens=100))
    stats.billed(envelope(amount=-156, outcome="client_aborted"))
    found = samples(render_metrics(dataclasses.replace(SNAPSHOT, genai=stats.genai), Histograms()))
    base = (
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "openai"),
        ("gen_ai_response_model", "gpt-4o-mini"),
    )

    def labelled(*extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((*base, *extra)))

    usage = "gen_ai_client_token_usage"
    assert found[(f"{usage}_sum", labelled(("gen_ai_token_type", "input")))] == 240
    assert found[(f"{usage}_count", labelled(("gen_ai_token_type", "cached_input")))] == 1
    assert (
        found[(f"{usage}_bucket", labelled(("gen_ai_token_type", "output"), ("le", "64.0")))] == 2
    )
    duration = "gen_ai_server_request_duration_seconds"
    assert found[(f"{duration}_count", labelled(("error_type", "")))] == 1
    assert found[(f"{duration}_count", labelled(("error_type", "client_aborted")))] == 1
    assert found[(f"{duration}_bucket", labelled(("error_type", ""), ("le", "+Inf")))] == 1
    assert found[("gen_ai_server_time_to_first_token_seconds_count", labelled())] == 1
    assert found[("gen_ai_server_time_per_output_token_seconds_count", labelled())] == 1
    amount = (("currency", "OMR"), ("gen_ai_response_model", "gpt-4o-mini"))
    assert found[("edgemeter_model_amount_micro_total", amount)] == 23556 + 156


def test_histograms_are_cumulative_and_end_at_infinity() -> None:
    d = Distribution((1.0, 10.0))
    for value in (0.5, 5, 50):
        d.observe(("x",), value)
    text = histogram_text("h_seconds", "doc", ("l",), d)
    assert text.splitlines()[2:] == [
        'h_seconds_bucket{l="x",le="1.0"} 1.0',
        'h_seconds_bucket{l="x",le="10.0"} 2.0',
        'h_seconds_bucket{l="x",le="+Inf"} 3.0',
        'h_seconds_sum{l="x"} 55.5',
        'h_seconds_count{l="x"} 3.0',
    ]


def test_a_model_name_with_quotes_and_backslashes_comes_back_as_it_was() -> None:
    stats = Stats()
    model = 'a "quoted" \\model\\'
    stats.billed(envelope(model=model))
    text = render_metrics(dataclasses.replace(SNAPSHOT, genai=stats.genai), Histograms())
    models = {
        dict(labels).get("gen_ai_response_model")
        for (name, labels) in samples(text)
        if name.startswith("gen_ai_")
    }
    assert models == {model}


def test_a_taken_port_is_a_clear_error() -> None:
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(AdminError, match="cannot listen"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


async def test_the_server_answers_each_path() -> None:
    current = SNAPSHOT

    async def snapshot() -> Snapshot:
        return current

    server = AdminServer(bind("127.0.0.1", 0), snapshot, Thresholds, Histograms())
    await server.start()
    host, port = server.address
    try:
        async with httpx2.AsyncClient(base_url=f"http://{host}:{port}", timeout=5) as client:
            assert (await client.get("/healthz")).text == "ok\n"
            assert (await client.get("/readyz")).status_code == 200
            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain; version=")
            assert b"edgemeter_spool_envelopes 1.0" in metrics.content
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/healthz")).status_code == 405
            current = dataclasses.replace(SNAPSHOT, spool_writable=False)
            unready = await client.get("/readyz")
            assert unready.status_code == 503 and "spool is full" in unready.text
    finally:
        await server.stop()


async def test_a_client_that_sends_nothing_does_not_stall_the_server() -> None:
    async def snapshot() -> Snapshot:
        return SNAPSHOT

    server = AdminServer(bind("127.0.0.1", 0), snapshot, Thresholds, Histograms())
    await server.start()
    host, port = server.address
    try:
        _, idle = await asyncio.open_connection(host, port)  # opens and says nothing
        async with httpx2.AsyncClient(timeout=5) as client:
            assert (await client.get(f"http://{host}:{port}/healthz")).status_code == 200
        idle.close()
    finally:
        await server.stop()


# -- the meter serving it, in a real mitmdump -----------------------------------------------


def get(port: int, path: str) -> httpx2.Response:
    return httpx2.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def wait_until_listening(port: int) -> None:
    """The admin endpoint starts with the meter's `running` hook, a moment after the proxy."""

    def answers() -> bool:
        try:
            return get(port, "/healthz").status_code == 200
        except httpx2.TransportError:
            return False

    wait_for(answers)


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_a_running_meter_reports_health_readiness_and_metrics(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, nats_server: NatsServer
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    admin_port = free_port()
    proxy = meter_factory.start(
        demo_upstream.url, nats_server.url, f"meter_admin_listen=127.0.0.1:{admin_port}"
    )
    wait_until_listening(admin_port)
    who = {"x-tenant-id": "t_admin", "x-customer-id": "cus_admin"}
    for headers in (who, who, {}):  # the last one names no customer: unbillable
        client = openai.OpenAI(
            base_url=f"{proxy.url}/v1",
            api_key="sk-admin-test",
            max_retries=0,
            default_headers=headers,
        )
        client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}]
        )

    def acked_and_deleted() -> bool:
        # Deleted from the spool up to 100 ms after the ack (in the next commit's transaction).
        found = samples(get(admin_port, "/metrics").content)
        acked = found.get(("edgemeter_publishes_total", (("error", ""), ("result", "acked"))))
        return acked == 3 and found.get(("edgemeter_spool_envelopes", ())) == 0

    wait_for(acked_and_deleted)
    found = samples(get(admin_port, "/metrics").content)
    key = (("api", "openai.chat"), ("outcome", "complete"), ("usage_source", "reported"))
    assert found[("edgemeter_metered_requests_total", key)] == 3
    tokens = {
        kind: found[("edgemeter_tokens_total", (("kind", kind),))] for kind in ("input", "output")
    }
    assert tokens["output"] == 3 * 14  # the demo's canned reply is 14 tokens
    # Only what billing books is debited: the unbillable one's 16 tokens are not.
    assert found[("edgemeter_amount_micro_total", (("currency", "OMR"),))] == 156 * (
        sum(tokens.values()) * 2 // 3
    )
    unbillable = {
        labels: n
        for (name, labels), n in found.items()
        if name == "edgemeter_unbillable_requests_total"
    }
    # Every reason is there from the start (at 0), so an alert's increase() sees the first one.
    assert {dict(labels)["reason"] for labels in unbillable} >= {"no_customer", "no_tenant"}
    assert {labels: n for labels, n in unbillable.items() if n} == {
        (("destination", "reconciliation"), ("reason", "no_customer")): 1
    }
    assert found[("edgemeter_spool_envelopes", ())] == 0
    assert found[("edgemeter_broker_connected", ())] == 1
    assert found[("edgemeter_added_latency_seconds_count", ())] == 3
    assert found[("edgemeter_publish_latency_seconds_count", ())] == 3
    # GenAI token usage counts every metered request, the unbillable one too.
    genai = {
        (name, dict(labels)["gen_ai_token_type"]): value
        for (name, labels), value in found.items()
        if name == "gen_ai_client_token_usage_sum"
    }
    assert genai == {
        ("gen_ai_client_token_usage_sum", "input"): tokens["input"],
        ("gen_ai_client_token_usage_sum", "output"): tokens["output"],
    }
    assert get(admin_port, "/readyz").status_code == 200


def test_a_meter_without_its_broker_turns_unready_with_the_reason(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo, stopped_nats_server: NatsServer
) -> None:
    admin_port = free_port()
    meter_factory.start(
        demo_upstream.url,
        stopped_nats_server.url,
        f"meter_admin_listen=127.0.0.1:{admin_port}",
        "meter_ready_broker_down_s=1",
    )
    wait_until_listening(admin_port)
    wait_for(lambda: get(admin_port, "/readyz").status_code == 503)
    assert "broker unreachable" in get(admin_port, "/readyz").text


def test_a_taken_admin_port_stops_startup_with_a_clear_message(
    meter_factory: MeterFactory, demo_upstream: BackgroundDemo
) -> None:
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        try:
            proxy = meter_factory.start(
                demo_upstream.url, "nats://127.0.0.1:1", f"meter_admin_listen=127.0.0.1:{port}"
            )
        except RuntimeError as e:  # exited before its proxy port opened
            log = str(e)
        else:
            # mitmdump opens its proxy port, then exits for the error logged during startup.
            assert proxy.proc is not None and proxy.proc.wait(timeout=30) == 1
            log = proxy.log_tail()
    finally:
        taken.close()
    assert f"meter_admin_listen='127.0.0.1:{port}': cannot listen" in log
