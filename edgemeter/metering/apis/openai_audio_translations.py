"""OpenAI audio translations (`/audio/translations`, whisper-1): a transcription's formats,
and an answer with no usage at all, billed on the uploaded file's length (marked estimated)."""

from __future__ import annotations

from edgemeter.metering.apis.openai_audio_transcriptions import OpenAIAudioTranscriptions


class OpenAIAudioTranslations(OpenAIAudioTranscriptions):
    api = "openai.audio.translations"
    suffixes = ("/audio/translations",)


SHAPE = OpenAIAudioTranslations()
