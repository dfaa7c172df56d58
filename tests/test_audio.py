from __future__ import annotations

import pytest

from edgemeter.metering.audio import duration_ms
from tests.corpus import wav


@pytest.mark.parametrize(("tenths", "ms"), [(25, 2500), (10, 1000), (71, 7100)])
def test_a_wav_upload_is_as_long_as_its_frames(tenths: int, ms: int) -> None:
    assert duration_ms(wav(tenths)) == ms


@pytest.mark.parametrize(
    "data",
    [b"", b"not audio at all", b"RIFF\xff\xff\xff\xffWAVEfmt ", b"ID3\x04\x00" + b"\xff" * 64],
    ids=["empty", "text", "broken-wav", "broken-mp3"],
)
def test_what_cannot_be_read_has_no_duration(data: bytes) -> None:
    assert duration_ms(data) is None
