"""OpenAI Realtime (`GET /realtime`, a WebSocket): one envelope per `response.done` and per
input audio transcription that reports usage (realtime.py reads the session's events).
"""

from __future__ import annotations

from typing import Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, bounded, count, split

REALTIME_COUNTS = frozenset({"input_tokens", "output_tokens", "total_tokens"})


def normalize_realtime(usage: dict[str, Any]) -> Usage:
    """response.done's usage: input_tokens (cached inside, `input_token_details` by modality
    and `cached_tokens`), output_tokens (`output_token_details` by modality)."""
    inp = count(usage, "input_tokens")
    out = max(count(usage, "output_tokens"), count(usage, "total_tokens") - inp)
    details = usage.get("input_token_details")
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(count(details, "cached_tokens"), inp),
            output_tokens=out,
            raw=usage,
            detail=split(details, usage.get("output_token_details")),
        )
    )


class OpenAIRealtime(Shape):
    api = "openai.realtime"
    suffixes = ("/realtime",)
    methods = ("GET",)
    websocket = True
    counts = REALTIME_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_realtime(usage)


SHAPE = OpenAIRealtime()
