"""Anthropic Messages (`/messages`): input_tokens without cache reads and writes (added here);
streams report usage in message_start and cumulatively in message_delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import (
    Usage,
    as_dict,
    as_str,
    bounded,
    clean_name,
    count,
    json_object,
    tier,
)

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

# Usage is merged over events: past this many keys it is not usage but an attack on the meter's
# memory, and only the latest event's usage is kept.
MAX_MERGED_KEYS = 64
ANTHROPIC_COUNTS = frozenset(
    {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}
)


def normalize_anthropic(usage: dict[str, Any]) -> Usage:
    """Anthropic Messages: `input_tokens` excludes cache reads and cache writes; add them.

    With server-side compaction the top-level counts leave out the compaction iterations; the
    billed total is the sum over `usage.iterations`, so sum those when present."""
    iterations = usage.get("iterations")
    parts = [i for i in iterations if isinstance(i, dict)] if isinstance(iterations, list) else []
    base = write = write_1h = read = out = 0
    for part in parts or [usage]:
        base += count(part, "input_tokens")
        write += count(part, "cache_creation_input_tokens")
        if part.get("cache_creation_input_tokens"):  # no 1-hour writes without writes
            write_1h += count(part, "cache_creation", "ephemeral_1h_input_tokens")
        read += count(part, "cache_read_input_tokens")
        out += count(part, "output_tokens")
    tools = usage.get("server_tool_use")
    searches = count(tools, "web_search_requests") if tools else 0
    return bounded(
        Usage(
            input_tokens=base + write + read,
            cached_input_tokens=read,
            cache_write_tokens=write,
            output_tokens=out,
            reasoning_tokens=min(count(usage, "output_tokens_details", "thinking_tokens"), out),
            raw=usage,
            # 1-hour cache writes cost twice the input rate (5-minute ones 1.25x): a part of
            # cache_write_tokens priced apart.
            detail={"cache_write_1h": min(write_1h, write)} if write_1h else {},
            units={"web_search_calls": searches} if searches else {},
            service_tier=tier(usage.get("service_tier")) if "service_tier" in usage else "",
        )
    )


class AnthropicMessages(Shape):
    api = "anthropic.messages"
    suffixes = ("/messages",)
    text = "anthropic"
    counts = ANTHROPIC_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_anthropic(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        super().body(ex, obj)
        content = obj.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "fallback":
                    served_by(ex, block)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        # find, not `in` (see Shape.event): a text delta costs ~7,200 Ir here, not ~15,900.
        if not (
            data.find(b"message_start") >= 0
            or data.find(b'"usage"') >= 0
            or data.find(b'"error"') >= 0
            or data.find(b"message_stop") >= 0
            # A fallback block opens like any content block: only those events are looked into
            # (or every event of a stream without event names), not each delta.
            or (event in ("content_block_start", "") and data.find(b'"fallback"') >= 0)
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
        elif kind == "content_block_start":
            block = as_dict(obj.get("content_block"))
            if block is not None and block.get("type") == "fallback":
                served_by(ex, block)
        elif kind == "error":
            ex.error = "error"


def served_by(ex: Extraction, block: dict[str, Any]) -> None:
    """A `fallback` content block (Anthropic's server-side fallback): another model served the
    rest of the answer, and the envelope's model and price follow it (`to.model`)."""
    to = as_dict(block.get("to")) or block
    model = clean_name(to.get("model"))
    if model is not None:
        ex.model = model


SHAPE = AnthropicMessages()
