"""Metering state of one request, from its headers to its envelope, independent of mitmproxy.

`FlowMeter.__call__` is the response stream callable: it passes chunks on as they arrive and
parses usage on the side; `finish` turns what was seen into an envelope, or says why not.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgemeter import envelope, estimate
from edgemeter.decoding import Decode, UnsupportedEncoding, decoder_for
from edgemeter.envelope import Facts, Outcome, UsageSource
from edgemeter.include_usage import split_events, strip_event
from edgemeter.pricing import Price
from edgemeter.settings import CountRule
from edgemeter.sse import SSEDecoder, SSEEvent
from edgemeter.usage import Api, Extraction, Usage, normalize_openai

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
        "decode",
        "decoder",
        "extraction",
        "first_byte_at",
        "held",
        "injected",
        "request",
        "request_body",
        "status_code",
        "stream",
        "strip",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.extraction = Extraction(request.api)
        self.request_body: bytes = b""
        self.status_code = 0
        self.stream = False
        self.first_byte_at: float | None = None
        self.decoder: SSEDecoder | None = None
        self.decode: Decode | None = None
        # The meter added include_usage to the request (see include_usage.inject).
        self.injected = False
        # Remove that usage from the client's stream; then events are passed on whole.
        self.strip = False
        self.held = b""
        self.broken = False

    # -- response side ------------------------------------------------------------------------

    def start_stream(self, status_code: int, content_encoding: str, strip: bool) -> bool:
        """Prepare to meter an SSE body. Returns whether the client gets decoded bytes (so the
        caller drops Content-Encoding): only when stripping a compressed stream."""
        self.status_code = status_code
        self.stream = True
        self.decoder = SSEDecoder()
        self.strip = strip and self.injected
        try:
            self.decode = decoder_for(content_encoding)
        except UnsupportedEncoding:
            # Metering blind is better than touching bytes we cannot read.
            self.broken = True
            self.strip = False
            return False
        return self.strip and self.decode is not None

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        """The stream callable. Without stripping every chunk is returned as it came, at once."""
        if self.strip:
            return self._strip(chunk)
        if not self.broken:
            self._meter(chunk)
        return chunk

    def _meter(self, chunk: bytes) -> None:
        try:
            if self.first_byte_at is None and chunk:
                self.first_byte_at = time.time()
            decoded = self.decode(chunk) if self.decode is not None and chunk else chunk
            self._events(decoded, end=not chunk)
        except Exception:
            # A raising callable would drop the chunk on its way to the client: never let it.
            self.broken = True
            logger.warning("usage parsing failed; passing the rest of the stream through")

    def _events(self, data: bytes, *, end: bool) -> None:
        assert self.decoder is not None
        events: list[SSEEvent] = self.decoder.feed(data) if data else []
        if end:
            events += self.decoder.close()
        for ev in events:
            self.extraction.event(ev)

    def _strip(self, chunk: bytes) -> list[bytes]:
        """Pass on whole events only, minus the usage the meter caused. Returns a list: b""
        would end an HTTP/1.1 chunked body early."""
        try:
            if self.first_byte_at is None and chunk:
                self.first_byte_at = time.time()
            data = self.decode(chunk) if self.decode is not None and chunk else chunk
            if chunk:
                raw_events, self.held = split_events(self.held + data)
            else:
                raw_events, self.held = [self.held] if self.held else [], b""
            out = []
            for raw in raw_events:
                self._events(raw, end=False)
                out.append(strip_event(raw))
            if not chunk:
                self._events(b"", end=True)
            sent = b"".join(out)
            return [sent] if sent else []
        except Exception:
            # Fall back to passing bytes on untouched: a broken meter must not break the stream.
            logger.warning("usage stripping failed; passing the rest of the stream through")
            self.broken, self.strip = True, False
            rest, self.held = self.held, b""
            return [rest + chunk] if rest or chunk else []

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
        price_of: Callable[[Usage, str], Price],
        anthropic_counts: Sequence[CountRule] = (),
    ) -> Result:
        """`price_of(usage, model)` prices the usage (a price table, or flat);
        `anthropic_counts` are the routes whose OpenAI-shaped counts follow Anthropic's rules."""
        ex = self.extraction
        if ex.invalid is not None:
            return Result(None, "invalid_usage")
        usage, source = ex.usage, "reported"
        if self.decoder is not None and self.decoder.overflowed and usage is None:
            return Result(None, "event_too_large")
        if ex.error is not None and usage is None and not aborted:
            return Result(None, "upstream_error_without_usage")
        if self.broken and usage is None:
            return Result(None, "unparsable_stream")
        if usage is None:
            # Never silently free: what was asked and what was streamed, estimated.
            usage, source = self._estimate(Usage()), "estimated"
        elif aborted and (estimated := self._estimate(usage)).output_tokens > usage.output_tokens:
            # An Anthropic stream reports output_tokens=1 at its start; a client that hung up
            # after 500 tokens has still consumed them.
            usage, source = estimated, "estimated"
        model = ex.model or requested_model(self.request_body) or "unknown"
        if (
            source == "reported"
            and self.request.api.startswith("openai.")
            and self.request.api != "openai.responses"
            and any(rule.matches(self.request.path, model) for rule in anthropic_counts)
        ):
            usage = normalize_openai(usage.raw, anthropic_counts=True)
        outcome: Outcome = "complete"
        if aborted:
            outcome = "client_aborted"
        elif ex.error is not None:
            outcome = "upstream_error"
        usage_source: UsageSource = "estimated" if source == "estimated" else "reported"
        req = self.request
        facts = Facts(
            request_id=req.request_id,
            api=req.api,
            path=req.path,
            stream=self.stream,
            status_code=self.status_code,
            model=model,
            tenant_id=req.tenant_id,
            customer_id=req.customer_id,
            started_at=req.started_at,
            completed_at=now,
            first_byte_at=self.first_byte_at,
            outcome=outcome,
            usage_source=usage_source,
            currency=currency,
            client_request_id=req.client_request_id,
            upstream_id=ex.upstream_id or "",
            api_key_fingerprint=req.api_key_fingerprint,
        )
        return Result(envelope.build(facts, usage, price_of(usage, facts.model)))

    def _estimate(self, reported: Usage) -> Usage:
        """Reported counts kept; missing input from the request, output from the text seen."""
        output = max(reported.output_tokens, estimate.tokens(self.extraction.output_chars), 1)
        if self.request.api == "openai.embeddings":
            output = 0  # embeddings produce no tokens
        inp = reported.input_tokens or estimate.request_tokens(self.request_body)
        return replace(reported, input_tokens=inp, output_tokens=output)


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
