"""How long an uploaded audio file plays, read from its own headers with mutagen (MP3, MP4/M4A,
Ogg, FLAC, WAV, ...): what whisper bills when its answer does not say.
"""

from __future__ import annotations

import io
import logging
import math

logger = logging.getLogger(__name__)

# Whisper takes files up to 25 MB; no upload plays for more than a day.
MAX_DURATION_MS = 24 * 3600 * 1000


def duration_ms(data: bytes) -> int | None:
    """Milliseconds of audio in `data` (rounded up: a started millisecond is billed), None when
    mutagen does not recognise the format (WebM) or the file is broken. Never raises."""
    if not data:
        return None
    # Imported on first use: only the audio routes need it, and it costs ~20 ms to import.
    import mutagen

    try:
        found = mutagen.File(io.BytesIO(data))
        length = getattr(getattr(found, "info", None), "length", None)
    except Exception as e:  # mutagen raises many kinds on hostile files: none may escape
        logger.debug(f"audio duration unreadable: {type(e).__name__}: {e}")
        return None
    if isinstance(length, bool) or not isinstance(length, int | float):
        return None
    if not 0 < length <= MAX_DURATION_MS / 1000:  # also NaN and infinities
        return None
    return math.ceil(length * 1000)
