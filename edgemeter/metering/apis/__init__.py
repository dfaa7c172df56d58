"""The API shapes the meter bills, one module each, and the one table that routes a request to
its shape. Adding a shape is a module with a `SHAPE` (a `Shape` subclass) and a line in SHAPES.
"""

from __future__ import annotations

from edgemeter.metering.apis import (
    anthropic_messages,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_responses,
)
from edgemeter.metering.apis.shape import Shape

SHAPES: tuple[Shape, ...] = (
    openai_chat.SHAPE,
    openai_completions.SHAPE,
    openai_embeddings.SHAPE,
    openai_responses.SHAPE,
    anthropic_messages.SHAPE,
)
BY_API: dict[str, Shape] = {shape.api: shape for shape in SHAPES}
# Longest suffix first: "/chat/completions" must win over "/completions".
_ROUTES: tuple[tuple[str, Shape], ...] = tuple(
    sorted(
        ((suffix, shape) for shape in SHAPES for suffix in shape.suffixes),
        key=lambda route: -len(route[0]),
    )
)


def classify(path: str) -> Shape | None:
    """The API shape of a request path (query ignored), None for paths that are not billable."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, shape in _ROUTES:
        if path.endswith(suffix):
            return shape
    return None


def shape_of(api: str) -> Shape:
    """The shape named by an envelope's metadata.api; KeyError for one the meter does not know."""
    return BY_API[api]


__all__ = ["BY_API", "SHAPES", "Shape", "classify", "shape_of"]
