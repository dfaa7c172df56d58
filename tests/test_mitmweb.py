"""mitmweb as a person settling a billing dispute uses it: a real Chromium (Debian's, driven by
Playwright) on a real `mitmweb -s addons/meter.py` in front of the demo upstream, traffic from
the official SDK, envelopes read back from a real JetStream stream. Takes the README's two
screenshots (docs/mitmweb-*.png)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.browser import CHROMIUM_ARGS, ensure_chromium
from tools.demo_upstream import BackgroundDemo
from tools.harness import (
    METER_ADDON,
    ROOT,
    MeterFactory,
    MeterProxy,
    NatsServer,
    free_port,
    wait_for_port,
)
from tools.streams import ensure_stream, stream_messages

MITMWEB = Path(sys.executable).parent / "mitmweb"
DOCS = ROOT / "docs"
API_KEY = f"sk-demo-{uuid.uuid4().hex}"  # must never show on a screenshot
# The README's flow list: the comment column added to mitmweb's default columns.
COLUMNS = ("icon", "path", "method", "status", "size", "time", "comment")


@dataclass(frozen=True)
class Web:
    proxy: MeterProxy
    port: int
    token: str

    def url(self, fragment: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}{fragment}"


@dataclass(frozen=True)
class Traffic:
    streamed: dict[str, Any]  # the envelope of a streamed chat completion (inject-strip)
    plain: dict[str, Any]  # the envelope of a non-streamed one
    aborted: dict[str, Any]  # the envelope of a stream its client hung up on


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = ensure_chromium()
    with sync_playwright() as pw:
        # Playwright gives each launch a fresh profile (user data dir) of its own.
        launched = pw.chromium.launch(executable_path=str(chromium), args=list(CHROMIUM_ARGS))
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def stream(module_nats_server: NatsServer) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    name, subject = f"WEB_{tag}", f"web.{tag}.usage"
    asyncio.run(ensure_stream(module_nats_server.url, name, [subject]))
    return name, subject


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory,
    mitmproxy_confdir: Path,
    demo_upstream: BackgroundDemo,
    module_nats_server: NatsServer,
    stream: tuple[str, str],
) -> Iterator[Web]:
    """mitmweb with the meter, as the README's debugging section starts it."""
    factory = MeterFactory(
        tmp_path_factory.mktemp("mitmweb"),
        mitmproxy_confdir,
        command=(str(MITMWEB), "-s", str(METER_ADDON)),
        name="mitmweb",
    )
    port, token = free_port(), uuid.uuid4().hex
    columns = [arg for column in COLUMNS for arg in ("--set", f"web_columns={column}")]
    proxy = factory.start(
        demo_upstream.url,
        module_nats_server.url,
        f"meter_subject={stream[1]}",
        "store_streamed_bodies=true",
        f"web_port={port}",
        "web_host=127.0.0.1",
        "web_open_browser=false",
        f"web_password={token}",
        extra=columns,
    )
    try:
        wait_for_port(port, timeout=30)
        yield Web(proxy, port, token)
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def traffic(web: Web, module_nats_server: NatsServer, stream: tuple[str, str]) -> Traffic:
    """A streamed chat completion whose client did not ask for usage (the meter injects and
    strips it), a non-streamed one, a failed one (not billed) and a stream cut off by its
    client, through mitmweb."""
    client = openai.OpenAI(
        base_url=f"{web.proxy.url}/v1",
        api_key=API_KEY,
        max_retries=0,
        default_headers={"x-tenant-id": "t_7"},
    )
    chat: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with client.chat.completions.create(
        **chat, stream=True, extra_headers={"x-customer-id": "cus_disputed"}
    ) as chunks:
        assert all(chunk.usage is None for chunk in chunks)  # stripped from what the client got
    client.chat.completions.create(**chat, extra_headers={"x-customer-id": "cus_other"})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            **chat, extra_headers={"x-customer-id": "cus_other", "x-demo-status": "500"}
        )
    slow = {"x-customer-id": "cus_aborted", "x-tenant-id": "t_7", "x-demo-delay-ms": "200"}
    with (
        httpx2.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{web.proxy.url}/v1/chat/completions",
            json={**chat, "stream": True},
            headers={"authorization": f"Bearer {API_KEY}", **slow},
        ) as response,
    ):
        next(response.iter_raw())  # the first bytes, then the client hangs up
    deadline = time.monotonic() + 30
    while len(published := asyncio.run(stream_messages(module_nats_server.url, stream[0]))) < 3:
        assert time.monotonic() < deadline, f"envelopes published: {published}"
        time.sleep(0.1)
    by_customer = {e["customer_id"]: e for e in (json.loads(data) for _, data in published)}
    return Traffic(
        streamed=by_customer["cus_disputed"],
        plain=by_customer["cus_other"],
        aborted=by_customer["cus_aborted"],
    )


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 760})
    try:
        yield context.new_page()
    finally:
        context.close()


def billed(envelope: dict[str, Any]) -> str:
    """What the comment says first: the amount debited and the outcome."""
    return f"{-envelope['amount_micro_omr'] / 1e6:.6f} OMR {envelope['metadata']['outcome']}"


def no_secret_visible(page: Page) -> None:
    text = page.inner_text("body")
    assert API_KEY not in text
    assert "Bearer" not in text


