"""OpenAI audio transcriptions (`/audio/transcriptions`): tokens (gpt-4o-transcribe) or a duration
(whisper-1); an answer that says neither is billed on the upload's length, marked estimated.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgemeter.errors import InvalidUsage
from edgemeter.metering import estimate
from edgemeter.metering.apis.shape import Asked, Form, TypedEvents
from edgemeter.metering.audio import duration_ms
from edgemeter.metering.multipart import upload
from edgemeter.metering.usage import (
    Usage,
    bounded,
    count,
    detail,
    modalities,
    seconds_ms,
)

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

TRANSCRIPTION_COUNTS = frozenset({"input_tokens", "output_tokens", "total_tokens", "seconds"})
# The event that ends a transcription stream, with its usage.
FINAL_EVENTS = frozenset({"transcript.text.done"})


def normalize_transcription(usage: dict[str, Any]) -> Usage:
    """`{"type": "tokens", input_tokens, input_token_details {text_tokens, audio_tokens},
    output_tokens}` (gpt-4o-transcribe), or `{"type": "duration", "seconds": 7}` (whisper-1,
    billed per second of audio: units.audio_ms, no tokens)."""
    if usage.get("type") == "duration" or ("seconds" in usage and "input_tokens" not in usage):
        return Usage(raw=usage, units={"audio_ms": seconds_ms(usage.get("seconds"))})
    inp = count(usage, "input_tokens")
    out = max(count(usage, "output_tokens"), count(usage, "total_tokens") - inp)
    return bounded(
        Usage(
            input_tokens=inp,
            output_tokens=out,
            raw=usage,
            detail=detail(**modalities(usage.get("input_token_details"), "input")),
        )
    )


class OpenAIAudioTranscriptions(Form, TypedEvents):
    api = "openai.audio.transcriptions"
    final_events = FINAL_EVENTS
    suffixes = ("/audio/transcriptions",)
    text = "responses"  # streamed text comes in transcript.text.delta's `delta`
    asks = True
    counts = TRANSCRIPTION_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_transcription(usage)

    def body(self, ex: Extraction, obj: dict[str, Any]) -> None:
        super().body(ex, obj)
        if ex.usage is None and "duration" in obj and not ex.invalid:
            # verbose_json says how long the audio was (what whisper bills), beside no usage.
            raw = {"duration": obj["duration"]}
            try:
                ex.usage = Usage(raw=raw, units={"audio_ms": seconds_ms(raw["duration"])})
            except InvalidUsage as e:
                ex.invalid = str(e)
        if ex.usage is None and isinstance(text := obj.get("text"), str):
            ex.output_chars += len(text)

    def other_body(self, ex: Extraction, content: bytes, content_type: str) -> None:
        # response_format text, srt or vtt: the transcript itself.
        ex.output_chars += len(content.decode("utf-8", "replace"))

    def settle(
        self, ex: Extraction, usage: Usage, asked: Asked, model: str, *, reported: bool
    ) -> Usage:
        usage = super().settle(ex, usage, asked, model, reported=reported)
        if reported:
            return usage
        ms = duration_ms(upload(asked.body, asked.content_type) or b"")
        if ms is None:
            ms = estimate.speech_ms(ex.output_chars)
        return replace(usage, units={**usage.units, "audio_ms": ms})


SHAPE = OpenAIAudioTranscriptions()
