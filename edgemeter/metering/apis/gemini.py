"""Gemini's own API (`models/{model}:generateContent`, `:streamGenerateContent`, as NewAPI relays
it): `usageMetadata`, cumulative over a stream, so the last one counts (see normalize_gemini).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from edgemeter.metering.apis.shape import Asked, Shape
from edgemeter.metering.usage import Usage, as_dict, bounded, count, detail, json_object, tier

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

GEMINI_COUNTS = frozenset(
    {
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        "thoughtsTokenCount",
        "toolUsePromptTokenCount",
        "cachedContentTokenCount",
    }
)
# Gemini's modalities as tokens_detail kinds (DOCUMENT and unknown ones stay plain input).
_MODALITY = {"TEXT": "text", "AUDIO": "audio", "IMAGE": "image", "VIDEO": "video"}


def normalize_gemini(usage: dict[str, Any]) -> Usage:
    """usageMetadata. Input is `promptTokenCount` (`cachedContentTokenCount` inside) plus
    `toolUsePromptTokenCount` (search and tool results, billed as input, outside the prompt
    count); output is `candidatesTokenCount` plus `thoughtsTokenCount` (thinking, billed as
    output, outside the candidates count); the `*TokensDetails` lists split them by modality."""
    inp = count(usage, "promptTokenCount") + count(usage, "toolUsePromptTokenCount")
    thoughts = count(usage, "thoughtsTokenCount")
    output = max(
        count(usage, "candidatesTokenCount") + thoughts, count(usage, "totalTokenCount") - inp
    )
    parts: dict[str, int] = {}
    _modalities(usage.get("promptTokensDetails"), "input", parts)
    _modalities(usage.get("toolUsePromptTokensDetails"), "input", parts)
    _modalities(usage.get("candidatesTokensDetails"), "output", parts)
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(count(usage, "cachedContentTokenCount"), inp),
            output_tokens=output,
            reasoning_tokens=min(thoughts, output),
            raw=usage,
            detail=detail(**parts),
            service_tier=tier(usage.get("serviceTier")) if "serviceTier" in usage else "",
        )
    )


def web_searches(candidates: Any) -> int:
    """Google Search grounding: the queries the model ran (`groundingMetadata.webSearchQueries`
    of each candidate), as Google bills Gemini 3's grounding; the usage object does not count
    them; only non-empty strings count. A stream's chunks may repeat them: the most seen in one
    chunk counts (candidates whose queries came in different chunks would count as the largest
    of them; no recording shows that)."""
    if type(candidates) is not list:
        return 0
    searches = 0
    for candidate in candidates:
        grounding = candidate.get("groundingMetadata") if type(candidate) is dict else None
        if type(grounding) is dict and type(queries := grounding.get("webSearchQueries")) is list:
            searches += sum(1 for query in queries if type(query) is str and query)
    return searches


def _modalities(entries: Any, side: str, into: dict[str, int]) -> None:
    if not isinstance(entries, list):
        return
    for entry in entries:
        if isinstance(entry, dict) and (kind := _MODALITY.get(entry.get("modality"))):  # type: ignore[arg-type]
            key = f"{side}_{kind}"
            into[key] = into.get(key, 0) + count(entry, "tokenCount")


class Gemini(Shape):
    api = "gemini.generate_content"
    suffixes = (":generateContent", ":streamGenerateContent")
    key_header = "x-goog-api-key"  # the SDKs'
    key_param = "key"  # REST clients'
    counts = GEMINI_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_gemini(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        ex.identity({"model": obj.get("modelVersion"), "id": obj.get("responseId")})
        if obj.get("error"):
            ex.error = "error"
        if (usage := as_dict(obj.get("usageMetadata"))) is not None:
            ex.set_usage(usage)
        searches = web_searches(obj.get("candidates"))
        if searches and searches > int((ex.units or {}).get("web_search_calls", 0)):
            ex.add_units(web_search_calls=searches)

    def other_body(self, ex: Extraction, content: bytes, content_type: str) -> None:
        # :streamGenerateContent without alt=sse answers one JSON array of the stream's chunks.
        try:
            chunks = json.loads(content)
        except (ValueError, RecursionError):
            return
        if isinstance(chunks, list):
            for chunk in chunks:
                if isinstance(chunk, dict):
                    self.body(ex, chunk)

    def event(self, ex: Extraction, data: bytes, event: str) -> None:
        # Every chunk carries the cumulative usageMetadata: each is read, the last one counts.
        # find, not `in`: see Shape.event (~2,300 Ir less per check, per event).
        if (
            data.find(b"usageMetadata") >= 0
            or ex.model is None
            or data.find(b'"error"') >= 0
            or data.find(b"webSearchQueries") >= 0
        ) and (obj := json_object(data)) is not None:
            self.body(ex, obj)

    def requested_model(self, asked: Asked) -> str:
        """The model is in the path: .../models/{model}:generateContent."""
        _, found, rest = asked.path.rpartition("/models/")
        return rest.split(":", 1)[0] if found else ""


SHAPE = Gemini()
