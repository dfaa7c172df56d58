"""Rerank (`/rerank`, NewAPI's Jina-style route): tokens in `usage` (Jina, Voyage: a total
alone, all input), or Cohere's `meta.billed_units` (search units, billed per unit).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.generic import normalize_any
from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, as_dict, unit_count

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

RERANK_COUNTS = frozenset(
    {"prompt_tokens", "input_tokens", "output_tokens", "total_tokens", "search_units"}
)


def normalize_rerank(usage: dict[str, Any]) -> Usage:
    """Tokens read open-world (normalize_any); Cohere's search units as units."""
    tokens = normalize_any(usage)
    if "search_units" not in usage:
        return tokens
    searched = unit_count(usage["search_units"], "search_units")
    return replace(tokens, units={"search_units": searched} if searched else {})


class Rerank(Shape):
    api = "rerank"
    suffixes = ("/rerank",)
    produces_output = False
    counts = RERANK_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_rerank(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        super().body(ex, obj)
        if ex.usage is None and not ex.invalid:
            billed = as_dict((as_dict(obj.get("meta")) or {}).get("billed_units"))
            if billed is not None:
                ex.set_usage(billed)


SHAPE = Rerank()
