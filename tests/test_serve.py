"""The lean runner (`python -m edgemeter.serve`) end to end: a real process in front of the demo
upstream, the official OpenAI SDK as the client, envelopes read back from a real nats-server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgemeter import serve
from edgemeter.addon import Meter
from edgemeter.hookcache import HookCache
from edgemeter.serve import LeanMaster
from spool.store import Spool
from tools.demo_upstream import BackgroundDemo
from tools.harness import (
    ROOT,
    GroupAdmin,
    MeterFactory,
    MeterProxy,
    NatsServer,
    child_pids,
    free_port,
)
from tools.streams import ensure_stream, stream_messages

STREAM = "CATALYST_SME"
CHAT: Any = [{"role": "user", "content": "hello world"}]


@pytest.fixture
def runner(tmp_path: Path, mitmproxy_confdir: Path) -> Iterator[MeterFactory]:
    """Lean runners (`python -m edgemeter.serve`), started like the mitmdump meters."""
    r = MeterFactory(
        tmp_path / "runs", mitmproxy_confdir, [sys.executable, "-m", "edgemeter.serve"], "lean"
    )
    try:
        yield r
    finally:
        r.stop_all()


@pytest.fixture
def broker(nats_server: NatsServer) -> NatsServer:
    asyncio.run(ensure_stream(nats_server.url))
    return nats_server


def envelopes(nats_url: str, customer: str, count: int, timeout: float = 20.0) -> list[Any]:
    """The customer's envelopes on the stream, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            (headers, json.loads(data))
            for headers, data in asyncio.run(stream_messages(nats_url, STREAM))
            if json.loads(data).get("customer_id") == customer
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def client(proxy: MeterProxy, customer: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="sk-test-lean-0123456789",
        max_retries=0,
        default_headers={"x-tenant-id": "t_lean", "x-customer-id": customer},
    )


def test_a_chat_completion_through_the_lean_runner_lands_on_the_stream(
    runner: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    proxy = runner.start(demo_upstream.url, broker.url)
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    answer = client(proxy, customer).chat.completions.create(model="demo-chat", messages=CHAT)
    streamed = client(proxy, customer).chat.completions.create(
        model="demo-chat", messages=CHAT, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert answer.usage is not None
    assert text == answer.choices[0].message.content
    found = envelopes(broker.url, customer, 2)
    assert len(found) == 2
    by_stream = {env["metadata"]["stream"]: (headers, env) for headers, env in found}
    headers, env = by_stream[False]
    assert headers["Nats-Msg-Id"] == env["metadata"]["request_id"]
    assert env["metadata"]["tokens_used"] == answer.usage.total_tokens
    assert env["metadata"]["tenant_id"] == "t_lean"
    assert by_stream[True][1]["metadata"]["outcome"] == "complete"
    assert by_stream[True][1]["metadata"]["usage_source"] == "reported"


def test_options_given_with_set_reach_the_meter(
    runner: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    proxy = runner.start(
        demo_upstream.url,
        broker.url,
        "meter_customer_header=x-account",
        "meter_price_micro_per_token=1000",
    )
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="sk-test",
        max_retries=0,
        default_headers={"x-account": customer},
    ).chat.completions.create(model="demo-chat", messages=CHAT)
    [(_, env)] = envelopes(broker.url, customer, 1)
    assert env["amount_micro_omr"] == -1000 * env["metadata"]["tokens_used"]


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("meter_stream_usage=sometimes", "meter_stream_usage"),
        ("flow_detail=2", "flow_detail"),  # mitmdump's flow printer is not loaded here
    ],
)
def test_a_bad_or_unknown_option_stops_startup(tmp_path: Path, option: str, says: str) -> None:
    args = [sys.executable, "-m", "edgemeter.serve", "--mode", "reverse:http://127.0.0.1:9"]
    args += ["-p", str(free_port()), "--set", f"confdir={tmp_path}", "--set", option]
    args += ["--set", f"meter_spool_dir={tmp_path / 'spool'}", "--set", "meter_admin_listen="]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0
    assert says in done.stdout + done.stderr


def test_sigterm_publishes_what_is_spooled_and_exits_cleanly(
    runner: MeterFactory, demo_upstream: BackgroundDemo, stopped_nats_server: NatsServer
) -> None:
    # The broker is down while the requests are answered: the envelopes wait in the spool.
    proxy = runner.start(demo_upstream.url, stopped_nats_server.url)
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        client(proxy, customer).chat.completions.create(model="demo-chat", messages=CHAT)
    with Spool(proxy.spool_dir) as spool:
        # The last one may still be in the meter's journal for its 20 ms.
        deadline = time.monotonic() + 10
        while len(spool) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(spool) == 3
    stopped_nats_server.start()
    asyncio.run(ensure_stream(stopped_nats_server.url))
    assert proxy.stop() == 0
    assert len(envelopes(stopped_nats_server.url, customer, 3, timeout=5)) == 3
    with Spool(proxy.spool_dir) as spool:
        assert len(spool) == 0


