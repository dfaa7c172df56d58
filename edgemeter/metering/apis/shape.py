"""What an API shape is to the meter: its routes, how its usage object normalises into `Usage`,
and how it reads a whole body and each SSE event into an `Extraction` (extraction.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemeter.metering.usage import Usage, as_dict, json_object

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction


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
    """Its calls cost nothing by nature (as moderations do): one that amounts to nothing is
    counted (`free`) and never published, instead of going to reconciliation."""

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        raise NotImplementedError

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        """A whole JSON answer."""
        ex.identity(obj)
        if "error" in obj and obj["error"] and not obj.get("usage"):
            ex.error = "error"
        if (usage := as_dict(obj.get("usage"))) is not None:
            ex.set_usage(usage)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        """One SSE event by its data and `event:` name (ex.events counts it already). Called
        for every event of a stream: cheap byte checks first, JSON only where it matters."""
        if data == b"[DONE]":
            ex.final = True
        # Parsing every chunk of a long stream would cost more than mitmproxy itself; only
        # chunks up to the first that names the model (Azure's first one names none) and chunks
        # that can carry usage or errors matter.
        elif (ex.model is None or may_carry_usage(data) or b'"error"' in data) and (
            obj := json_object(data)
        ) is not None:
            self.event_object(ex, obj)

    def event_object(self, ex: Extraction, obj: dict[str, Any]) -> None:
        ex.identity(obj)
        if obj.get("error"):
            ex.error = "error"
        if (usage := as_dict(obj.get("usage"))) is not None:
            ex.set_usage(usage)


def may_carry_usage(data: bytes) -> bool:
    # OpenAI include_usage streams put "usage":null in every chunk: only an object counts.
    # An unescaped quote only occurs as JSON structure, so text content never matches.
    return b'"usage":{' in data or b'"usage": {' in data
