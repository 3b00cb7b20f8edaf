"""The Python path's tunnel chunks: each direction one zstd stream, flushed at every chunk;
large chunks that do not compress go as they are. A chunk may expand to at most `MAX_CHUNK`
bytes (what one local read gives the sender), so no peer can make us inflate more than that."""

from __future__ import annotations

from typing import IO, cast

import zstandard

from .framing import FrameError

MAX_CHUNK = 256 * 1024  # bytes of one local read, and the most a wire chunk may inflate to
# A compressed chunk of data that does not compress is a little larger than the data itself.
MAX_WIRE_CHUNK = MAX_CHUNK + MAX_CHUNK // 64
HEADER = 4

_RAW, _ZSTD = b"\x00", b"\x01"  # the first byte of every wire chunk says which it is
_SAMPLE = 4096
_POOR_RATIO = 0.9


class Packer:
    """One direction's zstd stream, flushed per chunk so the far side can act on it at once.

    A large chunk whose sample does not compress (weights at load, mostly) goes as it is, so
    loads do not pay for compressing what cannot shrink; the stream carries on with the rest.
    """

    def __init__(self) -> None:
        self._stream = zstandard.ZstdCompressor(level=1).compressobj()
        self._probe = zstandard.ZstdCompressor(level=1)

    def pack(self, data: bytes) -> bytes:
        if len(data) > 2 * _SAMPLE:
            middle = len(data) // 2
            sample = data[middle : middle + _SAMPLE]
            if len(self._probe.compress(sample)) > _POOR_RATIO * _SAMPLE:
                return _RAW + data
        compressed = self._stream.compress(data)
        return _ZSTD + compressed + self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class Unpacker:
    """The far end of a `Packer`: each chunk inflates to at most `MAX_CHUNK` bytes."""

    def __init__(self) -> None:
        self._out = bytearray()
        sink = cast(IO[bytes], self)  # the decompressor only calls write()
        # Output space for a whole chunk: with less, the rest of a chunk would wait inside the
        # decompressor for the next chunk's input.
        self._stream = zstandard.ZstdDecompressor().stream_writer(
            sink, write_size=2 * MAX_CHUNK, write_return_read=True
        )

    def write(self, data: bytes) -> int:
        """The decompressor's sink (not for callers)."""
        if len(self._out) + len(data) > MAX_CHUNK:
            raise FrameError(f"a tunnel chunk inflates to over {MAX_CHUNK} bytes")
        self._out += data
        return len(data)

    def unpack(self, data: bytes) -> bytes:
        kind, payload = data[:1], data[1:]
        if kind == _RAW and len(payload) <= MAX_CHUNK:
            return payload
        if kind != _ZSTD:
            raise FrameError("a tunnel chunk is neither plain nor compressed, or is too large")
        self._out = bytearray()
        try:
            self._stream.write(payload)
        except zstandard.ZstdError as err:
            raise FrameError(f"a tunnel chunk does not decompress: {err}") from None
        return bytes(self._out)


class ChunkDecoder:
    """Splits a byte stream into tunnel chunks (sans-I/O); `None` in the output marks the end."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> list[bytes | None]:
        if self.ended and data:
            raise FrameError("data after the end of a tunnel direction")
        self._buffer += data
        found: list[bytes | None] = []
        while len(self._buffer) >= HEADER and not self.ended:
            size = int.from_bytes(self._buffer[:HEADER], "big")
            if size > MAX_WIRE_CHUNK:
                raise FrameError(f"tunnel chunk of {size} bytes is over {MAX_WIRE_CHUNK}")
            if len(self._buffer) < HEADER + size:
                break
            chunk = bytes(self._buffer[HEADER : HEADER + size])
            del self._buffer[: HEADER + size]
            if size == 0:
                self.ended = True
                found.append(None)
                if self._buffer:
                    raise FrameError("data after the end of a tunnel direction")
            else:
                found.append(chunk)
        return found


def encode_chunk(data: bytes) -> bytes:
    return len(data).to_bytes(HEADER, "big") + data
