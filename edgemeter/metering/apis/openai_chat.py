"""OpenAI chat completions (`/chat/completions`) and the usage object every OpenAI-compatible
gateway reports: prompt_tokens with cached tokens inside, completion_tokens with reasoning inside.
"""

from __future__ import annotations

from typing import Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage, as_dict, bounded, count


def normalize_openai(usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
    """OpenAI chat / completions / embeddings: `prompt_tokens` includes cached tokens.

    Output is the larger of `completion_tokens` and `total - prompt`: xAI reports reasoning
    outside `completion_tokens` but inside `total_tokens`, and billing all of it is what the
    provider charged for. `anthropic_counts`: a gateway (NewAPI for Claude) reports Anthropic's
    convention in OpenAI shape, `prompt_tokens` without the cache reads and writes; add them."""
    prompt = count(usage, "prompt_tokens")
    completion = count(usage, "completion_tokens")
    total = count(usage, "total_tokens")
    cached = count(usage, "prompt_tokens_details", "cached_tokens") or count(
        usage, "prompt_cache_hit_tokens"
    )
    reasoning = count(usage, "completion_tokens_details", "reasoning_tokens")
    write = count(usage, "prompt_tokens_details", "cache_write_tokens")
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
        )
    )


class OpenAIChat(Shape):
    api = "openai.chat"
    suffixes = ("/chat/completions",)
    stream_options = True
    openai_counts = True

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_openai(usage, anthropic_counts=anthropic_counts)

    def event_object(self, ex: Any, obj: dict[str, Any]) -> None:
        ex.identity(obj)
        if obj.get("error"):
            ex.error = "error"
        usage = as_dict(obj.get("usage"))
        if usage is None and (x_groq := as_dict(obj.get("x_groq"))) is not None:
            usage = as_dict(x_groq.get("usage"))  # Groq streams report usage there
        if usage is not None:
            ex.set_usage(usage)


SHAPE = OpenAIChat()
