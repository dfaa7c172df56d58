"""OpenAI moderations (`/moderations`): free, so counted (`free`) and never billed, never
estimated (its answer carries no usage)."""

from __future__ import annotations

from typing import Any

from edgemeter.metering.apis.shape import Shape
from edgemeter.metering.usage import Usage


class OpenAIModerations(Shape):
    api = "openai.moderations"
    suffixes = ("/moderations",)
    free = True

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        raise NotImplementedError("moderations are never metered")


SHAPE = OpenAIModerations()