def test_a_shutdown_while_another_process_locks_the_spool_ends_and_loses_nothing(
    runner: MeterFactory, demo_upstream: BackgroundDemo, stopped_nats_server: NatsServer
) -> None:
    """The journal's last envelopes cannot reach the database: the shutdown does not wait for
    it forever, and they wait in the journal for the next start."""
    proxy = runner.start(demo_upstream.url, stopped_nats_server.url, "meter_shutdown_drain_ms=500")
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    locker = sqlite3.connect(proxy.spool_dir / "cache.db", isolation_level=None, timeout=10)
    try:
        locker.execute("BEGIN IMMEDIATE")  # e.g. an operator's tool holding the write lock
        client(proxy, customer).chat.completions.create(model="demo-chat", messages=CHAT)
        assert proxy.stop(timeout=30) == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with Spool(proxy.spool_dir) as spool:  # the next start replays the journal
        [(_, body)] = spool.read_page("", 10)
        assert json.loads(body)["customer_id"] == customer


def test_a_script_given_with_s_is_loaded_next_to_the_meter(
    runner: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer, tmp_path: Path
) -> None:
    script = tmp_path / "tag.py"
    script.write_text(
        "class Tag:\n"
        "    def responseheaders(self, flow):\n"
        "        flow.response.headers['x-lean-script'] = 'yes'\n"
        "addons = [Tag()]\n"
    )
    proxy = runner.start(demo_upstream.url, broker.url, extra=("-s", str(script)))
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    raw = client(proxy, customer).chat.completions.with_raw_response.create(
        model="demo-chat", messages=CHAT
    )
    assert raw.headers["x-lean-script"] == "yes"
    assert len(envelopes(broker.url, customer, 1)) == 1


async def test_the_lean_master_carries_the_meter_and_not_mitmdumps_flow_printer() -> None:
    from mitmproxy import options

    m = LeanMaster(options.Options())
    names = {type(a).__name__ for a in m.addons.chain}
    assert {"Meter", "Proxyserver", "NextLayer", "TlsConfig", "Block"} <= names
    assert "Dumper" not in names
    assert isinstance(m.addons, HookCache)


async def test_every_runner_adds_the_packages_meter_by_import() -> None:
    """No file is loaded by path: an installed package (the container image) serves as is."""
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    for m in (LeanMaster(options.Options()), serve.metered(DumpMaster)(options.Options())):
        [meter] = [a for a in m.addons.chain if isinstance(a, Meter)]
        assert type(meter).__module__ == "edgemeter.addon"
    core = serve.CoreMaster(options.Options())
    assert not [a for a in core.addons.chain if isinstance(a, Meter)]


async def test_the_mitmweb_runner_puts_the_meter_before_the_view_that_feeds_the_ui() -> None:
    """mitmweb sends a flow to its UI from the view's response hook: a meter after it would set
    comment, mark and envelope only after the UI got the flow (as `-s` would not)."""
    from mitmproxy import options
    from mitmproxy.tools.web.master import WebMaster

    chain = [type(a).__name__ for a in serve.metered(WebMaster)(options.Options()).addons.chain]
    assert chain.index("Meter") == chain.index("ScriptLoader") + 1
    assert chain.index("Meter") < chain.index("View")


def test_workers_1_is_the_runner_alone_on_its_own_spool(
    runner: MeterFactory, demo_upstream: BackgroundDemo, broker: NatsServer
) -> None:
    admin = free_port()
    proxy = runner.start(
        demo_upstream.url,
        broker.url,
        f"meter_admin_listen=127.0.0.1:{admin}",
        extra=("--workers", "1"),
    )
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    client(proxy, customer).chat.completions.create(model="demo-chat", messages=CHAT)
    assert len(envelopes(broker.url, customer, 1)) == 1
    # No supervisor: the process started serves, its spool is meter_spool_dir itself, and the
    # admin endpoint at meter_admin_listen is its own (a meter's /readyz says just that).
    assert child_pids(proxy.pid) == []
    assert (proxy.spool_dir / "cache.db").is_file()
    assert not list(proxy.spool_dir.glob("worker-*"))
    status, body = GroupAdmin(admin).get("/readyz")
    assert (status, body) == (200, "ready\n")
