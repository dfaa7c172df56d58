"""What an API shape is to the meter: its routes, how its usage object normalises into `Usage`,
and how it reads a whole body and each SSE event into an `Extraction` (extraction.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgemeter.metering import estimate
from edgemeter.metering.multipart import fields
from edgemeter.metering.usage import Usage, as_dict, as_str, json_object

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction


@dataclass(frozen=True, slots=True)
class Asked:
    """What the request said, for the shapes that bill on it: its path (query included), its
    body (decoded, at most meter_max_body_mb; b"" when larger) and its Content-Type."""

    path: str
    body: bytes
    content_type: str = ""


class Shape:
    """One API shape. A subclass sets the class attributes and overrides what differs; the
    defaults read an OpenAI-style body (`usage` beside `model` and `id`, `error` on failure)."""

    api: str = ""
    """metadata.api of its envelopes, e.g. openai.chat."""
    suffixes: tuple[str, ...] = ()
    """Request path endings (query left out) routed to this shape."""
    methods: tuple[str, ...] = ("POST",)
    text: str = "openai"
    """Which fields carry generated text (estimate.text_chars: openai, anthropic, responses)."""
    stream_options: bool = False
    """Accepts stream_options.include_usage (meter_stream_usage injects it)."""
    produces_output: bool = True
    """False where an answer has no output tokens (embeddings): estimates bill none."""
    openai_counts: bool = False
    """Its usage is OpenAI's prompt/completion object: meter_anthropic_counts may apply."""
    free: bool = False
    """Its calls cost nothing by nature (moderations): requests are counted `free` and not
    metered; an envelope of such a shape is never published (contract.route), the backstop."""
    websocket: bool = False
    """Served over a WebSocket (Realtime): billed per event by the addon's websocket hooks."""
    estimates: bool = True
    """An answer without usage is billed by estimate; False (generic): it is not billed at all
    (counted `unknown_endpoint`), since nothing says the route is billable."""
    asks: bool = False
    """Bills on what the request said beyond its JSON (multipart uploads): the addon keeps the
    request's Content-Type for `settle`."""
    key_header: str = ""
    """A header of its own an API key may come in (Gemini's `x-goog-api-key`), read on its
    routes only, after the usual key headers (an upstream authenticates it there alone)."""
    key_param: str = ""
    """The query parameter an API key may come in (Gemini's `?key=`), read after its key
    headers; empty: keys come in headers only."""
    counts: frozenset[str] = frozenset()
    """The usage object's keys that are counts: one with none of them (`{"foo": 0}`) is no
    report, and the answer is estimated (empty: any object counts)."""

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        raise NotImplementedError

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        """A whole JSON answer."""
        ex.identity(obj)
        if "error" in obj and obj["error"] and not obj.get("usage"):
            ex.error = "error"
        if (usage := as_dict(obj.get("usage"))) is not None:
            ex.set_usage(usage)

    def other_body(self, ex: Extraction, content: bytes, content_type: str) -> None:
        """A whole answer that is not a JSON object (a JSON array, text, audio): ignored by the
        shapes whose answers are JSON objects."""

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        """One SSE event by its data and `event:` name (ex.events counts it already). Called
        for every event of a stream: cheap byte checks first, JSON only where it matters."""
        if data == b"[DONE]":
            ex.final = True
            ex.usage_named = False
            return
        # Parsing every chunk of a long stream would cost more than mitmproxy itself; only
        # chunks up to the first that names the model (Azure's first one names none) and chunks
        # that can carry usage or errors matter. OpenAI include_usage streams put "usage":null
        # in every chunk: only an object counts. An unescaped quote only occurs as JSON
        # structure, so text content never matches. find, not `in`: bytes.__contains__ first
        # tries its operand as an int and formats the TypeError (~5,600 Ir against ~12,200 for
        # these three per chunk, callgrind); inline, since a call is ~400 Ir more. One search
        # where "usage" is absent, as in nearly every chunk (~1,600 Ir a find); the stream
        # callable reads what it found (usage_named) instead of searching the chunk again.
        named = data.find(b'"usage"') >= 0 and (
            data.find(b'"usage":{') >= 0 or data.find(b'"usage": {') >= 0
        )
        ex.usage_named = named
        if (named or ex.model is None or data.find(b'"error"') >= 0) and (
            obj := json_object(data)
        ) is not None:
            self.event_object(ex, obj)

    def event_object(self, ex: Extraction, obj: dict[str, Any]) -> None:
        ex.identity(obj)
        if obj.get("error"):
            ex.error = "error"
        if (usage := as_dict(obj.get("usage"))) is not None:
            ex.set_usage(usage)

    def requested_model(self, asked: Asked) -> str:
        """The model the request names, unchecked ("" if none): the JSON body's `model`, else
        the one in a legacy `/engines/{model}/...` path."""
        model = requested_model(asked.body)
        if not model and "/engines/" in asked.path:
            model = asked.path.split("/engines/", 1)[1].split("/", 1)[0]
        return model

    def estimate_input(self, asked: Asked) -> int:
        """Input tokens of a request whose answer reported none: its text, four characters a
        token (estimate.request_tokens)."""
        return estimate.request_tokens(asked.body)

    def settle(
        self, ex: Extraction, usage: Usage, asked: Asked, model: str, *, reported: bool
    ) -> Usage:
        """The usage to bill, once the answer is read and the model known: what the answer said
        outside its usage object (web searches, a service tier) added. Shapes that bill on the
        request (images, audio) add its facts here; `reported` is False for an estimate."""
        if ex.units is None and not ex.service_tier:
            return usage
        units = {**usage.units, **ex.units} if ex.units else usage.units
        return replace(usage, units=units, service_tier=usage.service_tier or ex.service_tier)


class TypedEvents(Shape):
    """A stream of typed events (`type`) that report usage and end with one of `final_events`
    (images, transcriptions, speech): events with large payloads (base64 audio or images) are
    passed over by byte checks, only those with one of `parsed_if` in them are parsed."""

    final_events: frozenset[str] = frozenset()
    parsed_if: tuple[bytes, ...] = (b'"usage"', b"done", b'"error"')

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        # find, not `in` (see Shape.event), and a loop, not a generator.
        for mark in self.parsed_if:
            if data.find(mark) >= 0:
                break
        else:
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = as_str(obj.get("type")) or event
        if (usage := as_dict(obj.get("usage"))) is not None:
            ex.set_usage(usage)
        if kind in self.final_events:
            self.finished(ex, obj)
            ex.final = True
        elif kind == "error" or obj.get("error"):
            ex.error = "error"

    def finished(self, ex: Extraction, obj: dict[str, Any]) -> None:
        """What the final event says beyond its usage (nothing, unless a shape knows more)."""


class Form(Shape):
    """Requests that may be a multipart form (an upload): the model and the prompt are read
    from its fields. The upload itself is billed by the shape (its length, its images)."""

    def requested_model(self, asked: Asked) -> str:
        model = fields(asked.body, asked.content_type).get("model")
        return model if isinstance(model, str) else ""

    def estimate_input(self, asked: Asked) -> int:
        prompt = fields(asked.body, asked.content_type).get("prompt")
        return estimate.tokens(len(prompt)) if isinstance(prompt, str) else 0


def requested_model(body: bytes) -> str:
    """The `model` of a JSON request body as the client sent it, unchecked ("" if none);
    parsed only when the response did not name one."""
    if b'"model"' not in body:
        return ""
    obj = json_object(body)
    model = obj.get("model") if obj is not None else None
    return model if isinstance(model, str) else ""
