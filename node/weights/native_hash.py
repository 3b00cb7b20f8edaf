"""FNV-1a (64-bit) at native speed: the hash that names llama.cpp's RPC weight cache entries.

FNV-1a walks the bytes one at a time, so a Python loop would take minutes per gigabyte. A few
lines of C, compiled once per machine with the compiler the engine build already needs, hash
about a gigabyte per second; ctypes calls them on memory-mapped tensors without copying.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TypeAlias

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
    """No C compiler to build the hash function (the message says what to install)."""


def fnv1a64_python(data: bytes, start: int = FNV_OFFSET_BASIS) -> int:
    """The reference definition, for tests and tiny inputs."""
    value = start
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


class NativeFnv:
    """The compiled hash function, loaded from the per-machine cache (built on first use)."""

    def __init__(self, cache_dir: Path) -> None:
        library = _built_library(cache_dir)
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


def _built_library(cache_dir: Path) -> Path:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    target = cache_dir / "native" / f"fnv1a-{digest}-{platform.machine()}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeHashUnavailable(
            "no C compiler found to build the weight-cache hash (install gcc or clang)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "fnv1a.c"
        source.write_text(_SOURCE)
        built = Path(work) / target.name
        command = [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativeHashUnavailable(f"building the weight-cache hash failed: {done.stderr}")
        os.replace(built, target)  # atomic: a concurrent build just wins the same name
    return target
