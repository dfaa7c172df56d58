"""OpenAI chat completions (`/chat/completions`) and the usage object every OpenAI-compatible
gateway reports: prompt_tokens with cached tokens inside, completion_tokens with reasoning inside.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.shape import Asked, Shape
from edgemeter.metering.usage import BASE_TIERS, Usage, as_dict, bounded, count, split, tier

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

OPENAI_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def normalize_openai(usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
    """OpenAI chat / completions / embeddings: `prompt_tokens` includes cached tokens.

    Output is the larger of `completion_tokens` and `total - prompt`: xAI reports reasoning
    outside `completion_tokens` but inside `total_tokens`, and billing all of it is what the
    provider charged for. `anthropic_counts`: a gateway (NewAPI for Claude) reports Anthropic's
    convention in OpenAI shape, `prompt_tokens` without the cache reads and writes; add them.
    Gateways that relay Claude in OpenAI shape (LiteLLM and others) name its cache reads and
    writes `cache_read_input_tokens` / `cache_creation_input_tokens`, at the top or inside
    `prompt_tokens_details`: they count as cached tokens and cache writes."""
    prompt = count(usage, "prompt_tokens")
    completion = count(usage, "completion_tokens")
    total = count(usage, "total_tokens")
    details = usage.get("prompt_tokens_details")
    cached = (
        count(details, "cached_tokens")
        or count(usage, "prompt_cache_hit_tokens")
        or _anthropic_named(usage, details, "cache_read_input_tokens")
    )
    reasoning = count(usage, "completion_tokens_details", "reasoning_tokens")
    write = count(details, "cache_write_tokens") or _anthropic_named(
        usage, details, "cache_creation_input_tokens"
    )
    output = max(completion, total - prompt)
    if anthropic_counts:
        # total_tokens follows the same convention, so output is unaffected.
        prompt += cached + write
    return bounded(
        Usage(
            input_tokens=prompt,
            cached_input_tokens=min(cached, prompt),
            cache_write_tokens=min(write, prompt),
            output_tokens=output,
            # "Of which reasoning" stays true even when a provider reports more (OpenRouter does).
            reasoning_tokens=min(reasoning, output),
            raw=usage,
            detail=split(details, usage.get("completion_tokens_details")),
        )
    )


def _anthropic_named(usage: dict[str, Any], details: Any, key: str) -> int:
    """A count under Anthropic's name, at the top of the usage or in its prompt details; two
    membership tests when absent (every OpenAI answer)."""
    if key in usage:
        return count(usage, key)
    if type(details) is dict and key in details:
        return count(details, key)
    return 0


def read_tier(ex: Extraction, obj: dict[str, Any]) -> None:
    """The service tier an OpenAI answer names beside its usage (the first one named); a base
    tier ("default") by one lookup, as nearly every answer names it."""
    value = obj.get("service_tier")
    if (
        value is not None
        and not ex.service_tier
        and not (type(value) is str and value in BASE_TIERS)
    ):
        ex.service_tier = tier(value)


class OpenAIChat(Shape):
    api = "openai.chat"
    suffixes = ("/chat/completions",)
    stream_options = True
    openai_counts = True
    counts = OPENAI_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_openai(usage, anthropic_counts=anthropic_counts)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        super().body(ex, obj)
        read_tier(ex, obj)

    def event_object(self, ex: Extraction, obj: dict[str, Any]) -> None:
        ex.identity(obj)
        if obj.get("error"):
            ex.error = "error"
        usage = as_dict(obj.get("usage"))
        if usage is None and (x_groq := as_dict(obj.get("x_groq"))) is not None:
            usage = as_dict(x_groq.get("usage"))  # Groq streams report usage there
        if usage is not None:
            ex.set_usage(usage)
            read_tier(ex, obj)

    def settle(
        self, ex: Extraction, usage: Usage, asked: Asked, model: str, *, reported: bool
    ) -> Usage:
        if ex.units is not None or ex.service_tier:
            usage = super().settle(ex, usage, asked, model, reported=reported)
        if "search-preview" in model or "search-api" in model:
            # OpenAI's search models run one web search per completion, billed per call on
            # top of the tokens (the answer does not count it).
            usage = replace(usage, units={**usage.units, "web_search_calls": 1})
        return usage


SHAPE = OpenAIChat()
