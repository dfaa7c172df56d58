"""The recorded corpus, end to end: every file in ../shared/fixtures/recorded goes through the
real addon code path (requestheaders, request, responseheaders, the stream callable, response)
and the envelope it produces is checked against a table written by hand.

Every expected number below was worked out by reading the file's `.source` note and the usage
objects in the file itself, applying the normalisation of SPEC §4 by hand; none was produced by
running edgemeter. The rules applied:

- OpenAI shape: input = prompt_tokens; cached = prompt_tokens_details.cached_tokens (DeepSeek:
  also prompt_cache_hit_tokens); cache_write = prompt_tokens_details.cache_write_tokens;
  output = max(completion_tokens, total_tokens - prompt_tokens) (xAI counts reasoning outside
  completion_tokens but inside total_tokens); reasoning = completion_tokens_details.reasoning_tokens.
  Groq may carry it in x_groq.usage. The last usage a stream reports wins.
- Responses API: input = input_tokens; cached = input_tokens_details.cached_tokens;
  output = max(output_tokens, total_tokens - input_tokens); reasoning =
  output_tokens_details.reasoning_tokens; from response.completed / .incomplete / .failed.
- Anthropic: input = input_tokens + cache_creation_input_tokens + cache_read_input_tokens;
  cached = cache_read_input_tokens; cache_write = cache_creation_input_tokens; output =
  output_tokens; reasoning = output_tokens_details.thinking_tokens (else 0). In streams the
  cumulative message_delta's fields override message_start's.
- Non-2xx: no envelope. A 2xx answer that reports no usage is estimated (tokens not checked
  exactly, but tokens_used and output_tokens must be > 0).
- Gemini usageMetadata (the last of a stream): input = promptTokenCount +
  toolUsePromptTokenCount; cached = cachedContentTokenCount; output = candidatesTokenCount +
  thoughtsTokenCount (at least total - input); reasoning = thoughtsTokenCount.
- Images, speech, transcriptions, Realtime: input_tokens / output_tokens (+ total); their
  `*_token_details` and Gemini's `*TokensDetails` give tokens_detail by modality, written only
  when a non-text kind is > 0 (text alone is what input and output already say), and then with
  every kind > 0. GPT Image output tokens are image tokens.
- units: whisper `usage.seconds` x 1000 = audio_ms; Cohere `meta.billed_units.search_units`;
  Anthropic `server_tool_use.web_search_requests` and Responses `web_search_call` output items
  = web_search_calls. An answer without usage on these routes is billed on units, estimated:
  images counted in `data[]` at the answer's echoed (else requested) size and quality; audio
  by the uploaded file's length (the test uploads a WAV of known length).
- service_tier: only a tier other than the base one ("default", "standard").
- Moderations are free: no envelope, counted `free`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytest

from edgemeter.addon import Meter
from tests.corpus import FORM, form, is_stream, wav, wire_body
from tests.flows import assert_contract, make_flow, run_flow, spooled, upgraded

Outcome = Literal["complete", "client_aborted", "upstream_error"]
Source = Literal["reported", "estimated"]
# (input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, tokens_used)
Tokens = tuple[int, int, int, int, int, int]
TOKEN_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tokens_used",
)
FLAT_PRICE = 156  # meter_price_micro_per_token's default; no price table is configured

API_OF_PATH = {
    "/v1/chat/completions": "openai.chat",
    "/v1/completions": "openai.completions",
    "/v1/embeddings": "openai.embeddings",
    "/v1/responses": "openai.responses",
    "/v1/messages": "anthropic.messages",
    "/v1/responses/compact": "openai.responses",
    "/v1/edits": "openai.edits",
    "/v1/images/generations": "openai.images",
    "/v1/images/edits": "openai.images",
    "/v1/audio/transcriptions": "openai.audio.transcriptions",
    "/v1/audio/translations": "openai.audio.translations",
    "/v1/audio/speech": "openai.audio.speech",
    "/v1/rerank": "rerank",
    "/v1/moderations": "openai.moderations",
    "/v1beta/models/gemini-2.5-flash:generateContent": "gemini.generate_content",
    "/v1beta/models/gemini-2.0-flash:generateContent": "gemini.generate_content",
    "/v1beta/models/gemini-2.5-pro:generateContent": "gemini.generate_content",
    "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse": "gemini.generate_content",
}

# What the requests of the new routes asked (their .source notes, or what an SDK sends): the
# model (none of these answers names one), sizes, the text to speak, the uploaded audio.
UPLOAD = wav(25)  # 2.5 s of audio: 20,000 frames at 8 kHz
SPEECH = b'{"model":"gpt-4o-mini-tts","input":"Today is a wonderful day.","voice":"alloy","stream_format":"sse"}'
IMAGE_MINI = b'{"model":"gpt-image-1-mini","prompt":"A simple black-and-white line drawing of a cat playing with yarn","size":"1024x1024","quality":"low"}'
ASKED: dict[str, tuple[bytes, str]] = {
    "cohere-rerank-v2.json": (
        b'{"model":"rerank-v3.5","query":"sunny day","documents":["rainy","sunny"]}',
        "application/json",
    ),
    "openai-audio-speech-stream.chunks.txt": (SPEECH, "application/json"),
    "openai-audio-transcriptions-gpt-4o-transcribe-tokens.json": (
        form({"model": "gpt-4o-transcribe"}, UPLOAD),
        FORM,
    ),
    "openai-audio-transcriptions-stream.raw.sse": (
        form({"model": "gpt-4o-mini-transcribe", "stream": "true"}, UPLOAD),
        FORM,
    ),
    "openai-audio-transcriptions-whisper-duration.json": (
        form({"model": "whisper-1"}, UPLOAD),
        FORM,
    ),
    "openai-audio-translations-whisper-nousage.json": (form({"model": "whisper-1"}, UPLOAD), FORM),
    "openai-edits-legacy.json": (
        b'{"model":"text-davinci-edit-001","input":"What day of the wek is it?","instruction":"Fix the spelling mistakes"}',
        "application/json",
    ),
    "openai-images-edits-gpt-image.json": (
        form({"model": "gpt-image-1", "prompt": "Add a red hat"}, b"\x89PNG fake", "cat.png"),
        FORM,
    ),
    "openai-images-generations-gpt-image-1-mini-nousage.json": (IMAGE_MINI, "application/json"),
    "openai-images-generations-gpt-image-1.json": (
        b'{"model":"gpt-image-1.5","prompt":"A cute baby sea otter","n":1,"size":"1024x1024"}',
        "application/json",
    ),
    "openai-images-generations-stream.raw.sse": (
        b'{"model":"gpt-image-1.5","prompt":"A cute baby sea otter","stream":true,"partial_images":1}',
        "application/json",
    ),
    "openai-moderations.json": (
        b'{"model":"omni-moderation-latest","input":"I want to kill them."}',
        "application/json",
    ),
    "openai-responses-compact.json": (
        b'{"model":"gpt-4o-mini","input":[{"role":"user","content":"Hello!"}],"instructions":"You are a helpful assistant."}',
        "application/json",
    ),
}


class Row(NamedTuple):
    """What one recorded file must be metered as.

    model None: no envelope at all. tokens None (with a model): usage_source "estimated", the
    exact numbers are not checked, but tokens_used and output_tokens must be > 0.
    A 2xx stream ending in an upstream error is billed only for the usage the upstream reported
    (SPEC §3): one that reported none has no envelope and is counted by reason."""

    fixture: str
    path: str
    status: int
    model: str | None = None
    tokens: Tokens | None = None
    outcome: Outcome | None = None
    source: Source | None = None
    # metadata.tokens_detail / units / service_tier; None: the envelope has none.
    detail: dict[str, int] | None = None
    units: dict[str, int | str] | None = None
    tier: str | None = None
    # Why a 2xx answer has no envelope (counted so), when it is not an upstream error.
    unmetered: str | None = None


ROWS: list[Row] = [
    # --- Anthropic Messages ---------------------------------------------------------------------
    # message_start input 43 / output 1; message_delta input 61 / output 2: the delta wins.
    Row("anthropic-compatible-stream-delta-input-tokens.chunks.txt", "/v1/messages", 200, "claude-opus-4-5-20251101", (61, 0, 0, 2, 0, 63), "complete", "reported"),
    Row("anthropic-error-400.json", "/v1/messages", 400),
    # input 3 + cache_creation 418 + cache_read 1111 = 1532.
    Row("anthropic-messages-nonstream-cache-read.json", "/v1/messages", 200, "claude-sonnet-4-5-20250929", (1532, 1111, 418, 33, 0, 1565), "complete", "reported"),
    Row("anthropic-messages-nonstream.json", "/v1/messages", 200, "claude-sonnet-4-5-20250929", (12, 0, 0, 29, 0, 41), "complete", "reported"),
    # JUDGMENT (compaction): the top-level usage covers only the non-compaction iterations
    # (message_delta: input 181, cache_read 0, output 8 -> 189 tokens). Anthropic's compaction
    # docs: "Compaction requires an additional sampling step, which contributes to rate limits and
    # billing" and "To calculate total tokens consumed and billed for a request, sum across all
    # entries in the usage.iterations array". Iterations: compaction {input 100, cache_read 55096,
    # output 83} + message {input 181, output 8}: input 100 + 55096 + 181 = 55377 (55096 of it
    # cache reads), output 83 + 8 = 91.
    Row("anthropic-messages-stream-cache-read.raw.sse", "/v1/messages", 200, "claude-sonnet-4-6", (55377, 55096, 0, 91, 0, 55468), "complete", "reported"),
    # message_delta carries new final input/cache values: input 6 + cache_creation 3337 +
    # cache_read 6289 = 9632; output 198 (not message_start's 69); thinking_tokens 0.
    # server_tool_use (web_search 0, web_fetch 0) and the code-execution container are not tokens.
    Row("anthropic-messages-stream-prompt-cache.chunks.txt", "/v1/messages", 200, "claude-sonnet-5", (9632, 6289, 3337, 198, 0, 9830), "complete", "reported"),
    Row("anthropic-messages-stream-simple.raw.sse", "/v1/messages", 200, "claude-sonnet-4-5-20250929", (20, 0, 0, 5, 0, 25), "complete", "reported"),
    Row("anthropic-messages-stream-text.chunks.txt", "/v1/messages", 200, "claude-sonnet-4-5-20250929", (12, 0, 0, 30, 0, 42), "complete", "reported"),
    # Extended thinking: output_tokens 282 includes the thinking, but no thinking_tokens
    # breakdown is reported, so reasoning is 0 (unknown, not absent); the bill is right either way.
    Row("anthropic-messages-stream-thinking.raw.sse", "/v1/messages", 200, "claude-sonnet-4-20250514", (43, 0, 0, 282, 0, 325), "complete", "reported"),
    # JUDGMENT: Anthropic's OpenAI-compatible endpoint, no usage chunk at all (the client did not
    # ask for include_usage): a complete answer, text and a tool call reached the client, so it is
    # billed by estimate, as any OpenAI-shaped stream without usage.
    Row("anthropic-openai-compat-raw.sse", "/v1/chat/completions", 200, "claude-haiku-4-5-20251001", None, "complete", "estimated"),
    # --- Azure OpenAI -----------------------------------------------------------------------------
    # First chunk has model "" and id "": the model is the first non-empty one.
    # output = max(78, 93 - 15) = 78, of which reasoning 64.
    Row("azure-chat-stream-prompt-filter-first-chunk.chunks.txt", "/v1/chat/completions", 200, "gpt-5-nano-2025-08-07", (15, 0, 0, 78, 64, 93), "complete", "reported"),
    # No usage chunk (client did not ask include_usage): estimated.
    Row("azure-chat-stream-prompt-filter-nousage.raw.sse", "/v1/chat/completions", 200, "gpt-4o-2024-08-06", None, "complete", "estimated"),
    Row("azure-chat-stream-prompt-filter-with-usage.raw.sse", "/v1/chat/completions", 200, "gpt-5.4-mini-2026-03-17", (23, 0, 0, 11, 0, 34), "complete", "reported"),
    Row("azure-responses-stream-content-filters.chunks.txt", "/v1/responses", 200, "gpt-5.1", (11, 0, 0, 11, 0, 22), "complete", "reported"),
    # --- vLLM (Crusoe) ----------------------------------------------------------------------------
    Row("crusoe-openai-compatible-chat-stream.raw.sse", "/v1/chat/completions", 200, "meta-llama/Llama-3.3-70B-Instruct", (46, 0, 0, 14, 0, 60), "complete", "reported"),
    # --- DeepSeek ---------------------------------------------------------------------------------
    # cached_tokens 512 == prompt_cache_hit_tokens 512 (miss 51; 512 + 51 = prompt 563).
    Row("deepseek-chat-nonstream-cache-hit-reasoning.json", "/v1/chat/completions", 200, "deepseek-v4-flash", (563, 512, 0, 116, 60, 679), "complete", "reported"),
    Row("deepseek-chat-stream-tool-call-cache-hit.chunks.txt", "/v1/chat/completions", 200, "deepseek-reasoner", (339, 320, 0, 83, 39, 422), "complete", "reported"),
    Row("deepseek-reasoner-nonstream.json", "/v1/chat/completions", 200, "deepseek-reasoner", (495, 320, 0, 144, 118, 639), "complete", "reported"),
    Row("deepseek-reasoner-stream.chunks.txt", "/v1/chat/completions", 200, "deepseek-reasoner", (18, 0, 0, 219, 205, 237), "complete", "reported"),
    Row("deepseek-responses-api-stream.raw.sse", "/v1/responses", 200, "deepseek-v4-flash", (90, 0, 0, 15, 7, 105), "complete", "reported"),
    # --- Groq -------------------------------------------------------------------------------------
    # 2xx stream of reasoning deltas ending in `event: error` (tool_use_failed), no usage anywhere.
    # SPEC §3 bills an upstream error only for the usage the upstream reported: none here, so no
    # envelope (counted as upstream_error_without_usage), though ~90 deltas reached the client.
    Row("groq-chat-stream-error-event.raw.sse", "/v1/chat/completions", 200),
    # Usage in the finish chunk, both as x_groq.usage and top-level usage (same numbers).
    Row("groq-chat-stream-reasoning-x_groq-usage.raw.sse", "/v1/chat/completions", 200, "openai/gpt-oss-120b", (304, 0, 0, 49, 23, 353), "complete", "reported"),
    Row("groq-chat-stream-x_groq-usage.chunks.txt", "/v1/chat/completions", 200, "llama-3.3-70b-versatile", (45, 0, 0, 662, 0, 707), "complete", "reported"),
    # --- LM Studio, Mistral -----------------------------------------------------------------------
    Row("lmstudio-responses-stream.chunks.txt", "/v1/responses", 200, "gemma-7b-it", (31, 30, 0, 282, 0, 313), "complete", "reported"),
    Row("mistral-chat-stream.chunks.txt", "/v1/chat/completions", 200, "mistral-small-latest", (13, 0, 0, 8, 0, 21), "complete", "reported"),
    # --- OpenAI -----------------------------------------------------------------------------------
    Row("openai-chat-error-400.json", "/v1/chat/completions", 400),
    # prompt_tokens_details.cache_write_tokens is present (0).
    Row("openai-chat-nonstream-cached-tokens.json", "/v1/chat/completions", 200, "gpt-5.6-sol", (4020, 4012, 0, 4, 0, 4024), "complete", "reported"),
    Row("openai-chat-nonstream.json", "/v1/chat/completions", 200, "gpt-4.1-nano-2025-04-14", (16, 0, 0, 363, 0, 379), "complete", "reported"),
    Row("openai-chat-stream-include-usage.chunks.txt", "/v1/chat/completions", 200, "gpt-4.1-nano-2025-04-14", (16, 0, 0, 300, 0, 316), "complete", "reported"),
    Row("openai-chat-stream-tool-call-usage.raw.sse", "/v1/chat/completions", 200, "gpt-4o-mini-2024-07-18", (53, 0, 0, 15, 0, 68), "complete", "reported"),
    Row("openai-completions-legacy-stream-usage.chunks.txt", "/v1/completions", 200, "gpt-3.5-turbo-instruct:20230824-v2", (14, 0, 0, 16, 0, 30), "complete", "reported"),
    # Embeddings report no completion_tokens: output 0, tokens_used = prompt 4 = total 4.
    Row("openai-embeddings-base64.json", "/v1/embeddings", 200, "text-embedding-3-small", (4, 0, 0, 0, 0, 4), "complete", "reported"),
    Row("openai-embeddings-error-404.json", "/v1/embeddings", 404),
    # input_tokens_details.cache_write_tokens is present (0).
    Row("openai-responses-nonstream-cached-tokens.json", "/v1/responses", 200, "gpt-5.6-sol", (4020, 4012, 0, 5, 0, 4025), "complete", "reported"),
    Row("openai-responses-nonstream.json", "/v1/responses", 200, "gpt-5.3-codex", (7243, 3072, 0, 423, 58, 7666), "complete", "reported"),
    Row("openai-responses-stream-cached-reasoning.chunks.txt", "/v1/responses", 200, "gpt-5.3-codex", (7112, 3072, 0, 463, 64, 7575), "complete", "reported"),
    # JUDGMENT: `error` event (insufficient_quota) then response.failed with usage null and
    # output []: the request was refused before any inference, nothing was generated, and no
    # usage was reported. Billing it (even by estimate) would charge for work never done: it is
    # a quota refusal that happens to arrive as a 200 stream, so, like a 429, no envelope.
    Row("openai-responses-stream-error-insufficient-quota.chunks.txt", "/v1/responses", 200),
    # The answer names service_tier "flex" (half price at OpenAI): the envelope says so.
    Row("openai-responses-stream-reasoning-usage.raw.sse", "/v1/responses", 200, "gpt-5-2025-08-07", (53, 0, 0, 469, 448, 522), "complete", "reported", tier="flex"),
    Row("openai-responses-stream-small-reasoning.chunks.txt", "/v1/responses", 200, "gpt-5-codex", (407, 0, 0, 151, 128, 558), "complete", "reported"),
    Row("openai-responses-stream.raw.sse", "/v1/responses", 200, "gpt-4o-2024-08-06", (255, 0, 0, 16, 0, 271), "complete", "reported"),
    # --- OpenRouter -------------------------------------------------------------------------------
    # Usage in a final chunk whose choices[0] is not finished; `cost` (the operator's USD cost at
    # OpenRouter) is ignored: the customer is priced by edgemeter's own table, by tokens.
    Row("openrouter-chat-stream-cached-reasoning.raw.sse", "/v1/chat/completions", 200, "x-ai/grok-4", (687, 679, 0, 187, 118, 874), "complete", "reported"),
    # One chunk carries BOTH an error object ("Token limit reached") AND usage: upstream_error,
    # billed for the reported usage: prompt 43, output max(10, 53 - 43) = 10.
    # JUDGMENT: it reports reasoning_tokens 11 > completion_tokens 10, which cannot be "of which
    # reasoning"; the envelope keeps reasoning_tokens <= output_tokens by clamping to 10 (the
    # provider's own number stays in usage_raw). tokens_used 53 = total_tokens either way.
    Row("openrouter-chat-stream-midstream-error.raw.sse", "/v1/chat/completions", 200, "minimax/minimax-m2:free", (43, 0, 0, 10, 10, 53), "upstream_error", "reported"),
    Row("openrouter-error-429.json", "/v1/chat/completions", 429),
    # --- xAI, Z.ai --------------------------------------------------------------------------------
    # completion 1 excludes the 290 reasoning tokens, total 303 includes them:
    # output = max(1, 303 - 12) = 291, of which reasoning 290. cost_in_usd_ticks ignored.
    Row("xai-chat-stream-reasoning-usage.chunks.txt", "/v1/chat/completions", 200, "grok-3-mini", (12, 11, 0, 291, 290, 303), "complete", "reported"),
    # Usage rides on the finish chunk itself (not a separate usage-only chunk).
    Row("zai-glm-chat-stream-reasoning.raw.sse", "/v1/chat/completions", 200, "glm-4.7", (13, 0, 0, 564, 561, 577), "complete", "reported"),
    # --- What the envelope could not say before: modalities, units, tiers ------------------------
    # input 8984 (no cache reads or writes) + output 520; server_tool_use.web_search_requests 1.
    # service_tier "standard" is the base tier; ephemeral_1h_input_tokens 0: no tokens_detail.
    Row("anthropic-messages-web-search.json", "/v1/messages", 200, "claude-sonnet-4-20250514", (8984, 0, 0, 520, 0, 9504), "complete", "reported", units={"web_search_calls": 1}),
    # prompt 28 = text 27 + audio 1; completion 17 = text 17. service_tier "default": base.
    Row("openai-chat-audio-input.json", "/v1/chat/completions", 200, "gpt-4o-audio-preview-2025-06-03", (28, 0, 0, 17, 0, 45), "complete", "reported", detail={"input_text": 27, "input_audio": 1, "output_text": 17}),
    # prompt 22 (text 22); completion 18 = text 6 + audio 12.
    Row("openai-chat-audio-output.json", "/v1/chat/completions", 200, "gpt-4o-mini-audio-preview-2024-12-17", (22, 0, 0, 18, 0, 40), "complete", "reported", detail={"input_text": 22, "output_text": 6, "output_audio": 12}),
    # input 9299 (cached 8448), output 577 (reasoning 512); ONE web_search_call output item.
    Row("openai-responses-web-search.json", "/v1/responses", 200, "gpt-5-2025-08-07", (9299, 8448, 0, 577, 512, 9876), "complete", "reported", units={"web_search_calls": 1}),
    # Responses usage: input 160 (cached 0), output 297 (reasoning 0); the answer names no model.
    Row("openai-responses-compact.json", "/v1/responses/compact", 200, "gpt-4o-mini", (160, 0, 0, 297, 0, 457), "complete", "reported"),
    # Legacy edits, chat's usage: 25 + 32 = 57; the answer names no model.
    Row("openai-edits-legacy.json", "/v1/edits", 200, "text-davinci-edit-001", (25, 0, 0, 32, 0, 57), "complete", "reported"),
    # --- Images -----------------------------------------------------------------------------------
    # input 50 = text 10 + image 40; output 50 image tokens; total 100.
    Row("openai-images-generations-gpt-image-1.json", "/v1/images/generations", 200, "gpt-image-1.5", (50, 0, 0, 50, 0, 100), "complete", "reported", detail={"input_text": 10, "input_image": 40, "output_image": 50}),
    Row("openai-images-generations-stream.raw.sse", "/v1/images/generations", 200, "gpt-image-1.5", (50, 0, 0, 50, 0, 100), "complete", "reported", detail={"input_text": 10, "input_image": 40, "output_image": 50}),
    # No usage: one image of data[] at the requested 1024x1024, low; input: the prompt's 64
    # characters, 16 tokens; no output tokens (the images are the output).
    Row("openai-images-generations-gpt-image-1-mini-nousage.json", "/v1/images/generations", 200, "gpt-image-1-mini", (16, 0, 0, 0, 0, 16), "complete", "estimated", units={"images": 1, "image_size": "1024x1024", "image_quality": "low"}),
    # No usage: one image, size and quality as the answer echoes them; the prompt "Add a red
    # hat" is 13 characters, 4 tokens.
    Row("openai-images-edits-gpt-image.json", "/v1/images/edits", 200, "gpt-image-1", (4, 0, 0, 0, 0, 4), "complete", "estimated", units={"images": 1, "image_size": "1024x1024", "image_quality": "high"}),
    # --- Audio ------------------------------------------------------------------------------------
    # usage {type: tokens}: input 14 = text 0 + audio 14; output 45.
    Row("openai-audio-transcriptions-gpt-4o-transcribe-tokens.json", "/v1/audio/transcriptions", 200, "gpt-4o-transcribe", (14, 0, 0, 45, 0, 59), "complete", "reported", detail={"input_audio": 14}),
    # The stream's transcript.text.done: the same 14 (audio) + 45.
    Row("openai-audio-transcriptions-stream.raw.sse", "/v1/audio/transcriptions", 200, "gpt-4o-mini-transcribe", (14, 0, 0, 45, 0, 59), "complete", "reported", detail={"input_audio": 14}),
    # usage {type: duration, seconds: 7}: 7000 ms of audio, no tokens.
    Row("openai-audio-transcriptions-whisper-duration.json", "/v1/audio/transcriptions", 200, "whisper-1", (0, 0, 0, 0, 0, 0), "complete", "reported", units={"audio_ms": 7000}),
    # No usage at all: the uploaded WAV's length, 2.5 s; output: the translation's 116
    # characters, 29 tokens; no prompt, no input tokens.
    Row("openai-audio-translations-whisper-nousage.json", "/v1/audio/translations", 200, "whisper-1", (0, 0, 0, 29, 0, 29), "complete", "estimated", units={"audio_ms": 2500}),
    # speech.audio.done: input 14 (the text), output 101 (the audio made).
    Row("openai-audio-speech-stream.chunks.txt", "/v1/audio/speech", 200, "gpt-4o-mini-tts", (14, 0, 0, 101, 0, 115), "complete", "reported", detail={"input_text": 14, "output_audio": 101}),
    # --- Rerank, moderations ----------------------------------------------------------------------
    # usage {total_tokens 12} alone: all input.
    Row("voyage-rerank.json", "/v1/rerank", 200, "rerank-2.5", (12, 0, 0, 0, 0, 12), "complete", "reported"),
    # meta.billed_units {search_units 1}: no tokens, one search unit; the answer names no model.
    Row("cohere-rerank-v2.json", "/v1/rerank", 200, "rerank-v3.5", (0, 0, 0, 0, 0, 0), "complete", "reported", units={"search_units": 1}),
    Row("openai-moderations.json", "/v1/moderations", 200, unmetered="free"),
    # --- Gemini -----------------------------------------------------------------------------------
    # prompt 17713 (cached 17379 inside) + tool 0; output 68 + thoughts 821 = 889 = 18602 - 17713.
    # promptTokensDetails TEXT 16, VIDEO 15780, AUDIO 1917; serviceTier "standard": base.
    Row("gemini-generatecontent-cached-video-audio.json", "/v1beta/models/gemini-2.5-flash:generateContent", 200, "gemini-2.5-flash", (17713, 17379, 0, 889, 821, 18602), "complete", "reported", detail={"input_text": 16, "input_audio": 1917, "input_video": 15780}),
    # prompt 1817 = TEXT 11 + IMAGE 1806; candidates 5 (TEXT 5); total 1822.
    Row("gemini-generatecontent-image-input.json", "/v1beta/models/gemini-2.0-flash:generateContent", 200, "gemini-2.0-flash", (1817, 0, 0, 5, 0, 1822), "complete", "reported", detail={"input_text": 11, "input_image": 1806, "output_text": 5}),
    # The last chunk's cumulative usageMetadata: prompt 34; candidates 469 + thoughts 787 =
    # 1256 = 1290 - 34. Text only: no tokens_detail.
    Row("gemini-generatecontent-stream.raw.sse", "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", 200, "gemini-2.5-pro", (34, 0, 0, 1256, 787, 1290), "complete", "reported"),
    # prompt 9; candidates 9 + thoughts 34 = 43 = 52 - 9.
    Row("gemini-generatecontent-thinking.json", "/v1beta/models/gemini-2.5-flash:generateContent", 200, "gemini-2.5-flash", (9, 0, 0, 43, 34, 52), "complete", "reported"),
    # prompt 17 + toolUsePrompt 119 = 136; candidates 201 + thoughts 213 = 414 = 550 - 136.
    # groundingMetadata.webSearchQueries: one query.
    Row("gemini-generatecontent-web-search-tooluse.json", "/v1beta/models/gemini-2.5-pro:generateContent", 200, "gemini-2.5-pro", (136, 0, 0, 414, 213, 550), "complete", "reported", units={"web_search_calls": 1}),
]  # fmt: skip


# Every SSE cutting: one piece (-1), one chunk per event (0, as upstreams flush), and 1, 2, 3
# and 7-byte pieces (events, lines, CRLFs and UTF-8 sequences split everywhere).
CUTTINGS = (-1, 0, 1, 2, 3, 7)


def _params() -> list[Any]:
    """Each stream in every cutting; bodies once."""
    params = []
    for row in ROWS:
        stream = is_stream(Path(row.fixture))
        for size in CUTTINGS if stream else (7,):
            name = {-1: "whole", 0: "events"}.get(size, f"{size}b") if stream else "body"
            params.append(pytest.param(row, size, id=f"{row.fixture}-{name}"))
    return params


def test_the_table_covers_every_recorded_file(recorded: Path) -> None:
    index = [
        line.strip()
        for line in (recorded / "INDEX.txt").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    on_disk = sorted(
        p.name
        for p in recorded.iterdir()
        if p.name != "INDEX.txt" and not p.name.endswith(".source")
    )
    table = [row.fixture for row in ROWS] + [REALTIME]
    assert len(set(table)) == len(table), "a fixture has two rows"
    assert sorted(index) == on_disk, "INDEX.txt and the directory disagree"
    assert sorted(table) == sorted(index), "every recorded file needs exactly one row"
    for name in index:
        assert (recorded / f"{name}.source").is_file(), f"{name} has no .source note"
    for row in ROWS:
        assert row.path in API_OF_PATH, row
        if row.model is None:
            assert row.tokens is None and row.outcome is None and row.source is None, row
        else:
            assert row.outcome is not None and row.source is not None, row
            # Estimates are checked exactly where they are worked out by hand (units).
            assert row.tokens is not None or row.source == "estimated", row
            assert 200 <= row.status < 300, row
        if row.tokens is not None:
            inp, cached, write, out, reasoning, used = row.tokens
            assert used == inp + out and cached + write <= inp and reasoning <= out, row


@pytest.mark.parametrize(("row", "size"), _params())
async def test_a_recorded_file_is_metered_as_the_table_says(
    meter: tuple[Meter, Any], recorded: Path, row: Row, size: int
) -> None:
    addon, _ = meter
    file = recorded / row.fixture
    stream = is_stream(file)
    body = wire_body(file)
    flow = make_flow(row.path)
    if row.fixture in ASKED:
        flow.request.content, flow.request.headers["content-type"] = ASKED[row.fixture]

    sent = await run_flow(addon, flow, row.status, body, stream, size)

    # The client gets the upstream's bytes, unchanged (the request did not ask to stream, so
    # meter_stream_usage has nothing to inject or strip).
    assert sent == body
    assert flow.response is not None
    if not stream:
        assert flow.response.content == body

    # The downstream contract: the model of the billing consumer books it as it is, but for an
    # answer billed only in units flat pricing has no price for (an amount of 0): that one is
    # published for reconciliation, never dropped.
    envelopes = spooled(addon)
    zero = [env for env in envelopes if env["amount_micro_omr"] == 0]
    assert assert_contract(addon) == ["zero_amount"] * len(zero)
    if row.model is None:
        assert [env["metadata"] for env in envelopes] == [], "no envelope expected"
        reason = "non_2xx" if not 200 <= row.status < 300 else "upstream_error_without_usage"
        assert addon.stats.unmetered == {row.unmetered or reason: 1}
        return
    assert len(envelopes) == 1, f"expected one envelope, got {len(envelopes)}: {addon.status()}"
    [env] = envelopes
    meta = env["metadata"]

    expected: dict[str, Any] = {
        "model": row.model,
        "api": API_OF_PATH[row.path],
        "path": row.path.split("?", 1)[0],
        "status_code": row.status,
        "stream": stream,
        "outcome": row.outcome,
        "usage_source": row.source,
    }
    if row.tokens is not None:
        expected.update(zip(TOKEN_FIELDS, row.tokens, strict=True))
    expected.update(tokens_detail=row.detail, units=row.units, service_tier=row.tier)
    actual = {key: meta.get(key) for key in expected}
    assert actual == expected, row.fixture
    # Every integer a JSON integer, for the Go consumer.
    for part in (meta.get("tokens_detail") or {}, meta.get("units") or {}):
        assert all(
            (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str)
            for v in part.values()
        )

    # What any envelope must satisfy, estimated or not.
    counts = {key: meta[key] for key in TOKEN_FIELDS}
    assert all(isinstance(n, int) and n >= 0 for n in counts.values()), counts
    assert counts["tokens_used"] == counts["input_tokens"] + counts["output_tokens"], counts
    assert counts["cached_input_tokens"] + counts["cache_write_tokens"] <= counts["input_tokens"], (
        counts
    )
    assert counts["reasoning_tokens"] <= counts["output_tokens"], counts
    if row.tokens is None:
        assert counts["tokens_used"] > 0 and counts["output_tokens"] > 0, counts
    # Units without a price (flat pricing prices none) are counted, billed nothing.
    assert addon.stats.anomalies.get("unpriced", 0) == (1 if row.units else 0)

    # The seed's invariants: flat default price, reason from the model.
    assert env["amount_micro_omr"] == -(counts["tokens_used"] * FLAT_PRICE)
    assert env["amount_omr"] == env["amount_micro_omr"] / 1e6
    assert env["reason"] == "usage:newapi:" + row.model.lower()
    if row.source == "reported":
        assert isinstance(meta["usage_raw"], dict) and meta["usage_raw"], "usage_raw: verbatim"


@pytest.mark.parametrize(
    ("drop", "reason"),
    [(("x-customer-id",), "no_customer"), (("x-tenant-id",), "no_tenant")],
    ids=["no-customer", "no-tenant"],
)
@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.fixture)
async def test_a_recorded_answer_nobody_can_be_billed_for_goes_to_reconciliation(
    meter: tuple[Meter, Any], recorded: Path, row: Row, drop: tuple[str, ...], reason: str
) -> None:
    """Every recorded answer again, with an attribution the consumer cannot book: each
    envelope is on the unbillable subject, never on the billing one (assert_contract)."""
    addon, _ = meter
    file = recorded / row.fixture
    flow = make_flow(row.path)
    for header in drop:
        del flow.request.headers[header]
    await run_flow(addon, flow, row.status, wire_body(file), is_stream(file), 0)
    envelopes = spooled(addon)
    # An amount of 0 (units flat pricing has no price for) is that envelope's first fault.
    zero = [env for env in envelopes if env["amount_micro_omr"] == 0]
    expected = [] if row.model is None else ["zero_amount" if zero else reason]
    assert assert_contract(addon) == expected
    assert addon.stats.unbillable == ({(expected[0], "reconciliation"): 1} if expected else {})


# --- Realtime: a WebSocket session, one envelope per billed event -------------------------------

REALTIME = "openai-realtime-response-done.jsonl"
REALTIME_PATH = "/v1/realtime"
# Worked out from the file: session.updated names the input transcription model
# gpt-realtime-whisper; conversation.item.input_audio_transcription.completed reports usage
# {type: duration, seconds: 3}; response.done reports input 41 = text 14 + audio 27 (cached 0),
# output 164 = text 28 + audio 136, total 205, for session model gpt-realtime.
TRANSCRIBED: dict[str, Any] = {
    "api": "openai.realtime.transcription",
    "model": "gpt-realtime-whisper",
    "upstream_id": "item_E6U0xpLmn5e80rVGpEeKv",
    "outcome": "complete",
    "usage_source": "reported",
    "tokens_used": 0,
    "units": {"audio_ms": 3000},
    "tokens_detail": None,
}
RESPONDED: dict[str, Any] = {
    "api": "openai.realtime",
    "model": "gpt-realtime",
    "upstream_id": "resp_E6U0xfWhN878XBMhc0LKn",
    "outcome": "complete",
    "usage_source": "reported",
    "input_tokens": 41,
    "cached_input_tokens": 0,
    "output_tokens": 164,
    "tokens_used": 205,
    "units": None,
    "tokens_detail": {"input_text": 14, "input_audio": 27, "output_text": 28, "output_audio": 136},
}


async def _session(addon: Meter, events: list[bytes], client: tuple[bytes, ...] = ()) -> None:
    """Drive the addon's hooks over one Realtime session: the upgrade, then each server
    event as a WebSocket message, then the end of the session."""
    from mitmproxy import websocket
    from wsproto.frame_protocol import Opcode

    flow = upgraded(addon, f"{REALTIME_PATH}?model=gpt-realtime", {"x-customer-id": "cus_42"})
    assert flow.websocket is not None
    for data in client:
        flow.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, True, data))
        assert addon.websocket_message(flow) is None
    for data in events:
        flow.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, False, data))
        if (pending := addon.websocket_message(flow)) is not None:
            await pending
    if (pending := addon.websocket_end(flow)) is not None:
        await pending


def _checked(env: dict[str, Any], expected: dict[str, Any]) -> None:
    meta = env["metadata"]
    assert {key: meta.get(key) for key in expected} == expected
    assert (meta["path"], meta["status_code"], meta["stream"]) == (REALTIME_PATH, 101, True)
    assert env["customer_id"] == "cus_42"
    assert env["amount_micro_omr"] == -(meta["tokens_used"] * FLAT_PRICE)
    assert env["reason"] == "usage:newapi:" + meta["model"]


async def test_a_realtime_session_bills_each_response_and_transcription(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    events = (recorded / REALTIME).read_bytes().splitlines()

    await _session(addon, events)

    transcribed, responded = spooled(addon)
    _checked(transcribed, TRANSCRIBED)
    _checked(responded, RESPONDED)
    # Each billed event is an envelope of its own, with its own id.
    assert transcribed["metadata"]["request_id"] != responded["metadata"]["request_id"]
    assert addon.stats.metered == {
        ("openai.realtime.transcription", "complete", "reported"): 1,
        ("openai.realtime", "complete", "reported"): 1,
    }
    assert addon.sessions == {}


async def test_a_realtime_session_that_ends_mid_response_bills_it_as_cut_off(
    meter: tuple[Meter, Any], recorded: Path
) -> None:
    addon, _ = meter
    events = (recorded / REALTIME).read_bytes().splitlines()
    cut = [e for e in events if b'"response.done"' not in e]
    asked = b'{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Say hello to Marcelo, please."}]}}'

    await _session(addon, cut, (asked,))

    transcribed, aborted = spooled(addon)
    _checked(transcribed, TRANSCRIBED)
    meta = aborted["metadata"]
    for key in ("api", "model", "upstream_id"):
        assert meta[key] == RESPONDED[key], key
    assert (meta["outcome"], meta["usage_source"]) == ("client_aborted", "estimated")
    # Estimated, never free: the transcript streamed before the cut and the client's text.
    assert meta["input_tokens"] > 0 and meta["output_tokens"] > 0
