from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgemeter.sse import SSEDecoder
from edgemeter.usage import (
    Extraction,
    InvalidUsage,
    Usage,
    classify,
    normalize_anthropic,
    normalize_openai,
    normalize_responses,
)
from tests.corpus import chunked, is_stream, wire_body


def extract(path: Path, api: Any, chunk_size: int = 7) -> Extraction:
    ex = Extraction(api)
    body = wire_body(path)
    if not is_stream(path):
        ex.body(body)
        return ex
    decoder = SSEDecoder()
    for chunk in chunked(body, chunk_size):
        for ev in decoder.feed(chunk):
            ex.event(ev)
    for ev in decoder.close():
        ex.event(ev)
    return ex


# file, api, model, (input, cached, cache_write, output, reasoning)
CASES = [
    ("openai-chat-nonstream.json", "openai.chat", "gpt-4.1-nano-2025-04-14", (16, 0, 0, 363, 0)),
    ("openai-chat-nonstream-cached-tokens.json", "openai.chat", "gpt-5.6-sol", (4020, 4012, 0, 4, 0)),
    ("openai-chat-stream-tool-call-usage.raw.sse", "openai.chat", "gpt-4o-mini-2024-07-18", (53, 0, 0, 15, 0)),
    ("openai-chat-stream-include-usage.chunks.txt", "openai.chat", "gpt-4.1-nano-2025-04-14", (16, 0, 0, 300, 0)),
    ("anthropic-messages-nonstream.json", "anthropic.messages", "claude-sonnet-4-5-20250929", (12, 0, 0, 29, 0)),
    ("anthropic-messages-nonstream-cache-read.json", "anthropic.messages", "claude-sonnet-4-5-20250929", (1532, 1111, 418, 33, 0)),
    ("anthropic-messages-stream-simple.raw.sse", "anthropic.messages", "claude-sonnet-4-5-20250929", (20, 0, 0, 5, 0)),
    ("anthropic-messages-stream-text.chunks.txt", "anthropic.messages", "claude-sonnet-4-5-20250929", (12, 0, 0, 30, 0)),
    ("anthropic-compatible-stream-delta-input-tokens.chunks.txt", "anthropic.messages", "claude-opus-4-5-20251101", (61, 0, 0, 2, 0)),
    ("anthropic-messages-stream-prompt-cache.chunks.txt", "anthropic.messages", "claude-sonnet-5", (9632, 6289, 3337, 198, 0)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "api", "model", "tokens"), CASES)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_recorded_usage_is_normalised(
    recorded: Path, name: str, api: Any, model: str, tokens: tuple[int, ...], chunk_size: int
) -> None:
    ex = extract(recorded / name, api, chunk_size)
    assert ex.usage is not None
    u = ex.usage
    got = (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens)
    assert (*got, u.reasoning_tokens) == tokens
    assert ex.model == model
    assert ex.error is None and ex.invalid is None


def test_a_stream_without_usage_yields_none(recorded: Path) -> None:
    ex = extract(recorded / "azure-chat-stream-prompt-filter-nousage.raw.sse", "openai.chat")
    assert ex.usage is None
    assert ex.model is not None


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai.chat"),
        ("/v1/completions", "openai.completions"),
        ("/v1/embeddings", "openai.embeddings"),
        ("/v1/responses", "openai.responses"),
        ("/v1/messages", "anthropic.messages"),
        ("/v1/messages?beta=true", "anthropic.messages"),
        ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", "openai.chat"),
        ("/v1/models", None),
        ("/v1/messages/count_tokens", None),
    ],
)
def test_paths_are_classified_by_api_shape(path: str, api: str | None) -> None:
    assert classify(path) == api


def test_openai_output_counts_reasoning_reported_outside_completion() -> None:
    # xAI: total = prompt + completion + reasoning.
    u = normalize_openai(
        {
            "prompt_tokens": 12,
            "completion_tokens": 1,
            "total_tokens": 303,
            "completion_tokens_details": {"reasoning_tokens": 290},
        }
    )
    assert (u.output_tokens, u.reasoning_tokens, u.tokens_used) == (291, 290, 303)


def test_anthropic_input_adds_cache_reads_and_writes() -> None:
    u = normalize_anthropic(
        {
            "input_tokens": 3,
            "cache_creation_input_tokens": 418,
            "cache_read_input_tokens": 1111,
            "output_tokens": 33,
        }
    )
    assert u == Usage(1532, 1111, 418, 33, 0, u.raw)


def test_responses_usage_reads_details() -> None:
    u = normalize_responses(
        {
            "input_tokens": 7000,
            "input_tokens_details": {"cached_tokens": 3072},
            "output_tokens": 463,
            "output_tokens_details": {"reasoning_tokens": 64},
            "total_tokens": 7463,
        }
    )
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (
        7000,
        3072,
        463,
        64,
    )


@pytest.mark.parametrize("bad", [-1, 1.5, "12", True, float("nan"), 2**60, [1]])
def test_counts_that_are_not_counts_are_invalid(bad: object) -> None:
    with pytest.raises(InvalidUsage):
        normalize_openai({"prompt_tokens": bad, "completion_tokens": 1})


def test_invalid_usage_is_flagged_not_billed() -> None:
    ex = Extraction("openai.chat")
    ex.body(b'{"model":"m","usage":{"prompt_tokens":-5,"completion_tokens":1}}')
    assert ex.usage is None
    assert ex.invalid == "prompt_tokens is out of range"


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b'{"usage": "x"}', b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_yield_nothing(body: bytes) -> None:
    ex = Extraction("openai.chat")
    ex.body(body)
    assert ex.usage is None and ex.invalid is None
