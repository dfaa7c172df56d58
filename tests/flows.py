"""Drives the meter addon through mitmproxy's hooks in flow order, as the proxy would."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow, tutils

from edgemeter.addon import UNBILLABLE_REASON_HEADER, Meter
from edgemeter.metering.contract import check, consume, route
from edgemeter.metering.envelope import encode
from edgemeter.metering.flow import DEFAULT_LIMITS, FlowMeter, Limits, Request
from spool.routing import unpack
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


def upgraded(
    addon: Meter,
    path: str = "/v1/realtime?model=gpt-realtime",
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    """A Realtime WebSocket flow past its upgrade (the hooks up to `response`), no messages yet."""
    flow = tflow.twebsocketflow()
    assert flow.websocket is not None
    flow.websocket.messages.clear()
    flow.request.path = path
    flow.request.headers.update(headers or {})
    response, flow.response = flow.response, None
    addon.requestheaders(flow)
    addon.request(flow)
    flow.response = response
    addon.responseheaders(flow)
    assert addon.response(flow) is None
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


def published(addon: Meter) -> list[tuple[str, dict[str, str], bytes]]:
    """(subject, headers, body) of every spooled envelope, as the publisher will send it."""
    assert addon.spool is not None and addon.settings is not None
    addon.spool.drain_journal()  # as its timer would, a moment later
    found = []
    for _, value in addon.spool.read_page("", 100):
        where, body = unpack(value)
        found.append((where.subject or addon.settings.subject, dict(where.headers), body))
    return found


def spooled(addon: Meter) -> list[dict[str, Any]]:
    return [json.loads(body) for _, _, body in published(addon)]


def assert_contract(addon: Meter) -> list[str]:
    """Every spooled envelope is one the billing consumer books (a customer new to it) on
    meter_subject, or one on meter_unbillable_subject, with the reason the edge check gives
    in its header and metadata. Returns the reasons of the unbillable ones."""
    assert addon.settings is not None
    reasons = []
    for subject, headers, body in published(addon):
        envelope = json.loads(body)
        if subject == addon.settings.subject:
            assert consume(body) == ("book", ""), envelope
            assert "unbillable_reason" not in envelope["metadata"]
            continue
        assert subject == addon.settings.unbillable_subject
        meta = envelope["metadata"]
        reason = meta.pop("unbillable_reason")
        assert headers[UNBILLABLE_REASON_HEADER] == reason
        assert check(envelope) == reason != ""
        assert consume(body)[0] != "book", (reason, envelope)
        reasons.append(reason)
    return reasons


def assert_books_or_reconciles(envelope: dict[str, Any], data: bytes) -> str:
    """The edge's decision on a built envelope (`data` its bytes) holds up against the model
    of the consumer: billing books it unchanged, else it is marked for reconciliation with the
    reason the edge check gives, and the consumer would not have booked it. Returns that
    reason ("" for billing)."""
    routed = route(envelope)
    if routed.destination == "billing":
        assert routed.envelope is envelope
        assert consume(data) == ("book", ""), envelope
        return ""
    assert routed.destination == "reconciliation"
    assert routed.reason == check(envelope) != ""
    assert routed.envelope["metadata"]["unbillable_reason"] == routed.reason
    assert consume(data)[0] != "book", envelope
    assert consume(encode(routed.envelope))[0] != "book"
    return routed.reason


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
