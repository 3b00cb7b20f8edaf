"""FNV-1a (64-bit) at native speed: the hash that names llama.cpp's RPC weight cache entries.

FNV-1a walks the bytes one at a time, so a Python loop would take minutes per gigabyte. A few
lines of C, compiled once per machine with the compiler the engine build already needs, hash
about a gigabyte per second; ctypes calls them on memory-mapped tensors without copying.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import TypeAlias

from ..engine.native_build import NativeBuildFailed, built_library

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

_SOURCE = """
#include <stddef.h>
#include <stdint.h>

uint64_t sharedllm_fnv1a64(const unsigned char *data, size_t length, uint64_t hash) {
    for (size_t i = 0; i < length; i++) {
        hash ^= data[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}
"""


class NativeHashUnavailable(Exception):
    """The hash function could not be built (the message says what to install)."""


def fnv1a64_python(data: bytes, start: int = FNV_OFFSET_BASIS) -> int:
    """The reference definition, for tests and tiny inputs."""
    value = start
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


class NativeFnv:
    """The compiled hash function, loaded from the per-machine cache (built on first use)."""

    def __init__(self, cache_dir: Path) -> None:
        try:
            library = built_library(cache_dir, "fnv1a", _SOURCE, purpose="the weight-cache hash")
        except NativeBuildFailed as err:
            raise NativeHashUnavailable(str(err)) from None
        self._function = ctypes.CDLL(str(library)).sharedllm_fnv1a64
        self._function.restype = ctypes.c_uint64
        self._function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64)

    def hash(self, data: Buffer, start: int = FNV_OFFSET_BASIS) -> int:
        """FNV-1a-64 of `data`. Large inputs should be writable buffers (a file mapped with
        `mmap.ACCESS_COPY` is, without copying anything): read-only ones are copied first."""
        view = memoryview(data).cast("B")
        if len(view) == 0:
            return start
        if view.readonly:
            view = memoryview(bytearray(view))
        pointer = ctypes.c_char.from_buffer(view)
        try:
            return int(self._function(ctypes.addressof(pointer), len(view), start))
        finally:
            del pointer  # release the buffer export so that the caller can close its map
