"""OpenAI speech (`/audio/speech`): an audio answer with no usage, billed on the characters of
the request's `input` (marked estimated); `stream_format: sse` reports usage at speech.audio.done.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgemeter.metering import estimate
from edgemeter.metering.apis.shape import Asked, TypedEvents
from edgemeter.metering.usage import Usage, bounded, count, detail, json_object

if TYPE_CHECKING:
    from edgemeter.metering.extraction import Extraction

SPEECH_COUNTS = frozenset({"input_tokens", "output_tokens", "total_tokens"})
FINAL_EVENTS = frozenset({"speech.audio.done"})


def normalize_speech(usage: dict[str, Any]) -> Usage:
    """gpt-4o-mini-tts: input tokens are the text read, output tokens the audio made."""
    inp = count(usage, "input_tokens")
    out = max(count(usage, "output_tokens"), count(usage, "total_tokens") - inp)
    return bounded(
        Usage(
            input_tokens=inp,
            output_tokens=out,
            raw=usage,
            detail=detail(input_text=inp, output_audio=out),
        )
    )


def spoken(asked: Asked) -> str:
    """The text the request asks to be spoken (`input`), "" if none."""
    if b'"input"' not in asked.body:
        return ""
    obj = json_object(asked.body)
    text = obj.get("input") if obj is not None else None
    return text if isinstance(text, str) else ""


class OpenAIAudioSpeech(TypedEvents):
    api = "openai.audio.speech"
    final_events = FINAL_EVENTS
    suffixes = ("/audio/speech",)
    produces_output = False  # an estimate bills the characters, not output tokens
    counts = SPEECH_COUNTS

    def normalize(self, usage: dict[str, Any], *, anthropic_counts: bool = False) -> Usage:
        return normalize_speech(usage)

    def estimate_input(self, asked: Asked) -> int:
        return estimate.tokens(len(spoken(asked)))

    def settle(
        self, ex: Extraction, usage: Usage, asked: Asked, model: str, *, reported: bool
    ) -> Usage:
        usage = super().settle(ex, usage, asked, model, reported=reported)
        if reported:
            return usage
        # tts-1 bills per million characters; an estimate says how many were spoken.
        return replace(usage, units={**usage.units, "characters": len(spoken(asked))})


SHAPE = OpenAIAudioSpeech()
