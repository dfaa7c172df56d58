"""`edgemeter serve --workers N` end to end: a real supervisor and its workers in front of the demo
upstream, a real nats-server, the OpenAI SDK as the client; the group's admin endpoint read back
against each worker's own figures. No timing is asserted: every wait is for a condition."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from edgemeter.aggregate import Families
from edgemeter.errors import WorkersError
from edgemeter.options import OPTIONS
from edgemeter.settings import parse_settings
from edgemeter.supervisor import Plan, Supervisor, bind_tcp, take_workers
from spool.lock import SpoolLock
from spool.store import Spool
from tests.conftest import Group
from tools.demo_upstream import BackgroundDemo
from tools.harness import ROOT, NatsServer, child_pids, free_port
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"
CHAT: Any = [{"role": "user", "content": "hello workers"}]


@pytest.fixture
def broker(nats_server: NatsServer) -> NatsServer:
    asyncio.run(ensure_stream(nats_server.url))
    return nats_server


def request(group: Group, customer: str, stream: bool = False) -> None:
    """One chat completion on a connection of its own (any worker may take it)."""
    with openai.OpenAI(
        base_url=f"{group.proxy.url}/v1",
        api_key="sk-test-workers-0123456789",
        max_retries=0,
        default_headers={"x-tenant-id": "t_workers", "x-customer-id": customer},
    ) as client:
        if stream:
            chunks = client.chat.completions.create(
                model="demo-chat",
                messages=CHAT,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert any(c.usage for c in chunks)
        else:
            assert client.chat.completions.create(model="demo-chat", messages=CHAT).usage


def total(families: Families, family: str, sample: str | None = None) -> float:
    """A sample summed over its label sets (0 when the family has none)."""
    found = families.get(family)
    if found is None:
        return 0.0
    name = sample or family
    return sum(v for (n, _), v in found.samples.items() if n == name)


def on_stream(nats_url: str, customer: str) -> list[dict[str, Any]]:
    return [
        json.loads(data)
        for _, data in asyncio.run(stream_messages(nats_url, STREAM))
        if json.loads(data).get("customer_id") == customer
    ]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def until_every_worker_served(group: Group, customer: str, workers: int = 2) -> int:
    """Requests on new connections until each worker has metered some; how many were sent."""
    sent = 0
    for _ in range(30):
        for _ in range(8):
            request(group, customer, stream=sent % 4 == 3)
            sent += 1
        served = [
            total(
                group.metrics(i), "edgemeter_metered_requests", "edgemeter_metered_requests_total"
            )
            for i in range(workers)
        ]
        if all(served):
            return sent
    raise AssertionError(f"{sent} requests and still a worker that served none: {served}")


# Families whose every sample only grows while a worker runs (summed for the group).
SUMMED = (
    "edgemeter_metered_requests",
    "edgemeter_tokens",
    "edgemeter_amount_micro",
    "edgemeter_publishes",
    "edgemeter_spool_failures",
    "edgemeter_publish_latency_seconds",
    "edgemeter_added_latency_seconds",
)


def test_every_worker_serves_the_one_port_and_the_group_sums_their_metrics(
    groups: Callable[..., Group], demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    group = groups(demo_upstream.url, broker.url)
    workers = group.admin.workers()
    # N processes under the supervisor, each publishing its own spool under meter_spool_dir.
    assert sorted(child_pids(group.proxy.pid)) == sorted(w.pid for w in workers.values() if w.pid)
    for index, state in workers.items():
        assert SpoolLock(group.proxy.spool_dir / f"worker-{index}").holder() == state.pid
    assert not (group.proxy.spool_dir / "cache.db").exists()

    customer = f"cus_{uuid.uuid4().hex[:8]}"
    sent = until_every_worker_served(group, customer)
    wait_for(
        lambda: (
            total(group.metrics(), "edgemeter_publishes", "edgemeter_publishes_total") == sent
            and total(group.metrics(), "edgemeter_spool_envelopes") == 0
        ),
        "every envelope published",
    )
    whole, parts = group.metrics(), [group.metrics(0), group.metrics(1)]
    for family in SUMMED:
        for key, value in whole[family].samples.items():
            if key[0].endswith("_created"):
                continue
            assert value == sum(part[family].samples.get(key, 0.0) for part in parts), key
    metered = "edgemeter_metered_requests_total"
    assert total(whole, "edgemeter_metered_requests", metered) == sent
    assert all(total(p, "edgemeter_metered_requests", metered) < sent for p in parts)
    # Gauges: a quantity sums, a state holds only if it holds for every worker.
    assert total(whole, "edgemeter_broker_connected") == 1.0
    assert total(whole, "edgemeter_spool_writable") == 1.0
    assert total(whole, "edgemeter_workers") == 2.0
    assert total(whole, "edgemeter_workers_serving") == 2.0
    assert len(on_stream(broker.url, customer)) == sent


def test_a_killed_worker_is_started_again_and_the_groups_counters_never_go_down(
    groups: Callable[..., Group], demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    group = groups(demo_upstream.url, broker.url)
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    sent = until_every_worker_served(group, customer)
    metered = "edgemeter_metered_requests_total"
    assert total(group.metrics(), "edgemeter_metered_requests", metered) == sent
    victim = group.admin.workers()[1]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)

    def replaced() -> bool:
        now = group.admin.workers()[1]
        return now.pid not in (None, victim.pid) and now.state == "ready"

    wait_for(replaced, "worker 1 serving again")
    again = group.admin.workers()[1]
    assert again.restarts == 1
    assert again.pid in child_pids(group.proxy.pid)
    status, _ = group.admin.get("/healthz")
    assert status == 200
    for _ in range(6):
        request(group, customer)
    whole = group.metrics()
    # What the killed worker had counted stays in the sum: exactly every request, none lost.
    assert total(whole, "edgemeter_metered_requests", metered) == sent + 6
    assert total(whole, "edgemeter_worker_restarts", "edgemeter_worker_restarts_total") == 1


def test_readiness_lists_every_worker_and_a_worker_killed_with_the_broker_down_loses_nothing(
    groups: Callable[..., Group],
    demo_upstream: BackgroundDemo,
    stopped_nats_server: NatsServer,
    tap_of: Callable[[NatsServer], Any],
) -> None:
    tap = tap_of(stopped_nats_server)
    # An ack timeout long enough that no publish is retried: each goes out exactly once.
    group = groups(
        demo_upstream.url,
        tap.url,
        "meter_ready_broker_down_s=1",
        "meter_publish_timeout_ms=60000",
    )

    def both_unready() -> bool:
        status, body = group.admin.get("/readyz")
        return status == 503 and all(f"worker {i}: broker unreachable" in body for i in (0, 1))

    wait_for(both_unready, "each worker not ready while the broker is away")
    assert group.admin.get("/healthz")[0] == 200  # alive: only the broker is away
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    sent = until_every_worker_served(group, customer)
    spooled = total(group.metrics(1), "edgemeter_spool_envelopes")
    assert spooled > 0
    victim = group.admin.workers()[1].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)  # its envelopes are on disk, none published yet

    stopped_nats_server.start()
    asyncio.run(ensure_stream(stopped_nats_server.url))
    wait_for(lambda: group.admin.get("/readyz")[0] == 200, "ready once the broker is back")
    wait_for(lambda: len(on_stream(stopped_nats_server.url, customer)) >= sent, "all published")
    envelopes = on_stream(stopped_nats_server.url, customer)
    ids = [e["metadata"]["request_id"] for e in envelopes]
    assert len(ids) == len(set(ids)) == sent
    # Published once each on the wire: never two publishers of one spool.
    assert all(tap.published[i] == 1 for i in ids), {i: tap.published[i] for i in ids}
    for index in (0, 1):
        with Spool(group.proxy.spool_dir / f"worker-{index}") as spool:
            assert len(spool) == 0


def test_sigterm_drains_every_workers_spool_and_the_group_exits_0(
    groups: Callable[..., Group], demo_upstream: BackgroundDemo, stopped_nats_server: NatsServer
) -> None:
    group = groups(demo_upstream.url, stopped_nats_server.url)
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    sent = until_every_worker_served(group, customer)
    pids = [w.pid for w in group.admin.workers().values()]
    for index in (0, 1):
        assert total(group.metrics(index), "edgemeter_spool_envelopes") > 0
    stopped_nats_server.start()
    asyncio.run(ensure_stream(stopped_nats_server.url))
    assert group.proxy.stop(timeout=60) == 0
    assert len(on_stream(stopped_nats_server.url, customer)) == sent
    for index in (0, 1):
        with Spool(group.proxy.spool_dir / f"worker-{index}") as spool:
            assert len(spool) == 0
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def run_group(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgemeter.serve", "--workers", "2"]
    command += ["--mode", "reverse:http://127.0.0.1:9", "--set", f"confdir={tmp_path / 'conf'}"]
    command += ["--set", f"meter_spool_dir={tmp_path / 'spool'}", "--set", "meter_admin_listen="]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_port_taken_stops_the_group_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_group(tmp_path, "--listen-host", "127.0.0.1", "-p", str(port))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "worker 0 started" not in done.stderr
    assert not list((tmp_path / "spool").glob("worker-*"))


@pytest.mark.parametrize(
    ("option", "says"),
    [
        # Read by the supervisor: refused before any worker starts.
        ("meter_stream_usage=sometimes", "meter_stream_usage='sometimes'"),
        # Refused by the workers themselves (an option no addon of theirs declares): the group
        # stops instead of restarting them forever.
        ("flow_detail=2", "failed to start"),
    ],
)
def test_options_a_worker_would_refuse_stop_the_group(
    tmp_path: Path, option: str, says: str
) -> None:
    done = run_group(
        tmp_path, "--listen-host", "127.0.0.1", "-p", str(free_port()), "--set", option
    )
    assert done.returncode == 1
    assert says in done.stderr, done.stderr[-3000:]
    assert "starting it again" not in done.stderr


@pytest.mark.parametrize(
    ("args", "count", "rest"),
    [
        ([], 1, []),
        (["--workers", "4", "-p", "8086"], 4, ["-p", "8086"]),
        (["-p", "8086", "--workers=2"], 2, ["-p", "8086"]),
        (["--set", "meter_paths=/v1/", "--workers", "1"], 1, ["--set", "meter_paths=/v1/"]),
    ],
)
def test_the_number_of_workers_is_taken_out_of_the_runners_arguments(
    args: list[str], count: int, rest: list[str]
) -> None:
    assert take_workers(args) == (count, rest)


@pytest.mark.parametrize("bad", [["--workers"], ["--workers", "0"], ["--workers=x"]])
def test_a_number_of_workers_that_is_not_one_or_more_is_refused(bad: list[str]) -> None:
    with pytest.raises(WorkersError, match="positive integer"):
        take_workers(bad)


def test_every_interface_is_one_port_for_ipv4_and_ipv6() -> None:
    socks = bind_tcp("", 0)
    try:
        ports = {s.getsockname()[1] for s in socks}
        families = {s.family for s in socks}
        assert len(ports) == 1 and socket.AF_INET in families
        if socket.has_ipv6 and len(socks) > 1:
            assert socket.AF_INET6 in families
    finally:
        for sock in socks:
            sock.close()


def supervisor_of(*slots: dict[str, Any], began_s_ago: float = 120.0) -> Supervisor:
    """A supervisor whose workers said what `slots` say (no process started)."""
    settings = parse_settings({o.name: o.default for o in OPTIONS})
    admins = [socket.create_server(("127.0.0.1", 0)) for _ in slots]
    supervisor = Supervisor(len(slots), [], Plan((), None, None, settings), {}, None, admins)
    supervisor._began = time.monotonic() - began_s_ago
    for slot, said in zip(supervisor.slots, slots, strict=True):
        slot.admin.close()
        for name, value in said.items():
            setattr(slot, name, time.monotonic() - value if name == "answered_at" else value)
    return supervisor


UP = {"answered_at": 1.0, "up": True, "ready": True, "ever_up": True}


@pytest.mark.parametrize(
    ("slots", "status", "says"),
    [
        ([UP, UP], 200, "ok\n"),
        # A worker that hangs, or keeps failing to start, for longer than a minute.
        ([UP, UP | {"answered_at": 61.0, "up": False}], 503, "worker 1 has not answered for 61s"),
        ([UP, {"last_exit": "signal SIGKILL", "restarts": 1}], 503, "worker 1 has not answered"),
    ],
)
def test_the_group_is_alive_while_every_worker_answers_within_a_minute(
    slots: list[dict[str, Any]], status: int, says: str
) -> None:
    code, _, body = supervisor_of(*slots).health()
    assert (code, body.decode().count("\nworker ")) == (status, 2)
    assert says in body.decode()


@pytest.mark.parametrize(
    ("slots", "status", "says"),
    [
        ([UP, UP], 200, "ready\n"),
        # Restarting: the others take its connections.
        ([UP, {"last_exit": "signal SIGKILL"}], 200, "worker 1 (no process): restarting after"),
        ([UP, UP | {"ready": False, "reasons": "spool is full"}], 503, "worker 1: spool is full"),
        ([{}, {}], 503, "no worker is serving yet"),
    ],
)
def test_the_group_is_ready_while_every_serving_worker_is(
    slots: list[dict[str, Any]], status: int, says: str
) -> None:
    code, _, body = supervisor_of(*slots).readiness()
    assert code == status
    assert says in body.decode()
