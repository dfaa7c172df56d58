"""Metering state of one request, from its headers to its envelope, independent of mitmproxy.

`FlowMeter.__call__` is the response stream callable: it passes chunks on as they arrive and
parses usage on the side; `finish` turns what was seen into an envelope, or says why not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgemeter.errors import (
    BodyTooLarge,
    DecodeError,
    DecompressionLimit,
    InvalidUsage,
    UnsupportedEncoding,
)
from edgemeter.metering import envelope, estimate
from edgemeter.metering.apis.shape import Asked
from edgemeter.metering.attribution import Source
from edgemeter.metering.decoding import (
    Decoder,
    body_tail,
    decode_body,
    decoder_for,
)
from edgemeter.metering.envelope import Facts, Outcome, UsageSource
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.prices import Price
from edgemeter.metering.sse import DEFAULT_MAX_EVENT_BYTES, EventSplitter, SSEDecoder, SSEEvent
from edgemeter.metering.stream_usage import strip_event
from edgemeter.metering.usage import CountRule, Usage, clean_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """The request-side facts, captured at `requestheaders`."""

    request_id: str
    api: str
    path: str
    started_at: float
    tenant_id: str
    customer_id: str
    client_request_id: str
    api_key_fingerprint: str
    attribution: Source = "headers"


@dataclass(frozen=True, slots=True)
class Limits:
    """What one response may cost the meter (meter_max_body_mb, meter_max_event_kb)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES


DEFAULT_LIMITS = Limits()
# A body too large to parse has only its end scanned for usage (Extraction.tail), decoding at
# most this factor times the body limit to get there.
TAIL_BYTES = 64 * 1024
_TAIL_DECODE_FACTOR = 4


@dataclass(frozen=True, slots=True)
class Result:
    """An envelope and its encoded bytes, ready to spool, or the reason there is none. With an
    envelope, `reason` names what it was billed despite (oversize, invalid_usage, ...), "" when
    nothing."""

    envelope: dict[str, Any] | None
    reason: str = ""
    data: bytes = b""


