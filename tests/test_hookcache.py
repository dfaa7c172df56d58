"""Dispatch through a hook cache: the same hooks in the same order as mitmproxy's own addon
manager, on a table of addon arrangements; kept current as addons come and go; installed into
mitmdump by the meter (meter_tune_mitmproxy) and taken out again."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from mitmproxy import addonmanager, exceptions, master
from mitmproxy.proxy.layers.http._hooks import HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from edgemeter import hookcache as dispatch
from edgemeter.addon import Meter
from edgemeter.hookcache import HookCache, InstalledHookCache
from tools.demo_upstream import BackgroundDemo
from tools.harness import MeterFactory, NatsServer, free_port
from tools.streams import ensure_stream, stream_messages

Log = list[str]


class Rec:
    """Records each hook it is given; its response hook is a sync one returning an awaitable."""

    def __init__(self, name: str, log: Log) -> None:
        self.name = name
        self.log = log

    def request(self, flow: Any) -> None:
        self.log.append(f"request:{self.name}")

    def response(self, flow: Any) -> Any:
        async def later() -> None:
            await asyncio.sleep(0)
            self.log.append(f"response:{self.name}")

        return later()

    def update(self, flows: Any) -> None:
        self.log.append(f"update:{self.name}")


class AsyncRec(Rec):
    async def request(self, flow: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(f"async-request:{self.name}")


class Boom:
    def request(self, flow: Any) -> None:
        raise RuntimeError("boom")


class Halt:
    def request(self, flow: Any) -> None:
        raise exceptions.AddonHalt()


class NotCallable:
    request = 5


class ModuleNamedLikeAHook:
    request = types.ModuleType("request")  # `from somewhere import request` in a script


class Parent:
    """An addon with children, as mitmproxy's script loader and each script are."""

    def __init__(self, name: str, *children: Any) -> None:
        self.name = name
        self.addons: list[Any] = list(children)


ARRANGEMENTS: dict[str, Callable[[Log], list[Any]]] = {
    "flat": lambda log: [Rec("a", log), Rec("b", log)],
    "nested children, depth first": lambda log: [
        Parent("p", Rec("a", log), Parent("q", Rec("b", log)), Rec("c", log)),
        Rec("d", log),
    ],
    "an error skips the rest of its top-level addon only": lambda log: [
        Parent("p", Rec("a", log), Boom(), Rec("b", log)),
        Rec("c", log),
    ],
    "AddonHalt ends the event": lambda log: [Rec("a", log), Halt(), Rec("b", log)],
    "a hook that is not callable is an error": lambda log: [
        Parent("p", NotCallable(), Rec("a", log)),
        Rec("b", log),
    ],
    "a module named like a hook is no hook": lambda log: [ModuleNamedLikeAHook(), Rec("a", log)],
    "async hooks are awaited in turn": lambda log: [AsyncRec("a", log), Rec("b", log)],
    "no addon has the hook": lambda log: [Parent("p")],
}


async def run_events(manager: Any) -> None:
    flow = tflow.tflow(resp=True)
    await manager.handle_lifecycle(HttpRequestHook(flow))
    await manager.handle_lifecycle(HttpResponseHook(flow))


