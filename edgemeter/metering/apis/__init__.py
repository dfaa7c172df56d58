"""The API shapes the meter bills, one module each, and the one table that routes a request to
its shape. Adding a shape is a module with a `SHAPE` (a `Shape` subclass) and a line in SHAPES.
"""

from __future__ import annotations

from edgemeter.metering.apis import (
    anthropic_messages,
    gemini,
    generic,
    openai_audio_speech,
    openai_audio_transcriptions,
    openai_audio_translations,
    openai_chat,
    openai_completions,
    openai_edits,
    openai_embeddings,
    openai_images,
    openai_moderations,
    openai_realtime,
    openai_responses,
    rerank,
)
from edgemeter.metering.apis.shape import Shape

SHAPES: tuple[Shape, ...] = (
    openai_chat.SHAPE,
    openai_completions.SHAPE,
    openai_embeddings.SHAPE,
    openai_responses.SHAPE,
    anthropic_messages.SHAPE,
    openai_edits.SHAPE,
    openai_images.SHAPE,
    openai_audio_transcriptions.SHAPE,
    openai_audio_translations.SHAPE,
    openai_audio_speech.SHAPE,
    rerank.SHAPE,
    openai_moderations.SHAPE,
    gemini.SHAPE,
    openai_realtime.SHAPE,
)
# Any other POST on a metered path: billed if its answer reports usage (see generic.py).
GENERIC: Shape = generic.SHAPE
# The headers of their own some shapes take an API key in (see Shape.key_header).
KEY_HEADERS: tuple[str, ...] = tuple(
    sorted({shape.key_header for shape in SHAPES if shape.key_header})
)
BY_API: dict[str, Shape] = {shape.api: shape for shape in (*SHAPES, GENERIC)}
# Longest suffix first: "/chat/completions" must win over "/completions", "/images/edits" over
# "/edits", "/responses/compact" over "/compact".
_ROUTES: tuple[tuple[str, Shape], ...] = tuple(
    sorted(
        ((suffix, shape) for shape in SHAPES for suffix in shape.suffixes),
        key=lambda route: -len(route[0]),
    )
)


def classify(path: str) -> Shape | None:
    """The API shape of a request path (query ignored), None for a path no shape has."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, shape in _ROUTES:
        if path.endswith(suffix):
            return shape
    return None


# Sub-resources of the metered routes (a stored completion's update, /responses/{id}/cancel,
# /messages/count_tokens, /messages/batches): their answers repeat the usage of a request
# billed already, or bill nothing, so they are never GENERIC.
_SUBRESOURCES: tuple[str, ...] = tuple(
    {suffix + "/" for shape in SHAPES for suffix in shape.suffixes if suffix.startswith("/")}
)


def route(path: str, method: str) -> Shape | None:
    """The shape that meters a request on a metered path: its own, else GENERIC for any other
    POST; None for what no shape meters (a GET of /v1/models, a DELETE, a sub-resource of a
    metered route): counted `unknown_endpoint`."""
    shape = classify(path)
    if shape is not None and method in shape.methods:
        return shape
    if method != "POST":
        return None
    bare = path.split("?", 1)[0]
    return None if any(sub in bare for sub in _SUBRESOURCES) else GENERIC


def shape_of(api: str) -> Shape:
    """The shape named by an envelope's metadata.api; KeyError for one the meter does not know."""
    return BY_API[api]


__all__ = [
    "BY_API",
    "GENERIC",
    "KEY_HEADERS",
    "SHAPES",
    "Shape",
    "classify",
    "route",
    "shape_of",
]
