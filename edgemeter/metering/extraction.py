"""What one response told the meter: usage, model, id, whether it ended in an error or at its
last event, and how much text it generated; fed whole bodies or SSE events, read by its API shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgemeter.errors import InvalidUsage
from edgemeter.metering.apis import Shape, shape_of
from edgemeter.metering.estimate import text_chars, text_pattern
from edgemeter.metering.sse import SSEEvent
from edgemeter.metering.usage import Usage, clean_name, json_object

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')


class Extraction:
    """Feed it a whole JSON body (`body`) or SSE events (`event`, `data`); both parse
    open-world, through the request's API shape (`apis`)."""

    __slots__ = (
        "_event",
        "_text",
        "bad_model",
        "error",
        "events",
        "final",
        "hollow",
        "invalid",
        "merged",
        "model",
        "output_chars",
        "service_tier",
        "shape",
        "units",
        "upstream_id",
        "usage",
        "usage_named",
    )

    def __init__(self, api: str | Shape) -> None:
        self.shape = api if isinstance(api, Shape) else shape_of(api)
        self.usage: Usage | None = None
        self.model: str | None = None
        self.upstream_id: str | None = None
        self.error: str | None = None
        self.invalid: str | None = None
        # The upstream named a model that is not fit for an envelope (see clean_name).
        self.bad_model = False
        self.events = 0
        # The stream's last event was seen ([DONE], response.completed/incomplete/failed,
        # message_stop): the usage is final, the envelope can be spooled before the client
        # gets that event.
        self.final = False
        # Characters of generated text seen, for an estimate when no usage is ever reported.
        self.output_chars = 0
        # A usage object reported in parts over a stream (Anthropic's two halves), merged.
        self.merged: dict[str, Any] = {}
        # A usage object came that holds none of the shape's counts (`{"foo": 0}`): no report.
        self.hollow = False
        # The latest event named a usage object ("usage":{): set by the shapes that accept
        # stream_options (Shape.event), whose usage meter_stream_usage may strip.
        self.usage_named = False
        # What the answer bills outside its usage object (Responses' web_search_call items,
        # an image count), and the service tier it names outside it ("" for a base tier).
        self.units: dict[str, int | str] | None = None
        self.service_tier = ""
        self._text = text_pattern(self.shape.text)
        self._event = self.shape.event

    @property
    def api(self) -> str:
        return self.shape.api

    # -- whole bodies -------------------------------------------------------------------------

    def body(self, content: bytes, content_type: str = "") -> None:
        obj = json_object(content)
        if obj is None:
            self.shape.other_body(self, content, content_type)
            return
        self.shape.body(self, obj)
        if self.usage is None:
            self.output_chars += text_chars(content, self.shape.text)

    def tail(self, data: bytes) -> None:
        """The end of a body too large to parse whole. Every API shape puts its usage object
        near the end: the first `"usage":{` whose object decodes is taken (an unescaped quote
        is JSON structure, so generated text never matches)."""
        decoder = json.JSONDecoder()
        for m in _USAGE_KEY.finditer(data):
            try:
                obj, _ = decoder.raw_decode(data[m.end() - 1 :].decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                self.set_usage(obj)
                return

    # -- streams ------------------------------------------------------------------------------

    def event(self, ev: SSEEvent) -> None:
        self.data(ev.data, ev.event)

    def data(self, data: bytes, event: str = "") -> None:
        """One event by its data and `event:` name: `event` without building an SSEEvent, for
        the stream callable's path of whole events, where every call counts."""
        self.events += 1
        # One C call for the text of the whole event: a generator over the matches would cost
        # as much as the search itself.
        self.output_chars += len(b"".join(self._text.findall(data)))
        self._event(self, data, event)

    # -- what shapes report -------------------------------------------------------------------

    def identity(self, obj: dict[str, Any]) -> None:
        """The model and the answer's id, the first time an object names them."""
        if self.model is None and (value := obj.get("model")) is not None and value != "":
            self.model = clean_name(value)
            self.bad_model = self.bad_model or self.model is None
        if self.upstream_id is None:
            self.upstream_id = clean_name(obj.get("id"))

    def set_usage(self, usage: dict[str, Any]) -> None:
        """The latest usage object; counts that are not counts mark the answer invalid, and one
        with none of the shape's counts is no report (an earlier real one stays)."""
        counts = self.shape.counts
        # A few lookups of the shape's counts (the first is nearly always there), not a walk
        # over the object's keys.
        for key in counts:
            if key in usage:
                break
        else:
            if counts:
                self.hollow = True
                return
        try:
            self.usage = self.shape.normalize(usage)
        except InvalidUsage as e:
            self.invalid = str(e)

    def add_units(self, **units: int | str) -> None:
        """Units the answer bills outside its usage object (those > 0, and names)."""
        found = {k: v for k, v in units.items() if v}
        if found:
            self.units = {**(self.units or {}), **found}
