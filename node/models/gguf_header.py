"""A fast reader of a GGUF file's header: metadata and tensor table, no weights.

The `gguf` package's reader builds numpy views of every metadata value, which takes ten seconds
for a 262k-token vocabulary; the node only needs sizes and a few scalars. This parser walks the
header over a memory map, skips long arrays without decoding them, and checks every length
against the bytes that remain, so a damaged or hostile file fails fast with `GgufFormatError`.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_KEEP_ARRAY_ITEMS = 1024  # longer arrays are kept as their length only
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class GgufFormatError(Exception):
    """The bytes are not a well-formed GGUF header."""


@dataclass(frozen=True)
class ArrayInfo:
    """An array too long to keep: its element type, length, and a digest of its bytes (two
    models share a vocabulary when their token arrays have the same digest)."""

    element_type: int
    length: int
    digest: str = ""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    n_bytes: int
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class GgufHeader:
    version: int
    fields: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int


def read_header(path: Path) -> GgufHeader:
    with path.open("rb") as handle:
        try:
            view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GgufFormatError("empty file") from None
    with view:
        return _Parser(view).header()


class _Parser:
    def __init__(self, data: mmap.mmap) -> None:
        self._data = data
        self._pos = 0

    def header(self) -> GgufHeader:
        if self._take(4) != _MAGIC:
            raise GgufFormatError("no GGUF magic")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise GgufFormatError(f"unsupported GGUF version {version}")
        tensor_count = self._count()
        kv_count = self._count()
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            fields[key] = self._value(self._scalar("<I"))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GgufFormatError(f"bad alignment {alignment!r}")
        data_offset = -(-self._pos // alignment) * alignment
        tensors = tuple(
            TensorInfo(name, type_name, size, data_offset + offset)
            for name, type_name, size, offset in infos
        )
        return GgufHeader(version, fields, tensors, data_offset)

    def _tensor_info(self) -> tuple[str, str, int, int]:
        name = self._string()
        dims = self._scalar("<I")
        if dims > 8:
            raise GgufFormatError(f"tensor {name} has {dims} dimensions")
        elements = 1
        for _ in range(dims):
            elements *= self._scalar("<Q")
        kind = self._scalar("<I")
        try:
            quant = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[quant]
        except (ValueError, KeyError):
            raise GgufFormatError(f"tensor {name} has unknown type {kind}") from None
        if elements % block:
            raise GgufFormatError(f"tensor {name} size is not a whole number of blocks")
        offset = self._scalar("<Q")
        return name, quant.name, elements // block * type_size, offset

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            return self._array()
        raise GgufFormatError(f"unknown metadata value type {kind}")

    def _array(self) -> list[Any] | ArrayInfo:
        element = self._scalar("<I")
        length = self._count()
        if length <= _KEEP_ARRAY_ITEMS:
            return [self._value(element) for _ in range(length)]
        start = self._pos
        if element in _SCALARS:
            self._take(length * struct.calcsize(_SCALARS[element]))
        elif element == _STRING:
            self._skip_strings(length)
        else:
            raise GgufFormatError(f"long array of type {element} is not supported")
        digest = hashlib.blake2b(self._data[start : self._pos], digest_size=16).hexdigest()
        return ArrayInfo(element, length, digest)

    def _skip_strings(self, count: int) -> None:
        """Steps over `count` strings without reading them: a vocabulary has 100,000s, and
        every node start reads the header of each model it offers."""
        data, position, end = self._data, self._pos, len(self._data)
        for _ in range(count):
            if position + 8 > end:
                raise GgufFormatError("the header runs past the end of the file")
            position += 8 + _U64.unpack_from(data, position)[0]
        if position > end:
            raise GgufFormatError("the header runs past the end of the file")
        self._pos = position

    def _string(self) -> str:
        return self._take(self._count()).decode("utf-8", errors="replace")

    def _count(self) -> int:
        """A u64 length or count; never more than the bytes left, as each item takes one."""
        value: int = self._scalar("<Q")
        if value > len(self._data) - self._pos:
            raise GgufFormatError(f"length {value} runs past the end of the file")
        return value

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))[0]

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise GgufFormatError("the header runs past the end of the file")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk
