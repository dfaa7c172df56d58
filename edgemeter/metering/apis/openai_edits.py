"""OpenAI's legacy edits (`/edits`): chat's usage object, never streamed."""

from __future__ import annotations

from edgemeter.metering.apis.openai_chat import OpenAIChat


class OpenAIEdits(OpenAIChat):
    api = "openai.edits"
    suffixes = ("/edits",)
    stream_options = False


SHAPE = OpenAIEdits()
