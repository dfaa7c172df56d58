"""Metering state of one request, from its headers to its envelope, independent of mitmproxy.

`FlowMeter.__call__` is the response stream callable: it passes every chunk on untouched and
parses usage on the side; `finish` turns what was seen into an envelope, or says why not.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from edgemeter import envelope, pricing
from edgemeter.envelope import Facts, Outcome
from edgemeter.sse import SSEDecoder
from edgemeter.usage import Api, Extraction

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """The request-side facts, captured at `requestheaders`."""

    request_id: str
    api: Api
    path: str
    started_at: float
    tenant_id: str
    customer_id: str
    client_request_id: str
    api_key_fingerprint: str


@dataclass(frozen=True, slots=True)
class Result:
    """An envelope ready to spool, or the reason there is none."""

    envelope: dict[str, Any] | None
    reason: str = ""


class FlowMeter:
    __slots__ = (
        "broken",
        "decoder",
        "extraction",
        "first_byte_at",
        "request",
        "request_body",
        "status_code",
        "stream",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.extraction = Extraction(request.api)
        self.request_body: bytes = b""
        self.status_code = 0
        self.stream = False
        self.first_byte_at: float | None = None
        self.decoder: SSEDecoder | None = None
        self.broken = False

    # -- response side ------------------------------------------------------------------------

    def start_stream(self, status_code: int) -> None:
        self.status_code = status_code
        self.stream = True
        self.decoder = SSEDecoder()

    def __call__(self, chunk: bytes) -> bytes:
        """The stream callable: returns the chunk unchanged, always (b"" at end of message)."""
        if self.broken or self.decoder is None:
            return chunk
        try:
            if chunk:
                if self.first_byte_at is None:
                    self.first_byte_at = time.time()
                events = self.decoder.feed(chunk)
            else:
                events = self.decoder.close()
            for ev in events:
                self.extraction.event(ev)
        except Exception:
            # A raising callable would drop the chunk on its way to the client: never let it.
            self.broken = True
            logger.exception("usage parsing failed; passing the rest of the stream through")
        return chunk

    def body(self, status_code: int, content: bytes | None, headers_at: float | None) -> None:
        """A whole (non-streamed) response body, already content-decoded."""
        self.status_code = status_code
        self.first_byte_at = headers_at
        if content:
            self.extraction.body(content)

    # -- the end ------------------------------------------------------------------------------

    def finish(
        self,
        *,
        aborted: bool,
        now: float,
        currency: str,
        micro_per_token: int,
    ) -> Result:
        ex = self.extraction
        if ex.invalid is not None:
            return Result(None, "invalid_usage")
        if self.decoder is not None and self.decoder.overflowed and ex.usage is None:
            return Result(None, "event_too_large")
        usage = ex.usage
        if usage is None:
            return Result(None, "aborted_without_usage" if aborted else "no_usage")
        outcome: Outcome = "complete"
        if aborted:
            outcome = "client_aborted"
        elif ex.error is not None:
            outcome = "upstream_error"
        req = self.request
        facts = Facts(
            request_id=req.request_id,
            api=req.api,
            path=req.path,
            stream=self.stream,
            status_code=self.status_code,
            model=ex.model or requested_model(self.request_body) or "unknown",
            tenant_id=req.tenant_id,
            customer_id=req.customer_id,
            started_at=req.started_at,
            completed_at=now,
            first_byte_at=self.first_byte_at,
            outcome=outcome,
            usage_source="reported",
            currency=currency,
            client_request_id=req.client_request_id,
            upstream_id=ex.upstream_id or "",
            api_key_fingerprint=req.api_key_fingerprint,
        )
        price = pricing.flat_price(usage, micro_per_token)
        return Result(envelope.build(facts, usage, price))


def requested_model(body: bytes) -> str:
    """The `model` of a JSON request body; parsed only when the response did not name one."""
    if b'"model"' not in body:
        return ""
    try:
        obj = json.loads(body)
    except ValueError:
        return ""
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else ""