class FlowMeter:
    __slots__ = (
        "broken",
        "decode",
        "decoded_out",
        "decoder",
        "early",
        "extraction",
        "first_byte_at",
        "injected",
        "limits",
        "on_final",
        "quick",
        "request",
        "request_body",
        "request_type",
        "response_type",
        "shape",
        "splitter",
        "status_code",
        "stopped",
        "stream",
        "strip",
        "stripped",
        "trimmed",
        "truncated",
    )

    def __init__(self, request: Request, limits: Limits = DEFAULT_LIMITS) -> None:
        self.request = request
        self.limits = limits
        self.extraction = Extraction(request.api)
        self.shape = self.extraction.shape
        self.request_body: bytes = b""
        # Content-Types, kept for the shapes that read more than JSON (multipart uploads, text
        # or audio answers): the request's only when the shape asks for it.
        self.request_type = ""
        self.response_type = ""
        self.status_code = 0
        self.stream = False
        self.first_byte_at: float | None = None
        self.decoder: SSEDecoder | None = None
        self.decode: Decoder | None = None
        # The meter added include_usage to the request (see include_usage.inject).
        self.injected = False
        # Remove that usage from the client's stream; then events are passed on whole.
        self.strip = False
        self.splitter: EventSplitter | None = None
        # What stripping took out: usage-only events dropped, events that lost their usage key.
        self.stripped = 0
        self.trimmed = 0
        # The client gets decoded bytes (stripping a compressed stream), to the end.
        self.decoded_out = False
        # Why parsing stopped early (oversize_event, decompression_limit, oversize); the bytes
        # still flow, and what was seen is billed (see finish).
        self.stopped = ""
        # A decoded stream the rest of which cannot be decoded: the client gets no more.
        self.truncated = False
        self.broken = False
        # Called once, from the stream callable, when the stream's last event has been parsed
        # and before it is passed on (see Meter: the envelope is spooled then).
        self.on_final: Callable[[FlowMeter], None] | None = None
        # What that call spooled: set by its owner, read at the end of the flow.
        self.early: Any = None
        # A whole event in a chunk can be metered without framing (see __call__, _idle).
        self.quick = False

    # -- response side ------------------------------------------------------------------------

    def start_stream(self, status_code: int, content_encoding: str, strip: bool) -> bool:
        """Prepare to meter an SSE body. Returns whether the client gets decoded bytes (so the
        caller drops Content-Encoding): only when stripping a compressed stream."""
        self.status_code = status_code
        self.stream = True
        self.decoder = SSEDecoder(self.limits.max_event_bytes)
        self.strip = strip and self.injected
        try:
            self.decode = decoder_for(content_encoding)
        except UnsupportedEncoding:
            # Metering blind is better than touching bytes we cannot read.
            self.broken = True
            self.strip = False
            return False
        if self.strip:
            self.splitter = EventSplitter()
        self.decoded_out = self.strip and self.decode is not None
        self.quick = self._idle()
        return self.decoded_out

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        """The stream callable. Without stripping every chunk is returned as it came, at once.

        A chunk that is one whole event, nothing held before it (`quick`), is metered here
        without framing: what the framing paths (_meter, _strip) make of it. Upstreams flush one
        event per chunk, so this is the path of nearly every chunk, kept to a handful of calls:
        a `data:` line and its blank line is recognised inline (what SSEDecoder.whole does,
        ~1,600 Ir less a chunk than calling it, callgrind), anything else asks `whole`."""
        if self.first_byte_at is None and chunk:
            self.first_byte_at = time.time()
        if self.quick:
            assert self.decoder is not None
            head, _, rest = chunk.partition(b"\n")
            name = ""
            data: bytes | None = None
            if (
                rest == b"\n"
                and (data := head.removeprefix(b"data: ")) is not head
                and head.find(b"\r") < 0  # find and partition: see SSEDecoder.whole
                and len(chunk) <= self.limits.max_event_bytes
            ):
                pass
            elif (event := self.decoder.whole(chunk)) is not None:
                name, data = event
            else:
                data = None
            if data is not None:
                try:
                    ex = self.extraction
                    ex.data(data, name)
                    if ex.final and self.on_final is not None:
                        self._finalized()
                    # Only an event that names a usage object can lose it (strip_event): the
                    # shape searched for one already (usage_named: ~1,600 Ir a chunk less).
                    if self.strip and ex.usage_named:
                        sent = strip_event(chunk)
                        # The same object when nothing was taken out: every include_usage chunk
                        # carries "usage":null, so this is the path of nearly every chunk here.
                        return [chunk] if sent is chunk else self._stripped(chunk, sent)
                except Exception as e:
                    # As on the framing paths: the chunk goes on untouched, parsing stops.
                    self._warn("usage parsing failed", e)
                    self.broken, self.strip, self.quick = True, False, False
                return chunk
        out: bytes | list[bytes] = chunk
        if self.strip or self.decoded_out:
            out = self._strip(chunk)
        elif not self.broken and not self.stopped:
            self._meter(chunk)
        # Framing may hold part of an event now, or have stopped parsing.
        self.quick = self._idle()
        return out

    def _idle(self) -> bool:
        """Whether a chunk that is one whole event can be metered without framing: an
        uncompressed stream still parsed, with nothing held by the decoder or the splitter."""
        return (
            self.decode is None
            and not (self.broken or self.stopped)
            and (self.splitter is None or not self.splitter.pending)
            and self.decoder is not None
            and self.decoder.idle()
        )

    def _meter(self, chunk: bytes) -> None:
        try:
            if self.decode is None or not chunk:
                self._events(chunk, end=not chunk)
                return
            for piece in self.decode.feed(chunk):
                self._events(piece, end=False)
                if self.stopped:
                    return  # nothing more is parsed: decoding on would only cost CPU
        except DecompressionLimit:
            self._stop("decompression_limit")
        except Exception as e:
            # A raising callable would drop the chunk on its way to the client: never let it.
            self.broken = True
            self._warn("usage parsing failed", e)

    def _events(self, data: bytes, *, end: bool) -> None:
        assert self.decoder is not None
        events: list[SSEEvent] = self.decoder.feed(data) if data else []
        if end:
            events += self.decoder.close()
        for ev in events:
            self.extraction.event(ev)
        if self.decoder.overflowed:
            self._stop("oversize_event")
        if self.extraction.final and self.on_final is not None:
            self._finalized()

    def _finalized(self) -> None:
        """The last event is parsed: on_final, once."""
        assert self.on_final is not None
        callback, self.on_final = self.on_final, None
        callback(self)

    def _warn(self, what: str, e: Exception) -> None:
        logger.warning(
            f"request {self.request.request_id}: {what} ({type(e).__name__}: {e}); "
            "passing the rest of the stream through"
        )

    def _stop(self, reason: str) -> None:
        """Parsing ends for this stream only; its bytes go on flowing. The first reason stays.
        Stripping ends too: the usage event the meter asked for then reaches the client as
        the upstream sent it (as with meter_stream_usage=inject)."""
        self.stopped = self.stopped or reason
        self.strip = False

    def _strip(self, chunk: bytes) -> list[bytes]:
        """Pass on whole events only, minus the usage the meter caused; once stripping stopped,
        the rest as it comes (decoded, if the client was told so). Returns a list: b"" would
        end an HTTP/1.1 chunked body early."""
        if self.truncated:
            return []
        out: list[bytes] = []
        try:
            if self.decode is not None and chunk:
                for piece in self.decode.feed(chunk):
                    self._strip_piece(piece, out)
            else:
                self._strip_piece(chunk, out)
            if not chunk and self.strip:
                assert self.splitter is not None
                if rest := self.splitter.take():
                    out.append(self._strip_event(rest))
                if self.strip:
                    self._events(b"", end=True)
        except DecodeError as e:
            # The client was told the stream is not encoded: what cannot be decoded (a bomb
            # past its bound, corrupt bytes) cannot go on, and the stream ends here.
            if isinstance(e, DecompressionLimit):
                self._stop("decompression_limit")
            else:
                self.broken, self.strip = True, False
            self.truncated = True
            logger.warning(f"request {self.request.request_id}: decoded stream ends early: {e}")
            if self.splitter is not None:
                out.append(self.splitter.take())
        except Exception as e:
            # Fall back to passing bytes on untouched: a broken meter must not break the stream.
            self._warn("usage stripping failed", e)
            self.broken, self.strip = True, False
            if self.splitter is not None:
                out.append(self.splitter.take())
        sent = b"".join(out)
        return [sent] if sent else []

    def _strip_piece(self, piece: bytes, out: list[bytes]) -> None:
        if not self.strip:
            out.append(piece)
            return
        assert self.splitter is not None
        limit = self.limits.max_event_bytes
        for raw in self.splitter.feed(piece):
            if self.strip and len(raw) > limit:
                self._stop("oversize_event")
            out.append(self._strip_event(raw) if self.strip else raw)
        if self.strip and self.splitter.pending > limit:
            # An event past the limit is not held for its end: it goes on as it comes.
            self._stop("oversize_event")
        if not self.strip:
            out.append(self.splitter.take())

    def _stripped(self, chunk: bytes, sent: bytes) -> list[bytes]:
        """What strip_event made of a whole event, counted: dropped, or its usage removed."""
        if not sent:
            self.stripped += 1
            return []
        if sent != chunk:
            self.trimmed += 1
        return [sent]

    def _strip_event(self, raw: bytes) -> bytes:
        try:
            self._events(raw, end=False)
            sent = strip_event(raw)
            return raw if sent is raw else b"".join(self._stripped(raw, sent))
        except Exception as e:
            self._warn("usage stripping failed", e)
            self.broken, self.strip = True, False
            return raw

    def body(
        self, status_code: int, raw: bytes | None, content_encoding: str, headers_at: float | None
    ) -> None:
        """A whole (non-streamed) response body as it came, still content-encoded. Parsed when
        it is at most max_body_bytes, decoded; a larger one (`oversize`) only has its end
        scanned for the usage object, so memory stays bounded by the limit, not the body."""
        self.status_code = status_code
        self.first_byte_at = headers_at
        if not raw:
            return
        limit = self.limits.max_body_bytes
        try:
            if len(raw) <= limit:
                try:
                    decoded = decode_body(raw, content_encoding, limit)
                    self.extraction.body(decoded, self.response_type)
                    return
                except BodyTooLarge:
                    pass
            self.stopped = "oversize"
            tail = body_tail(raw, content_encoding, TAIL_BYTES, _TAIL_DECODE_FACTOR * limit)
            self.extraction.tail(tail)
        except DecompressionLimit:
            self.stopped = "decompression_limit"
        except BodyTooLarge:
            pass  # too large even to reach its end: billed on the estimate
        except DecodeError:
            # Like mitmproxy's get_content(strict=False): a body mislabelled as encoded is read
            # as it is.
            if len(raw) <= limit:
                self.extraction.body(raw, self.response_type)

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
        usage, source, reason = ex.usage, "reported", self.stopped
        if ex.invalid is not None:
            # Counts that are not counts come from a broken or hostile upstream, never from a
            # client: none of its usage is trusted, and the estimate is billed, marked as such.
            usage, reason = None, "invalid_usage"
        if ex.error is not None and usage is None and not aborted and not reason:
            return Result(None, "upstream_error_without_usage")
        if self.broken and usage is None and not reason:
            return Result(None, "unparsable_stream")
        if usage is None and not self.shape.estimates:
            # A route the meter has no shape for: billed when its answer reports usage (as the
            # seed did), else nothing says it is billable.
            return Result(None, "unknown_endpoint")
        asked = Asked(self.request.path, self.request_body, self.request_type)
        if usage is None:
            # Never silently free: what was asked and what was streamed, estimated. A usage
            # object without one count the shape defines is no report either.
            usage, source = self._estimate(Usage(), asked), "estimated"
            if ex.hollow:
                reason = reason or "usage_without_counts"
        elif (aborted or self.stopped) and (
            estimated := self._estimate(usage, asked)
        ).output_tokens > usage.output_tokens:
            # An Anthropic stream reports output_tokens=1 at its start; a client that hung up
            # (or a stream the meter stopped parsing) after 500 tokens has still consumed them.
            usage, source = estimated, "estimated"
        model = ex.model
        if model is None:
            wanted = self.shape.requested_model(asked)
            model = clean_name(wanted)
            if model is None and wanted:
                reason = reason or "invalid_model"
        if ex.bad_model:
            reason = reason or "invalid_model"
        model = model or "unknown"
        if (
            source == "reported"
            and self.shape.openai_counts
            and anthropic_counts
            and any(rule.matches(self.request.path, model) for rule in anthropic_counts)
        ):
            try:
                usage = self.shape.normalize(usage.raw, anthropic_counts=True)
            except InvalidUsage:
                usage, source, reason = self._estimate(Usage(), asked), "estimated", "invalid_usage"
        try:
            usage = self.shape.settle(ex, usage, asked, model, reported=source == "reported")
        except InvalidUsage:
            # A count outside the usage object that is no count (a duration, an image count):
            # the answer's usage is not trusted either, as above.
            usage, source, reason = self._estimate(Usage(), asked), "estimated", "invalid_usage"
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
            attribution=req.attribution,
        )
        built = envelope.build(facts, usage, price_of(usage, facts.model))
        return Result(built, reason, envelope.encode(built))

    def _estimate(self, reported: Usage, asked: Asked) -> Usage:
        """Reported counts kept; missing input from the request, output from the text seen."""
        output = max(reported.output_tokens, estimate.tokens(self.extraction.output_chars), 1)
        if not self.shape.produces_output:
            output = 0  # embeddings produce no tokens
        inp = reported.input_tokens or self.shape.estimate_input(asked)
        return replace(reported, input_tokens=inp, output_tokens=output)
