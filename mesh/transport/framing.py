"""Length-prefixed frames on a mesh stream, with the size limit checked before any allocation."""

from __future__ import annotations

import struct

import trio

from ..records import MAX_FRAME_BYTES
from .seam import MeshStream, TransportError

_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent a frame over the limit or closed mid-frame."""


async def send_frame(stream: MeshStream, payload: bytes) -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    await stream.send_all(_HEADER.pack(len(payload)) + payload)


async def receive_frame(stream: MeshStream, timeout_s: float = 10.0) -> bytes:
    """One frame; `FrameError` on an oversized or cut frame, `TransportError` on timeout."""
    with trio.move_on_after(timeout_s) as scope:
        (size,) = _HEADER.unpack(await _exactly(stream, _HEADER.size))
        if size > MAX_FRAME_BYTES:
            raise FrameError(f"peer announced a frame of {size} bytes (limit {MAX_FRAME_BYTES})")
        return await _exactly(stream, size)
    assert scope.cancelled_caught
    raise TransportError(f"no frame from {stream.remote_peer} within {timeout_s} s")


async def _exactly(stream: MeshStream, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = await stream.receive_some(size - len(buffer))
        if not chunk:
            raise FrameError("stream closed in the middle of a frame")
        buffer += chunk
    return bytes(buffer)
