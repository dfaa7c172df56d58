from __future__ import annotations

import functools
import gzip
import itertools
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemeter.errors import BodyTooLarge, CorruptEncoding, DecompressionLimit, UnsupportedEncoding
from edgemeter.metering.decoding import (
    MAX_RATIO,
    PIECE,
    SLACK,
    body_tail,
    decode_body,
    decoder_for,
)

BOMB_BYTES = 64 * 1024 * 1024


def zeros(n: int) -> list[bytes]:
    block = b"\0" * (1024 * 1024)
    return [block] * (n // len(block))


def _gzip_stream(blocks: list[bytes]) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(c.compress(b) for b in blocks), c.flush()])


def _deflate_stream(blocks: list[bytes]) -> bytes:
    c = zlib.compressobj(6)
    return b"".join([*(c.compress(b) for b in blocks), c.flush()])


def _brotli_stream(blocks: list[bytes]) -> bytes:
    c = brotli.Compressor(quality=1)
    return b"".join([*(c.process(b) for b in blocks), c.finish()])


def _zstd_stream(blocks: list[bytes]) -> bytes:
    c = zstandard.ZstdCompressor().compressobj()
    return b"".join([*(c.compress(b) for b in blocks), c.flush()])


COMPRESS: dict[str, Callable[[list[bytes]], bytes]] = {
    "gzip": _gzip_stream,
    "deflate": _deflate_stream,
    "br": _brotli_stream,
    "zstd": _zstd_stream,
}


@functools.cache
def bomb(encoding: str) -> bytes:
    """64 MiB of zeros: about 64 KB in gzip, a few KB in br and zstd."""
    return COMPRESS[encoding](zeros(BOMB_BYTES))


def decode_all(encoding: str, chunks: list[bytes]) -> bytes:
    decoder = decoder_for(encoding)
    assert decoder is not None
    return b"".join(piece for chunk in chunks for piece in decoder.feed(chunk))


BODY = b"".join(b'data: {"n":%d,"text":"caf\xc3\xa9"}\n\n' % i for i in range(3000))


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_body_decodes_whole_in_bounded_pieces(encoding: str) -> None:
    decoder = decoder_for(encoding)
    assert decoder is not None
    pieces = list(decoder.feed(COMPRESS[encoding]([BODY])))
    assert b"".join(pieces) == BODY
    assert max(len(p) for p in pieces) <= 2 * PIECE


@settings(max_examples=40, deadline=None)
@given(
    encoding=st.sampled_from(sorted(COMPRESS)),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_split_of_the_encoded_bytes_decodes_the_same(encoding: str, cuts: list[int]) -> None:
    wire = COMPRESS[encoding]([BODY])
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    assert decode_all(encoding, [wire[a:b] for a, b in itertools.pairwise(points)]) == BODY


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_bomb_stops_at_the_ratio_with_memory_of_a_few_pieces(encoding: str) -> None:
    wire = bomb(encoding)
    decoder = decoder_for(encoding)
    assert decoder is not None
    decoded = 0
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionLimit):
            for piece in decoder.feed(wire):
                decoded += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded <= len(wire) * MAX_RATIO + SLACK < BOMB_BYTES
    print(f"{encoding}: {len(wire)} B bomb, {decoded} B decoded, peak {peak / 2**20:.1f} MiB")
    # zstd hands its output over per input step, zlib and brotli a piece at a time.
    assert peak < 8 * 1024 * 1024


def test_a_gzip_bomb_fed_in_small_chunks_also_stops() -> None:
    wire = bomb("gzip")
    decoder = decoder_for("gzip")
    assert decoder is not None
    with pytest.raises(DecompressionLimit) as e:
        for i in range(0, len(wire), 16 * 1024):
            for _ in decoder.feed(wire[i : i + 16 * 1024]):
                pass
    decoded, encoded = e.value.fields["decoded"], e.value.fields["encoded"]
    assert isinstance(decoded, int) and isinstance(encoded, int)
    assert decoded <= encoded * MAX_RATIO + SLACK + PIECE


def test_a_zstd_frame_asking_for_a_huge_window_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters(window_log=27)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    wire = c.compress(b"x" * 1000) + c.flush()
    with pytest.raises(CorruptEncoding):
        decode_all("zstd", [wire])


@pytest.mark.parametrize(
    ("encoding", "data"),
    [("gzip", b"not gzip at all"), ("br", b"\xff" * 20), ("zstd", b"not zstd at all!")],
)
def test_corrupt_bytes_raise_one_error(encoding: str, data: bytes) -> None:
    with pytest.raises(CorruptEncoding):
        decode_all(encoding, [data])


@pytest.mark.parametrize("encoding", ["gzip, br", "compress", "x-unknown"])
def test_unsupported_encodings_are_refused(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding):
        decoder_for(encoding)


@pytest.mark.parametrize("encoding", ["", "identity", " Identity "])
def test_identity_needs_no_decoder(encoding: str) -> None:
    assert decoder_for(encoding) is None


def test_raw_deflate_is_read_too() -> None:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert decode_all("deflate", [c.compress(BODY) + c.flush()]) == BODY


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_a_body_within_the_limit_is_decoded(encoding: str) -> None:
    raw = gzip.compress(BODY) if encoding else BODY
    assert decode_body(raw, encoding, len(BODY)) == BODY


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_a_body_over_the_limit_is_refused(encoding: str) -> None:
    raw = gzip.compress(BODY) if encoding else BODY
    with pytest.raises(BodyTooLarge):
        decode_body(raw, encoding, len(BODY) - 1)


@pytest.mark.parametrize("encoding", ["", "gzip", "br"])
def test_the_tail_of_a_body_is_its_last_bytes(encoding: str) -> None:
    raw = COMPRESS[encoding]([BODY]) if encoding else BODY
    assert body_tail(raw, encoding, 1000, len(BODY)) == BODY[-1000:]


def test_reaching_the_tail_decodes_no_more_than_allowed() -> None:
    with pytest.raises(BodyTooLarge):
        body_tail(gzip.compress(BODY), "gzip", 1000, len(BODY) // 2)
