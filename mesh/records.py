"""Wire encoding of signed records: msgpack with a fixed shape per record kind and size limits.

Every record is a msgpack array `[kind, version, field...]`. Decoding checks the size before
parsing, then the exact shape and types, so bytes from the network become either a well-formed
record or a `RecordError` — never a crash or an unbounded allocation. Signatures cover a
domain-separated encoding, so a signature made for one kind of record never verifies as another.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import msgpack

FORMAT_VERSION = 1
MAX_PEER_ID_CHARS = 128
_PEER_ID_ALPHABET = frozenset(string.ascii_letters + string.digits)
MAX_RECORD_BYTES = 64 * 1024
MAX_FRAME_BYTES = 1024 * 1024  # one message on a mesh stream (a frame), whatever it holds
_DOMAIN = b"sharedllm-record-v1:"


class RecordError(Exception):
    """Bytes that are not a valid record of the expected kind (a remote, not a local, fault)."""


def encode(kind: str, fields: Sequence[Any]) -> bytes:
    packed: bytes = msgpack.packb([kind, FORMAT_VERSION, *fields], use_bin_type=True)
    return packed


def signing_bytes(kind: str, fields: Sequence[Any]) -> bytes:
    """What a signature over a record covers: a domain tag, then the unsigned record."""
    return _DOMAIN + encode(kind, fields)


def decode(
    data: bytes,
    kind: str,
    types: Sequence[type | tuple[type, ...]],
    *,
    max_bytes: int = MAX_RECORD_BYTES,
    max_items: int = 4096,
) -> list[Any]:
    """The fields of a record of `kind`, checked against `types` one by one. Records that list
    every member (digests, exchanges) pass larger, still fixed, limits."""
    if len(data) > max_bytes:
        raise RecordError(f"{kind} record of {len(data)} bytes exceeds {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=max_items,
            max_map_len=max_items,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as err:
        raise RecordError(f"{kind} record is not valid msgpack ({type(err).__name__})") from None
    if not isinstance(value, list) or len(value) != 2 + len(types):
        raise RecordError(f"{kind} record has the wrong shape")
    if value[0] != kind or value[1] != FORMAT_VERSION:
        raise RecordError(f"expected a {kind} record (version {FORMAT_VERSION})")
    fields = value[2:]
    for index, (field, expected) in enumerate(zip(fields, types, strict=True)):
        if isinstance(field, bool) and expected is not bool:
            raise RecordError(f"{kind} record field {index} has the wrong type")
        if not isinstance(field, expected):
            raise RecordError(f"{kind} record field {index} has the wrong type")
    return fields


def string_list(value: Any, what: str, limit: int = 64) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > limit
        or not all(isinstance(v, str) for v in value)
    ):
        raise RecordError(f"{what} must be a list of at most {limit} strings")
    return tuple(value)


def check_peer_id_text(value: str) -> str:
    """A peer id's text as it travels: base58, bounded. (Whether it names a real key is
    checked where that matters.)"""
    if not value or len(value) > MAX_PEER_ID_CHARS or not set(value) <= _PEER_ID_ALPHABET:
        raise RecordError("not a peer id")
    return value
