"""Anthropic Messages (`/messages`): input_tokens without cache reads and writes (added here);
streams report usage in message_start and cumulatively in message_delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, as_dict, as_str, bounded, count, json_object

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

# Usage is merged over events: past this many keys it is not usage but an attack on the meter's
# memory, and only the latest event's usage is kept.
MAX_MERGED_KEYS = 64


def normalize_anthropic(usage: dict[str, Any]) -> Usage:
    """Anthropic Messages: `input_tokens` excludes cache reads and cache writes; add them.

    With server-side compaction the top-level counts leave out the compaction iterations; the
    billed total is the sum over `usage.iterations`, so sum those when present."""
    iterations = usage.get("iterations")
    parts = [i for i in iterations if isinstance(i, dict)] if isinstance(iterations, list) else []
    base = write = read = out = 0
    for part in parts or [usage]:
        base += count(part, "input_tokens")
        write += count(part, "cache_creation_input_tokens")
        read += count(part, "cache_read_input_tokens")
        out += count(part, "output_tokens")
    return bounded(
        Usage(
            input_tokens=base + write + read,
            cached_input_tokens=read,
            cache_write_tokens=write,
            output_tokens=out,
            reasoning_tokens=min(count(usage, "output_tokens_details", "thinking_tokens"), out),
            raw=usage,
        )
    )


class AnthropicMessages(Shape):
    api = "anthropic.messages"
    suffixes = ("/messages",)
    text = "anthropic"

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_anthropic(usage)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        if not (
            b"message_start" in data
            or b'"usage"' in data
            or b'"error"' in data
            or b"message_stop" in data
        ):
            return
        obj = json_object(data)
        if obj is None:
            return
        kind = as_str(obj.get("type")) or event
        if kind == "message_start":
            message = as_dict(obj.get("message")) or {}
            ex.identity(message)
            if (usage := as_dict(message.get("usage"))) is not None:
                ex.merged = dict(usage)
                ex.set_usage(ex.merged)
        elif kind == "message_delta":
            if (usage := as_dict(obj.get("usage"))) is not None:
                # Cumulative: any count the delta carries replaces the message_start one.
                merged = {**ex.merged, **usage}
                ex.merged = merged if len(merged) <= MAX_MERGED_KEYS else usage
                ex.set_usage(ex.merged)
        elif kind == "message_stop":
            ex.final = True
        elif kind == "error":
            ex.error = "error"


SHAPE = AnthropicMessages()
