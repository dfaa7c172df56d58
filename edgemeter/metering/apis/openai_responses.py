"""OpenAI Responses API (`/responses`): input_tokens with cached inside, output with reasoning
inside; streams end in response.completed, response.incomplete or response.failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, as_dict, as_str, bounded, count, json_object

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

# The events that end a Responses API stream.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def normalize_responses(usage: dict[str, Any]) -> Usage:
    """OpenAI Responses API: `input_tokens` includes cached tokens, output includes reasoning."""
    inp = count(usage, "input_tokens")
    out = count(usage, "output_tokens")
    total = count(usage, "total_tokens")
    cached = count(usage, "input_tokens_details", "cached_tokens")
    output = max(out, total - inp)
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(cached, inp),
            output_tokens=output,
            reasoning_tokens=min(count(usage, "output_tokens_details", "reasoning_tokens"), output),
            raw=usage,
        )
    )


class OpenAIResponses(Shape):
    api = "openai.responses"
    suffixes = ("/responses",)
    text = "responses"

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_responses(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        # A stored response fetched whole, or a gateway's wrapper: the response inside counts.
        response = as_dict(obj.get("response"))
        super().body(ex, response if response else obj)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        if ex.events > 1 and not (b'"usage"' in data or b'"error"' in data or b"failed" in data):
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
        if kind in ("error", "response.failed"):
            ex.error = kind
        if kind in FINAL_EVENTS:
            ex.final = True


SHAPE = OpenAIResponses()
