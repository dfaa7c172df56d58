"""OpenAI legacy completions (`/completions`): chat's usage object and stream framing."""

from __future__ import annotations

from edgemeter.metering.apis.openai_chat import OpenAIChat


class OpenAICompletions(OpenAIChat):
    api = "openai.completions"
    suffixes = ("/completions",)


SHAPE = OpenAICompletions()
