"""Incremental Content-Encoding decoders (gzip, deflate, br, zstd) whose output is bounded, for
parsing a body on the side while the client still gets the encoded bytes untouched.

A decoder yields its output in pieces of about `PIECE` bytes, so a compression bomb never sits in
memory whole, and stops with `DecompressionLimit` once the output outgrows `MAX_RATIO` times the
input (plus `SLACK`): past that it is a bomb, not an answer, and decoding it would only cost CPU.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import IO, cast

import brotli
import zstandard

from edgemeter.errors import (
    BodyTooLarge,
    CorruptEncoding,
    DecodeError,
    DecompressionLimit,
    UnsupportedEncoding,
)

# Most decoded bytes produced at once by zlib and brotli (zstd: see _zstd).
PIECE = 64 * 1024
# Recorded provider streams compress 13-70x (brotli, whole body); a stream compressed with a flush
# per event stays far below that. gzip's own ceiling is about 1030x, brotli's and zstd's far above.
MAX_RATIO = 200
# Decoded bytes always allowed on top of the ratio: the first bytes of a stream compress best.
SLACK = 1024 * 1024
# RFC 9659: HTTP zstd senders keep their window within 8 MB; a larger one only costs memory.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
# Input handed to zstd at once: its output per call is not bounded, only checked (see _zstd).
_ZSTD_STEP = 4096


class Decoder:
    """One body's incremental decoder: `feed` yields decoded pieces and raises
    `DecompressionLimit` (before yielding the piece that crosses it) once output outgrows
    `ratio` times the input consumed so far plus `slack`."""

    __slots__ = ("_in", "_out", "_pieces", "_ratio", "_slack", "encoding")

    def __init__(self, encoding: str, pieces: Pieces, ratio: int, slack: int) -> None:
        self.encoding = encoding
        self._pieces = pieces
        self._ratio = ratio
        self._slack = slack
        self._in = 0
        self._out = 0

    @property
    def decoded(self) -> int:
        return self._out

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            for piece in self._pieces(data, self):
                if piece:
                    yield piece
        except DecodeError:
            raise
        except Exception as e:  # zlib.error, brotli.error, zstandard.ZstdError: all just corrupt
            raise CorruptEncoding("not valid " + self.encoding, error=str(e)[:200]) from None

    # Called by the codecs below: input is counted as the codec consumes it, so a bomb inside
    # one large chunk is caught after its first few pieces, not after ratio times the chunk.
    def _consumed(self, n: int) -> None:
        self._in += n

    def _produced(self, piece: bytes) -> None:
        self._out += len(piece)
        if self._out > self._in * self._ratio + self._slack:
            raise DecompressionLimit(
                "decoded output exceeds its bound", encoded=self._in, decoded=self._out
            )


Pieces = Callable[[bytes, Decoder], Iterator[bytes]]


def _zlib(wbits: int) -> Pieces:
    d = zlib.decompressobj(wbits)

    def pieces(data: bytes, acc: Decoder) -> Iterator[bytes]:
        while True:
            out = d.decompress(data, PIECE)
            tail = d.unconsumed_tail
            acc._consumed(len(data) - len(tail))
            acc._produced(out)
            yield out
            data = tail
            # A full piece may leave output pending inside zlib even when all input is used.
            if not data and len(out) < PIECE:
                return

    return pieces


def _deflate() -> Pieces:
    # HTTP's "deflate" is zlib-wrapped, but some servers send raw deflate: decide on the first
    # two bytes (a zlib header is recognisable by its CMF/FLG checksum), held until both came.
    state: list[Pieces] = []
    head = bytearray()

    def pieces(data: bytes, acc: Decoder) -> Iterator[bytes]:
        if not state:
            head.extend(data)
            if len(head) < 2:
                return
            is_zlib = (head[0] & 0x0F) == 8 and (head[0] << 8 | head[1]) % 31 == 0
            state.append(_zlib(zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS))
            data = bytes(head)
        yield from state[0](data, acc)

    return pieces


def _brotli() -> Pieces:
    d = brotli.Decompressor()

    def pieces(data: bytes, acc: Decoder) -> Iterator[bytes]:
        # Brotli takes all input at once and goes on producing output from it (a few bytes can
        # stand for megabytes): drain with empty input until nothing more comes.
        out = d.process(data, output_buffer_limit=PIECE)
        acc._consumed(len(data))
        while out:
            acc._produced(out)
            yield out
            out = d.process(b"", output_buffer_limit=PIECE)

    return pieces


def _zstd() -> Pieces:
    # zstandard's decompressobj has no output limit; its stream_writer hands output to a sink in
    # pieces as it is produced, and the sink's check raises out of it as soon as it is too much.
    out: list[bytes] = []
    accs: list[Decoder] = []

    class Sink:
        def write(self, piece: bytes) -> int:
            accs[0]._produced(piece)
            out.append(piece)
            return len(piece)

    writer = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
        cast(IO[bytes], Sink()), write_size=PIECE
    )

    def pieces(data: bytes, acc: Decoder) -> Iterator[bytes]:
        accs[:] = [acc]
        for i in range(0, len(data), _ZSTD_STEP):
            step = data[i : i + _ZSTD_STEP]
            acc._consumed(len(step))
            writer.write(step)
            yield from out
            out.clear()

    return pieces


_FACTORIES: dict[str, Callable[[], Pieces]] = {
    "gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decoder_for(
    content_encoding: str, *, ratio: int = MAX_RATIO, slack: int = SLACK
) -> Decoder | None:
    """A fresh incremental decoder, None for identity; raises UnsupportedEncoding otherwise."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    factory = _FACTORIES.get(encoding)
    if factory is None:
        raise UnsupportedEncoding("unsupported content-encoding", encoding=encoding[:100])
    return Decoder(encoding, factory(), ratio, slack)


def decode_body(raw: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """A whole body decoded, if it decodes to at most `max_bytes`; raises a DecodeError (never
    holds more than `max_bytes` plus one piece)."""
    decoder = decoder_for(content_encoding)
    if decoder is None:
        if len(raw) > max_bytes:
            raise BodyTooLarge("body too large to parse", size=len(raw), limit=max_bytes)
        return raw
    out = bytearray()
    for piece in decoder.feed(raw):
        out += piece
        if len(out) > max_bytes:
            raise BodyTooLarge("decoded body too large to parse", limit=max_bytes)
    return bytes(out)


def body_tail(raw: bytes, content_encoding: str, size: int, max_decoded: int) -> bytes:
    """The last `size` decoded bytes of a body, decoding at most `max_decoded` bytes on the way
    (BodyTooLarge past that); memory stays within `size` plus one piece."""
    decoder = decoder_for(content_encoding)
    if decoder is None:
        return raw[-size:]
    tail = bytearray()
    for piece in decoder.feed(raw):
        tail += piece
        if len(tail) > size:
            del tail[: len(tail) - size]
        if decoder.decoded > max_decoded:
            raise BodyTooLarge("decoded body too large to scan", limit=max_decoded)
    return bytes(tail)