def rows(page: Page) -> list[dict[str, str]]:
    """The flow list as it is shown: the mark, status and comment of each row."""
    found = []
    for row in page.locator(".flow-table tbody tr.has-request").all():
        marker = row.locator(".col-path .marker")
        found.append(
            {
                "mark": marker.inner_text() if marker.count() else "",
                "status": row.locator(".col-status").inner_text(),
                "comment": row.locator(".col-comment").inner_text(),
            }
        )
    return found


def test_the_flow_list_marks_what_was_billed_and_how(
    web: Web, traffic: Traffic, page: Page
) -> None:
    page.goto(web.url())
    expect(page.locator(".flow-table tbody tr.has-request")).to_have_count(4, timeout=20_000)
    shown = rows(page)
    streamed, plain = traffic.streamed["metadata"], traffic.plain["metadata"]
    assert [(r["mark"], r["status"]) for r in shown] == [
        ("💰", "200"),
        ("💰", "200"),
        ("", "500"),
        ("💲", "200"),  # cut off before the usage came: estimated
    ]
    # The comment starts with amount, outcome and request id: what the narrow column shows.
    assert shown[0]["comment"].startswith(f"{billed(traffic.streamed)} {streamed['request_id']}")
    assert shown[1]["comment"].startswith(f"{billed(traffic.plain)} {plain['request_id']}")
    assert shown[2]["comment"] == ""
    assert shown[3]["comment"].startswith(
        f"{billed(traffic.aborted)} {traffic.aborted['metadata']['request_id']}"
    )
    no_secret_visible(page)
    page.screenshot(path=DOCS / "mitmweb-flow-list.png")


def test_a_flow_is_found_by_request_id_and_its_usage_view_shows_what_was_billed(
    web: Web, traffic: Traffic, page: Page
) -> None:
    meta = traffic.streamed["metadata"]
    page.goto(web.url())
    expect(page.locator(".flow-table tbody tr.has-request")).to_have_count(4, timeout=20_000)
    search = page.get_by_placeholder("Search")
    search.fill(f"~comment {meta['request_id']}")
    search.press("Enter")
    found = page.locator(".flow-table tbody tr.has-request")
    expect(found).to_have_count(1, timeout=10_000)
    # mitmweb keeps the search in the address: the README's link to a flow.
    assert f"s=~comment%20{meta['request_id']}" in page.url
    assert rows(page)[0]["comment"].startswith(f"{billed(traffic.streamed)} {meta['request_id']}")
    found.first.click()
    page.locator(".flow-detail nav a", has_text=re.compile("^Response$")).click()
    view = page.locator(".flow-detail")
    expect(view).to_contain_text("LLM usage", timeout=10_000)
    expect(view).to_contain_text("status: billed", timeout=10_000)
    text = view.inner_text()
    for line in (
        f'request_id: "{meta["request_id"]}"',
        'customer_id: "cus_disputed"',
        'usage_source: "reported"',
        f"tokens_used: {meta['tokens_used']}",
        f"input_tokens: {meta['input_tokens']}",
        f"output_tokens: {meta['output_tokens']}",
        f"amount_micro_omr: {traffic.streamed['amount_micro_omr']}",
        'request: added "stream_options": {"include_usage": true}',
        "1 usage-only event dropped",
    ):
        assert line in text, line
    no_secret_visible(page)
    page.set_viewport_size({"width": 1400, "height": 1280})  # the whole view, what changed too
    page.screenshot(path=DOCS / "mitmweb-usage-view.png")


def test_meter_status_reads_as_one_line_in_the_command_bar(
    web: Web, traffic: Traffic, page: Page
) -> None:
    # As a person opens it, once the page has loaded: a command bar shown from the first load
    # (`#/flows?c=true`) may read mitmweb's XSRF cookie before a later answer sets it anew,
    # and its commands then fail.
    page.goto(web.url())
    expect(page.locator(".flow-table tbody tr.has-request")).to_have_count(4, timeout=20_000)
    page.locator("nav a", has_text=re.compile("^Options$")).click()
    page.get_by_text("Display Command Bar").click()
    bar = page.locator(".command input")
    bar.fill("meter.status")
    bar.press("Enter")
    result = page.locator(".command-result")
    expect(result).to_contain_text("spooled:", timeout=10_000)
    text = result.inner_text()
    assert "metered openai.chat complete reported: 2 · not metered (non_2xx): 1" in text
    assert "\\n" not in text


def test_a_stream_cut_off_shows_what_was_billed_on_its_request(
    web: Web, traffic: Traffic, page: Page
) -> None:
    meta = traffic.aborted["metadata"]
    assert (meta["outcome"], meta["usage_source"]) == ("client_aborted", "estimated")
    page.goto(web.url(f"#/flows?s=~comment%20{meta['request_id']}"))
    found = page.locator(".flow-table tbody tr.has-request")
    expect(found).to_have_count(1, timeout=20_000)
    found.first.click()
    detail = page.locator(".flow-detail")
    detail.locator("nav a", has_text=re.compile("^Response$")).click()
    expect(detail).to_contain_text("Content is missing.", timeout=10_000)  # mitmproxy's own
    detail.locator("nav a", has_text=re.compile("^Request$")).click()
    expect(detail).to_contain_text("LLM usage", timeout=10_000)
    expect(detail).to_contain_text('outcome: "client_aborted"', timeout=10_000)
    assert f'request_id: "{meta["request_id"]}"' in detail.inner_text()
