"""OpenAI images (`/images/generations`, `/edits`, `/variations`): GPT Image reports tokens; an
answer without usage (dall-e) is billed per image at its size and quality, marked estimated.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgemeter.errors import InvalidUsage
from edgemeter.metering.apis.shape import Asked, Form, TypedEvents
from edgemeter.metering.multipart import fields
from edgemeter.metering.usage import (
    Usage,
    as_dict,
    bounded,
    clean_name,
    count,
    detail,
    modalities,
    unit_count,
)

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

IMAGE_COUNTS = frozenset({"input_tokens", "output_tokens", "total_tokens"})
# The events that end an image stream: one completed image (streams make one image).
FINAL_EVENTS = frozenset({"image_generation.completed", "image_edit.completed"})
# The API's defaults when neither the request nor the answer says (dall-e-2 and dall-e-3
# default to 1024x1024 and standard quality; GPT Image models choose, "auto").
_DALLE_DEFAULTS = {"image_size": "1024x1024", "image_quality": "standard"}
_AUTO = {"image_size": "auto", "image_quality": "auto"}
# n is at most 10 for every image model; a larger one is not a count the meter believes.
MAX_IMAGES = 128


def normalize_images(usage: dict[str, Any]) -> Usage:
    """GPT Image usage: input text and image tokens; output tokens are image tokens unless the
    answer splits them (`output_tokens_details`)."""
    inp = count(usage, "input_tokens")
    out = max(count(usage, "output_tokens"), count(usage, "total_tokens") - inp)
    split = as_dict(usage.get("output_tokens_details"))
    produced = modalities(split, "output") if split else {"output_image": out}
    return bounded(
        Usage(
            input_tokens=inp,
            cached_input_tokens=min(count(usage, "input_tokens_details", "cached_tokens"), inp),
            output_tokens=out,
            raw=usage,
            detail=detail(**modalities(usage.get("input_tokens_details"), "input"), **produced),
        )
    )


class OpenAIImages(Form, TypedEvents):
    api = "openai.images"
    final_events = FINAL_EVENTS
    # Partial images are large base64 strings (no quotes inside): only the small events and
    # those with usage are parsed.
    parsed_if = (b'"usage"', b"completed", b'"error"')
    suffixes = ("/images/generations", "/images/edits", "/images/variations")
    produces_output = False  # an estimate bills images, not output tokens
    asks = True
    counts = IMAGE_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_images(usage)

    def finished(self, ex: Extraction, obj: dict[str, Any]) -> None:
        ex.add_units(images=1)
        echoed(ex, obj)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        super().body(ex, obj)
        data = obj.get("data")
        if isinstance(data, list):
            ex.add_units(images=len(data))
        echoed(ex, obj)

    def settle(
        self, ex: Extraction, usage: Usage, asked: Asked, model: str, *, reported: bool
    ) -> Usage:
        if reported:
            # Tokens say it all (GPT Image); the image count would price twice.
            return replace(usage, service_tier=usage.service_tier or ex.service_tier)
        asked_for = fields(asked.body, asked.content_type)
        found = ex.units or {}
        images = found.get("images") or _count(asked_for.get("n"), 1)
        defaults = _DALLE_DEFAULTS if model.lower().startswith("dall-e") else _AUTO
        units: dict[str, int | str] = {"images": images}
        for fact, key in (("image_size", "size"), ("image_quality", "quality")):
            units[fact] = found.get(fact) or _name(asked_for.get(key)) or defaults[fact]
        return replace(usage, units=units)


def echoed(ex: Extraction, obj: dict[str, Any]) -> None:
    """The size and quality a GPT Image answer echoes (dall-e answers echo neither)."""
    size, quality = _name(obj.get("size")), _name(obj.get("quality"))
    if size or quality:
        ex.add_units(image_size=size, image_quality=quality)


def _name(value: Any) -> str:
    return clean_name(value, 32) or ""


def _count(value: Any, default: int) -> int:
    """`n` of a request (a JSON number or a form field's text), else the default."""
    try:
        n = unit_count(int(value) if isinstance(value, str) else value, "n")
    except (ValueError, TypeError, InvalidUsage):
        return default
    return n if 0 < n <= MAX_IMAGES else default


SHAPE = OpenAIImages()