async def dispatched(
    make: Callable[[Log], list[Any]], fast: bool, caplog: pytest.LogCaptureFixture
) -> tuple[Log, int]:
    """What the addons saw, and how many addon errors were logged."""
    m = master.Master(None)
    if fast:
        assert dispatch.install(m.addons)
    log: Log = []
    m.addons.add(*make(log))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        await run_events(m.addons)
    return log, sum("Addon error" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
async def test_the_hook_cache_calls_what_mitmproxys_manager_calls(
    arrangement: str, caplog: pytest.LogCaptureFixture
) -> None:
    make = ARRANGEMENTS[arrangement]
    stock = await dispatched(make, fast=False, caplog=caplog)
    fast = await dispatched(make, fast=True, caplog=caplog)
    assert fast == stock
    assert stock[0] or arrangement == "no addon has the hook"  # the table tests something


async def test_an_event_reaches_only_the_addons_that_have_its_hook() -> None:
    m = master.Master(None)
    cache = HookCache(m)
    log: Log = []
    a, boom, b = Rec("a", log), Boom(), Rec("b", log)
    cache.add(a, boom, Parent("p"), b)
    assert [top for top, _ in cache.hooked("request")] == [a, boom, b]
    assert cache.hooked("websocket_message") == []


async def test_children_registered_later_get_events_too() -> None:
    m = master.Master(None)
    cache = HookCache(m)
    log: Log = []
    parent = Parent("p")
    cache.add(parent)
    await run_events(cache)
    child = Rec("child", log)
    parent.addons.append(child)
    cache.register(child)  # how mitmproxy's script loader adds a script's addons
    await run_events(cache)
    cache.remove(child)
    parent.addons.remove(child)
    await run_events(cache)
    assert log == ["request:child", "update:child", "response:child", "update:child"]


async def test_children_reordered_are_called_in_their_new_order_after_an_option_change() -> None:
    """The script loader reorders scripts (no register, no remove) when `scripts` changes."""
    m = master.Master(None)
    assert dispatch.install(m.addons)
    log: Log = []
    parent = Parent("scripts", Rec("a", log), Rec("b", log))
    m.addons.add(parent)
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    parent.addons.reverse()
    m.options.changed.send({"scripts"})
    await m.addons.trigger_event(HttpRequestHook(tflow.tflow()))
    assert log == ["request:a", "request:b", "request:b", "request:a"]


async def test_install_swaps_only_a_stock_manager_and_uninstall_puts_it_back() -> None:
    m = master.Master(None)
    manager = m.addons
    listeners = len(m.options.changed.receivers)
    assert dispatch.install(manager)
    assert type(manager) is InstalledHookCache and m.addons is manager
    assert len(m.options.changed.receivers) == listeners + 1
    assert not dispatch.install(manager)  # once is enough
    assert dispatch.uninstall(manager)
    assert type(manager) is addonmanager.AddonManager
    assert len(m.options.changed.receivers) == listeners
    assert not dispatch.uninstall(manager)
    lean = HookCache(master.Master(None))  # the lean runner's: built so, left so
    assert not dispatch.install(lean) and not dispatch.uninstall(lean)
    assert type(lean) is HookCache


# -- the meter installs it ---------------------------------------------------------------------


async def test_the_meter_tunes_mitmproxy_while_it_runs_and_not_after(tmp_path: Path) -> None:
    addon = Meter()
    with taddons.context(addon) as tctx:
        dead = f"nats://127.0.0.1:{free_port()}"
        tctx.configure(
            addon, meter_spool_dir=str(tmp_path), meter_nats_url=dead, meter_admin_listen=""
        )
        manager = tctx.master.addons
        # Configured, not yet running: nothing is tuned. (The interpreter itself starts with a
        # few hundred objects frozen.)
        assert type(manager) is addonmanager.AddonManager
        untuned = gc.get_freeze_count()
        try:
            addon.running()
            assert type(manager) is InstalledHookCache
            assert gc.get_freeze_count() > untuned + 10_000
            tctx.configure(addon, meter_tune_mitmproxy=False)
            assert type(manager) is addonmanager.AddonManager
            assert gc.get_freeze_count() <= untuned
            tctx.configure(addon, meter_tune_mitmproxy=True)
            assert type(manager) is InstalledHookCache
            assert gc.get_freeze_count() > untuned + 10_000
            finished = addon.done()
            assert type(manager) is addonmanager.AddonManager
            assert gc.get_freeze_count() <= untuned
            assert finished is not None
            await finished
        finally:
            gc.unfreeze()  # whatever happened, the rest of the suite runs unfrozen


def test_only_the_release_it_was_proven_on_is_proven() -> None:
    assert dispatch.proven(dispatch.PROVEN_MITMPROXY)
    assert not dispatch.proven("12.2.4") and not dispatch.proven("13.0.0")


async def test_on_another_mitmproxy_the_meter_leaves_dispatch_alone_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dispatch, "proven", lambda version="13.0.0": False)
    assert not dispatch.install(master.Master(None).addons)
    addon = Meter()
    with taddons.context(addon) as tctx:
        dead = f"nats://127.0.0.1:{free_port()}"
        tctx.configure(
            addon, meter_spool_dir=str(tmp_path), meter_nats_url=dead, meter_admin_listen=""
        )
        frozen = gc.get_freeze_count()
        with caplog.at_level(logging.INFO, logger="edgemeter"):
            addon.running()
            tctx.configure(addon, meter_tune_mitmproxy=False)
            tctx.configure(addon, meter_tune_mitmproxy=True)
        assert type(tctx.master.addons) is addonmanager.AddonManager
        assert gc.get_freeze_count() == frozen
        said = [r for r in caplog.records if "proven against" in r.getMessage()]
        assert len(said) == 1
        finished = addon.done()
        assert finished is not None
        await finished


def test_mitmdump_with_the_meter_still_calls_a_script_loaded_after_it(
    meter_factory: MeterFactory,
    demo_upstream: BackgroundDemo,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    asyncio.run(ensure_stream(nats_server.url))
    script = tmp_path / "tag.py"
    script.write_text(
        "class Tag:\n"
        "    def responseheaders(self, flow):\n"
        "        flow.response.headers['x-after-meter'] = 'yes'\n"
        "addons = [Tag()]\n"
    )
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    for fast in ("true", "false"):
        proxy = meter_factory.start(
            demo_upstream.url,
            nats_server.url,
            f"meter_tune_mitmproxy={fast}",
            extra=("-s", str(script)),
        )
        raw = openai.OpenAI(
            base_url=f"{proxy.url}/v1",
            api_key="sk-test-dispatch-0123456789",
            max_retries=0,
            default_headers={"x-tenant-id": "t_dispatch", "x-customer-id": customer},
        ).chat.completions.with_raw_response.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-after-meter"] == "yes"
        installed = "hands each event only to the addons" in proxy.log_path.read_text()
        assert installed == (fast == "true")
    billed: list[Any] = []
    for _ in range(200):
        billed = [
            data
            for _, data in asyncio.run(stream_messages(nats_server.url, "CATALYST_SME"))
            if customer.encode() in data
        ]
        if len(billed) >= 2:
            break
        time.sleep(0.05)
    assert len(billed) == 2
