"""Incremental Content-Encoding decoders (gzip, deflate, br, zstd) for parsing a stream on the
side while the client still gets the encoded bytes untouched.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

Decode = Callable[[bytes], bytes]


class UnsupportedEncoding(ValueError):
    """An encoding (or a chain of them) the meter cannot decode."""


def _zlib(wbits: int) -> Decode:
    return zlib.decompressobj(wbits).decompress


def _deflate() -> Decode:
    # HTTP's "deflate" is zlib-wrapped, but some servers send raw deflate: decide on the first
    # two bytes (a zlib header is recognisable by its CMF/FLG checksum), held until both came.
    state: list[Decode] = []
    head = bytearray()

    def decode(data: bytes) -> bytes:
        if not state:
            head.extend(data)
            if len(head) < 2:
                return b""
            is_zlib = (head[0] & 0x0F) == 8 and (head[0] << 8 | head[1]) % 31 == 0
            state.append(_zlib(zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS))
            data = bytes(head)
        return state[0](data)

    return decode


def _brotli() -> Decode:
    return brotli.Decompressor().process  # type: ignore[no-any-return]


def _zstd() -> Decode:
    return zstandard.ZstdDecompressor().decompressobj().decompress


_FACTORIES: dict[str, Callable[[], Decode]] = {
    "gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decoder_for(content_encoding: str) -> Decode | None:
    """A fresh incremental decoder, None for identity; raises UnsupportedEncoding otherwise."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    factory = _FACTORIES.get(encoding)
    if factory is None:
        raise UnsupportedEncoding(encoding)
    return factory()
