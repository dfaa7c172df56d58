"""Drives the meter addon through mitmproxy's hooks in flow order, as the proxy would."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow, tutils

from edgemeter.addon import Meter
from edgemeter.metering.flow import DEFAULT_LIMITS, FlowMeter, Limits, Request
from tests.corpus import chunked

KEY = "sk-live-0123456789abcdef"


def make_flow(path: str = "/v1/chat/completions", method: str = "POST") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = method
    flow.request.path = path
    flow.request.headers["authorization"] = f"Bearer {KEY}"
    flow.request.headers["x-tenant-id"] = "t_7"
    flow.request.headers["x-customer-id"] = "cus_42"
    flow.request.headers["x-request-id"] = "client-req-1"
    flow.request.content = json.dumps({"model": "requested-model", "messages": []}).encode()
    return flow


async def run_flow(
    addon: Meter, flow: http.HTTPFlow, status: int, body: bytes, stream: bool, size: int = 7
) -> bytes:
    """Drives the hooks in mitmproxy's order; returns the bytes the client would receive."""
    addon.requestheaders(flow)
    addon.request(flow)
    ctype = "text/event-stream" if stream else "application/json"
    flow.response = tutils.tresp(status_code=status, headers=http.Headers(content_type=ctype))
    flow.response.content = b"" if stream else body
    addon.responseheaders(flow)
    sent = b""
    if stream:
        assert callable(flow.response.stream)
        for chunk in [*chunked(body, size), b""]:
            out = flow.response.stream(chunk)
            sent += out if isinstance(out, bytes) else b"".join(out)
    else:
        sent = body
    pending = addon.response(flow)
    if pending is not None:
        await pending
    return sent


def spooled(addon: Meter) -> list[dict[str, Any]]:
    assert addon.spool is not None
    return [json.loads(data) for _, data in addon.spool.read_page("", 100)]


def flow_meter(
    api: str = "openai.chat",
    *,
    path: str = "/v1/chat/completions",
    limits: Limits = DEFAULT_LIMITS,
    injected: bool = False,
    request_body: bytes = b"",
    tenant: str = "",
    customer: str = "",
) -> FlowMeter:
    """A FlowMeter for one request, without mitmproxy."""
    m = FlowMeter(Request("id", api, path, 0.0, tenant, customer, "", ""), limits)
    m.request_body = request_body
    m.injected = injected
    return m


def feed_stream(m: FlowMeter, chunks: list[bytes]) -> bytes:
    """Feeds the chunks, then the end of the body (b""), as mitmproxy does; returns what the
    client receives."""
    out = b""
    for chunk in [*chunks, b""]:
        sent = m(chunk)
        assert isinstance(sent, bytes | list)
        out += sent if isinstance(sent, bytes) else b"".join(sent)
    return out
