"""OpenAI embeddings (`/embeddings`): prompt tokens only, never streamed, no output to estimate."""

from __future__ import annotations

from edgemeter.metering.apis.openai_chat import OpenAIChat


class OpenAIEmbeddings(OpenAIChat):
    api = "openai.embeddings"
    suffixes = ("/embeddings",)
    stream_options = False
    produces_output = False


SHAPE = OpenAIEmbeddings()
