"""The benchmark: its upstream and load generator against each other, its figures and budgets,
and a smoke run of every phase against real processes (figures printed, never timed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import SSEDecoder
from tools.bench import (
    BenchUpstream,
    Budget,
    LoadSpec,
    _bracket,
    _ratios,
    bracketed,
    budgets,
    parse_args,
    python_load,
    stream_events,
    workers_summary,
)
from tools.harness import ROOT


def test_a_bench_stream_carries_the_usage_the_meter_reads() -> None:
    extraction = Extraction("openai.chat")
    decoder = SSEDecoder()
    for raw in stream_events(50, pad=10):
        for event in decoder.feed(raw):
            extraction.event(event)
    assert extraction.usage is not None
    assert extraction.usage.output_tokens == 50
    assert extraction.model == "bench-model"


@pytest.mark.parametrize(("stream", "events"), [(False, 0), (True, 5), (True, 2)])
async def test_the_load_generator_counts_what_the_upstream_sends(stream: bool, events: int) -> None:
    upstream = BenchUpstream()
    server = await upstream.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        spec = LoadSpec(port, 3, 0.2, stream, max(events, 2), 1, max_requests=9, stagger=False)
        figures = await python_load(spec)
    assert figures["requests"] == upstream.requests == 9
    assert figures["errors"] == figures["non2xx"] == 0
    # Every event, the usage event and [DONE], each its own chunk.
    assert figures["chunks"] == (9 * (events + 2) if stream else 0)
    assert figures["p50_ms"] > 0 and figures["ttfb_p50_ms"] <= figures["p50_ms"]


def run(cpu: float, rps: float, p50: float, ttfb: float = 0.0) -> dict[str, Any]:
    return {
        "cpu_us_per_request": cpu,
        "cpu_us_per_chunk": cpu,
        "rps": rps,
        "p50_ms": p50,
        "ttfb_p50_ms": ttfb,
    }


def test_every_variant_is_measured_between_two_plain_measurements() -> None:
    assert bracketed(["lean", "plain", "direct", "meter"]) == [
        "plain",
        "lean",
        "plain",
        "direct",
        "meter",
        "plain",
    ]


def test_ratios_take_each_run_against_its_bracket_then_the_median() -> None:
    def bracketed_run(cpu: float, rps: float, p50: float, plain: dict[str, Any]) -> Any:
        return run(cpu, rps, p50) | {"bracket": _bracket(plain, plain)}

    by_variant = {
        "plain": [run(1000, 500, 2.0)] * 3,  # not paired by round: each run has its bracket
        "lean": [
            bracketed_run(600, 800, 1.5, run(1000, 500, 2.0)),
            bracketed_run(1200, 400, 3.0, run(2000, 250, 4.0)),
            bracketed_run(700, 700, 1.6, run(1000, 500, 2.0)),
        ],
    }
    ratios = _ratios(by_variant, stream=False)
    # Run by run 0.6, 0.6, 0.7: the slow moment of the second does not skew the median.
    assert ratios["lean/plain cpu"] == pytest.approx(0.6)
    assert ratios["lean/plain rps"] == pytest.approx(1.6)
    assert ratios["lean-plain p50_ms"] == pytest.approx(-0.5)
    assert "meter/plain cpu" not in ratios


def test_a_bracket_is_the_mean_of_the_plain_runs_around_it() -> None:
    bracket = _bracket(run(1000, 500, 2.0), run(1200, 300, 4.0))
    assert bracket["cpu_us_per_request"] == 1100
    assert bracket["rps"] == 400
    assert bracket["p50_ms"] == 3.0


@pytest.mark.parametrize(
    ("measured", "limit", "higher_is_better", "met"),
    [
        (1.05, 1.10, False, True),
        (1.20, 1.10, False, False),
        (1.6, 1.5, True, True),
        (1.4, 1.5, True, False),
        (None, 1.0, False, False),
        (math.nan, 1.0, True, False),
    ],
)
def test_a_budget_is_met_only_by_a_measured_figure_on_its_side_of_the_limit(
    measured: float | None, limit: float, higher_is_better: bool, met: bool
) -> None:
    assert Budget("b", measured, limit, higher_is_better).met is met


def group_run(rps: float, workers: list[float], supervisor: float = 0.0) -> dict[str, Any]:
    cpu = sum(workers) + supervisor
    requests = rps * 5
    return {
        "rps": rps,
        "requests": requests,
        "errors": 0,
        "non2xx": 0,
        "tool": "wrk",
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "cores_busy": cpu / 5,
        "cpu_us_per_request": cpu / requests * 1e6,
        "worker_cpu_us_per_request": sum(workers) / requests * 1e6,
        "worker_cpu_s": workers,
        "supervisor_cpu_s": supervisor,
    }


def test_workers_scale_round_by_round_and_project_from_one_workers_cpu() -> None:
    raw = {
        "workers-1": [group_run(1000, [5.0]), group_run(500, [5.0]), group_run(1000, [5.0])],
        # The second round ran while the machine was slow for both: its ratio still counts.
        "workers-2": [
            group_run(1800, [4.5, 4.5]),
            group_run(850, [2.5, 2.0], 0.01),
            group_run(1700, [4.0, 4.5]),
        ],
    }
    summary = workers_summary(raw, 64)
    assert summary["scaling"]["workers-2"] == pytest.approx(1.7)  # 1.8, 1.7, 1.7
    # 9 s of worker CPU for 9,000 requests: 1,000 µs each, so a core serves 1,000 a second.
    assert summary["worker_cpu_us_per_request"] == pytest.approx(1000.0)
    assert summary["projected_rps"]["8"] == pytest.approx(8000.0)
    assert summary["median"]["workers-2"]["worker_shares"] == pytest.approx([0.5, 0.5])
    # A worker's CPU per request beside another against alone, round by round: 1.0, 1.9, 1.0.
    assert summary["per_core"]["workers-2"] == pytest.approx(1.0)
    [budget] = budgets({"workers": summary})
    assert (budget["limit"], budget["met"]) == (1.6, True)


def test_the_meters_own_cost_is_the_lean_runner_over_its_bare_core() -> None:
    ratios = {
        "c1": {"lean/plain cpu": 1.3, "lean-core/plain cpu": 0.8},
        "c16": {"lean/plain cpu": 0.66, "lean-core/plain cpu": 0.6},
        "stream-c16": {"lean/plain cpu": 1.0, "lean-core-stream/plain cpu": 0.9},
    }
    found = {b["name"]: b for b in budgets({"rounds": {"ratios": ratios}})}
    own = {
        name: (round(b["measured"], 3), b["limit"], b["met"])
        for name, b in found.items()
        if "bare" in name
    }
    assert own == {
        "c16: lean CPU/request vs the bare lean core": (1.1, 1.20, True),
        "c1: lean CPU/request vs the bare lean core": (1.625, 1.30, False),
        "stream-c16: lean CPU/chunk vs the bare lean core streaming": (1.111, 1.05, False),
    }


def test_budgets_leave_out_phases_that_did_not_run() -> None:
    found = budgets({"drain": {"per_s": 12_000.0}})
    assert [(b["name"], b["met"]) for b in found] == [("spool drain", True)]


def test_a_smoke_run_of_every_phase_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    print(done.stdout)  # the report, for whoever runs pytest -s
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    medians = results["rounds"]["median"]
    assert set(medians) == {"c1", "c4", "stream-c1", "stream-c4"}
    for scenario, by_variant in medians.items():
        assert set(by_variant) == {"direct", "plain", "meter", "lean"}
        for variant, figures in by_variant.items():
            assert figures["requests"] > 0, (scenario, variant)
            assert figures["errors"] == 0, (scenario, variant)
            if variant != "direct":
                cpu = figures[
                    "cpu_us_per_chunk" if scenario.startswith("stream") else "cpu_us_per_request"
                ]
                assert cpu is not None and cpu >= 0, (scenario, variant)
    assert results["drain"]["runs"][0]["on_stream"] == results["drain"]["runs"][0]["envelopes"]
    assert results["soak"]["envelopes_on_stream"] >= results["soak"]["ok"] > 0
    assert results["health"]["lean"]["meter_cpu"]["n"] > 0
    assert {"meter", "lean"} <= set(results["memory"])
    workers = results["workers"]["median"]
    assert set(workers) == {"workers-1", "workers-2"}
    assert all(w["requests"] > 0 and w["errors"] == 0 for w in workers.values())
    assert len(workers["workers-2"]["worker_shares"]) == 2  # each worker's CPU read apart
    assert all(rps and rps > 0 for rps in results["workers"]["projected_rps"].values())
    assert any("--workers 2 throughput" in b["name"] for b in results["budgets"])
    assert results["budgets"] and all(isinstance(b["met"], bool) for b in results["budgets"])
    assert "log_errors" not in results, results.get("log_errors")
    assert "| budget |" in done.stdout
    # Streams: each variant measured in the very seconds of a plain run, side by side.
    raw = results["rounds"]["raw"]
    for scenario in ("stream-c1", "stream-c4"):
        plain = {tuple(run["window"]) for run in raw[scenario]["plain"]}
        assert all(tuple(run["window"]) in plain for run in raw[scenario]["meter"])
        assert all(tuple(run["window"]) in plain for run in raw[scenario]["lean"])
    assert tuple(raw["c1"]["meter"][0]["window"]) not in {
        tuple(run["window"]) for run in raw["c1"]["plain"]
    }


@pytest.mark.parametrize(
    ("argv", "concurrencies", "phases"),
    [
        ([], (1, 16, 64), ("rounds", "workers", "drain", "memory", "health", "soak")),
        (["--concurrencies", "16", "--phases", "rounds"], (16,), ("rounds",)),
        (
            ["--concurrencies", "1, 64"],
            (1, 64),
            ("rounds", "workers", "drain", "memory", "health", "soak"),
        ),
    ],
)
def test_a_short_run_can_pick_its_concurrencies_and_phases(
    argv: list[str], concurrencies: tuple[int, ...], phases: tuple[str, ...]
) -> None:
    config, _ = parse_args(argv)
    assert config.concurrencies == concurrencies
    assert config.phases == phases


@pytest.mark.parametrize("bad", ["0", "x", ",", "16,-1"])
def test_bad_concurrencies_are_refused(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--concurrencies", bad])


def test_each_round_measures_proxies_started_afresh(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--smoke", "--rounds", "2", "--phases", "rounds", "--concurrencies", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads(out.read_text())["rounds"]
    first, second = rounds["pids"]
    assert set(first) == set(second) == {"plain", "plain-stream", "meter", "lean"}
    assert all(first[name] != second[name] for name in first)
    assert len(rounds["raw"]["c1"]["meter"]) == len(rounds["raw"]["c1"]["lean"]) == 2
