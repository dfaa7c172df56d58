"""OpenAI Responses API (`/responses`, `/responses/compact`): input_tokens with cached inside,
output with reasoning inside; streams end in response.completed, response.incomplete or failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.openai_chat import read_tier
from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import (
    Usage,
    as_dict,
    as_str,
    bounded,
    count,
    json_object,
    split,
)

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

# The events that end a Responses API stream.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
RESPONSES_COUNTS = frozenset({"input_tokens", "output_tokens", "total_tokens"})


def normalize_responses(usage: dict[str, Any]) -> Usage:
    """OpenAI Responses API: `input_tokens` includes cached tokens, output includes reasoning."""
    inp = count(usage, "input_tokens")
    out = count(usage, "output_tokens")
    total = count(usage, "total_tokens")
    details = usage.get("input_tokens_details")
    cached = count(details, "cached_tokens")
    output = max(out, total - inp)
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(cached, inp),
            output_tokens=output,
            reasoning_tokens=min(count(usage, "output_tokens_details", "reasoning_tokens"), output),
            raw=usage,
            detail=split(details, usage.get("output_tokens_details")),
        )
    )


def web_searches(ex: Extraction, response: dict[str, Any]) -> None:
    """Web searches the response ran: one `web_search_call` output item each (billed per call;
    its usage object does not count them)."""
    output = response.get("output")
    if type(output) is list:
        calls = 0
        for item in output:
            if type(item) is dict and item.get("type") == "web_search_call":
                calls += 1
        if calls:
            ex.add_units(web_search_calls=calls)


class OpenAIResponses(Shape):
    api = "openai.responses"
    suffixes = ("/responses", "/responses/compact")
    text = "responses"
    counts = RESPONSES_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_responses(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        # A stored response fetched whole, or a gateway's wrapper: the response inside counts.
        response = as_dict(obj.get("response")) or obj
        super().body(ex, response)
        if response.get("usage"):
            read_tier(ex, response)
            web_searches(ex, response)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        # find, not `in` (see Shape.event): a text delta costs ~5,600 Ir here, not ~12,100.
        if ex.events > 1 and not (
            data.find(b'"usage"') >= 0 or data.find(b'"error"') >= 0 or data.find(b"failed") >= 0
        ):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = as_str(obj.get("type")) or event
        response = as_dict(obj.get("response"))
        if response is not None:
            ex.identity(response)
            if (usage := as_dict(response.get("usage"))) is not None:
                ex.set_usage(usage)
                read_tier(ex, response)
                web_searches(ex, response)
        if kind in ("error", "response.failed"):
            ex.error = kind
        if kind in FINAL_EVENTS:
            ex.final = True


SHAPE = OpenAIResponses()
