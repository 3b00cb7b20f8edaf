"""The Python path of a tunnel: each direction a sequence of chunks, each a 4-byte length and
that many bytes, zstd-packed (tunnel_codec.py); a zero-length chunk ends its direction (TCP
half-close). It carries tunnels over the control connection and to peers without the native
relay. A broken side closes the other at once."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .framing import FrameError
from .seam import MeshStream, TransportError
from .tunnel_codec import (
    HEADER,
    MAX_CHUNK,
    MAX_WIRE_CHUNK,
    ChunkDecoder,
    Packer,
    Unpacker,
    encode_chunk,
)
from .tunnel_stats import TunnelStats

_CLOSE_S = 2.0
_log = logging.getLogger("sharedllm.mesh.tunnel")

Watch = Callable[[bytes], None]


async def splice(
    local: trio.SocketStream,
    remote: MeshStream,
    stats: TunnelStats,
    outward: bool,
    watch: Watch | None = None,
) -> None:
    """Copies both ways until both ends have finished; a failure on either side closes both.

    `outward` is True on the side that opened the tunnel: its local bytes count as "out".
    `watch` sees every local byte sent to the far side, in order (to count what crosses).
    """
    sign = 1 if outward else -1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_local_to_remote, local, remote, stats, sign, watch)
            nursery.start_soon(_remote_to_local, remote, local, stats, -sign)
    except* (TransportError, FrameError, trio.BrokenResourceError, OSError) as group:
        _log.debug("tunnel to %s closed: %s", remote.remote_peer, group.exceptions[0])
    finally:
        await close_both(local, remote)


async def _local_to_remote(
    local: trio.SocketStream,
    remote: MeshStream,
    stats: TunnelStats,
    direction: int,
    watch: Watch | None,
) -> None:
    packer = Packer()
    while data := await local.receive_some(MAX_CHUNK):
        chunk = bytes(data)
        if watch is not None:
            watch(chunk)
        packed = packer.pack(chunk)
        stats.count(direction, len(chunk), len(packed))
        await remote.send_all(encode_chunk(packed))
    await remote.send_all(encode_chunk(b""))


async def _remote_to_local(
    remote: MeshStream, local: trio.SocketStream, stats: TunnelStats, direction: int
) -> None:
    decoder, unpacker = ChunkDecoder(), Unpacker()
    while not decoder.ended:
        data = await remote.receive_some(MAX_WIRE_CHUNK + HEADER)
        if not data:
            raise TransportError("the tunnel stream ended without an end marker")
        for chunk in decoder.feed(data):
            if chunk is None:
                await local.send_eof()
            else:
                unpacked = unpacker.unpack(chunk)
                stats.count(direction, len(unpacked), len(chunk))
                await local.send_all(unpacked)


async def close_both(local: trio.SocketStream, remote: MeshStream) -> None:
    """Closes both ends, even while the tunnel's task is being cancelled (else the first close
    would raise Cancelled and the second would never run); a peer that does not answer a
    goodbye is not waited for long."""
    with trio.move_on_after(_CLOSE_S, shield=True):
        await trio.aclose_forcefully(local)
        await remote.aclose()
