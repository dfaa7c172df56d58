from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgemeter.errors import InvalidUsage
from edgemeter.metering.apis import classify
from edgemeter.metering.apis.anthropic_messages import normalize_anthropic
from edgemeter.metering.apis.openai_chat import normalize_openai
from edgemeter.metering.apis.openai_responses import normalize_responses
from edgemeter.metering.extraction import Extraction
from edgemeter.metering.sse import SSEDecoder, SSEEvent
from edgemeter.metering.usage import MAX_TOKENS, Usage, clean_name, json_object, token_count
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
    shape = classify(path)
    assert (shape.api if shape is not None else None) == api


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


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (0, 0),
        (12, 12),
        (12.0, 12),
        (1e3, 1000),
        (MAX_TOKENS, MAX_TOKENS),
        (float(MAX_TOKENS), MAX_TOKENS),
    ],
)
def test_whole_numbers_in_range_are_counts(value: object, count: int) -> None:
    assert token_count(value) == count
    assert type(token_count(value)) is int


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, 0.5, 12.25, MAX_TOKENS + 1, 1e300, float("nan"), float("inf"), float("-inf"),
     True, False, "12", "", None, [1], {"n": 1}],
)  # fmt: skip
def test_anything_else_is_not_a_count(value: object) -> None:
    with pytest.raises(InvalidUsage):
        token_count(value)


@pytest.mark.parametrize(
    "name",
    ["gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct", "claude-3-5-sonnet@20240620",
     "lmstudio-community/Meta-Llama-3-8B-Instruct-GGUF/Meta-Llama-3-8B-Instruct-Q4_K_M.gguf",
     "模型-1", "a" * 256, "gpt 4"],
)  # fmt: skip
def test_real_model_names_are_clean(name: str) -> None:
    assert clean_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 257, "x" * 1_000_000, "gpt-4o\x00", "gpt\n4o", "gpt-4o\x1b[31m", "gpt\x7f",
     "gpt\u200b-4o", "gpt\u202e-4o", "gpt\ud800", "gpt\ue000", "gpt\u2028", " gpt-4o", "gpt-4o ",
     "gpt\u00a04o", 42, None, ["gpt-4o"]],
)  # fmt: skip
def test_absurd_model_names_are_refused_not_repaired(name: object) -> None:
    assert clean_name(name) is None


@pytest.mark.parametrize(
    "model",
    [b'"gpt-4o\\u0000"', b'"' + b"m" * 300 + b'"', b"17", b'"gpt\\u202e4o"', b'["gpt-4o"]'],
)
def test_an_absurd_model_from_the_upstream_is_flagged_and_never_kept(model: bytes) -> None:
    ex = Extraction("openai.chat")
    ex.body(b'{"id":"x","model":' + model + b',"usage":{"prompt_tokens":1,"completion_tokens":1}}')
    assert ex.model is None and ex.bad_model
    assert ex.usage is not None and ex.usage.tokens_used == 2


def test_an_absurd_id_is_dropped() -> None:
    ex = Extraction("openai.chat")
    ex.body(b'{"id":"' + b"i" * 1000 + b'","model":"m"}')
    assert ex.upstream_id is None and ex.model == "m"


def test_sums_of_valid_counts_past_the_cap_are_invalid() -> None:
    parts = [{"input_tokens": MAX_TOKENS, "output_tokens": 1}] * 2
    with pytest.raises(InvalidUsage, match="input_tokens"):
        normalize_anthropic({"iterations": parts})
    with pytest.raises(InvalidUsage, match="input_tokens"):
        normalize_openai(
            {"prompt_tokens": MAX_TOKENS, "prompt_tokens_details": {"cached_tokens": 5}},
            anthropic_counts=True,
        )


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_json_nested_past_the_recursion_limit_is_not_an_object(depth: int) -> None:
    data = b'{"a":' * depth + b"1" + b"}" * depth
    assert json_object(data) is None
    ex = Extraction("openai.chat")
    ex.body(data)
    ex.event(SSEEvent("", data))
    assert ex.usage is None and ex.invalid is None


def test_anthropic_usage_merged_over_events_stays_bounded() -> None:
    ex = Extraction("anthropic.messages")
    start = b'{"type":"message_start","message":{"model":"c","usage":{"input_tokens":5,"output_tokens":1}}}'
    ex.event(SSEEvent("message_start", start))
    for i in range(1000):
        keys = ",".join(f'"k{i}_{j}":0' for j in range(10))
        delta = f'{{"type":"message_delta","usage":{{"output_tokens":{i + 1},{keys}}}}}'.encode()
        ex.event(SSEEvent("message_delta", delta))
    assert ex.usage is not None and ex.usage.output_tokens == 1000
    assert len(ex.usage.raw) <= 64


TAIL_CASES = [
    ("openai.embeddings", b'.0]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":9,"total_tokens":9}}', (9, 0)),
    ("openai.chat", b'"}}],"usage": {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},"system_fingerprint":"fp"}', (3, 4)),
    ("anthropic.messages", b'"stop_sequence":null,"usage":{"input_tokens":3,"cache_read_input_tokens":2,"output_tokens":5}}', (5, 5)),
    ("openai.responses", b'"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9},"user":null}', (7, 2)),
    # Generated text that looks like usage is escaped, so it never matches.
    ("openai.chat", b'"content":"say \\"usage\\":{\\"prompt_tokens\\":999}"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 1)),
]  # fmt: skip


@pytest.mark.parametrize(("api", "tail", "tokens"), TAIL_CASES)
def test_the_usage_at_the_end_of_a_body_is_found(
    api: Any, tail: bytes, tokens: tuple[int, int]
) -> None:
    ex = Extraction(api)
    ex.tail(b"\x80garbage cut mid-body " + tail)
    assert ex.usage is not None
    assert (ex.usage.input_tokens, ex.usage.output_tokens) == tokens


@pytest.mark.parametrize(
    "tail", [b"", b'"usage":null}', b'"usage":{"prompt_tokens":', b"\xff" * 100]
)
def test_a_tail_without_a_usage_object_yields_nothing(tail: bytes) -> None:
    ex = Extraction("openai.chat")
    ex.tail(tail)
    assert ex.usage is None and ex.invalid is None
