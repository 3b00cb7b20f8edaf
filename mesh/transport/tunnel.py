"""Tunnels: a local TCP connection carried over an authenticated mesh stream.

The primary's llama-server talks to each worker's rpc-server, and every node's API talks to a
model's primary, through a loopback listener whose connections become data-plane streams. On the
far side the stream is connected to a loopback service (the rpc-server, the llama-server), so no
engine port is ever reachable from the network.

On the stream, after the opening request, each direction is a sequence of chunks, each a 4-byte
length then that many bytes; a zero-length chunk is that direction's end (TCP half-close), which
TLS streams cannot signal themselves. A broken side closes the other at once.

Each direction is one zstd stream, flushed at every chunk: llama.cpp's RPC resends nearly the
same compute graph for every token, which the window of earlier chunks turns into a few bytes.
That cuts the bytes that TLS and the link carry per token many times over. Large chunks that do
not compress (weights at load) go as they are; a first byte says which a chunk is. A chunk may
expand to at most `MAX_CHUNK` bytes (what one local read gives the sender), so no peer can make
us inflate more than that per chunk.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import IO, cast

import trio
import zstandard

from .. import records
from ..records import RecordError
from .framing import FrameError, receive_frame, send_frame
from .loopback_owner import kernel_can_tell, opened_by
from .seam import MeshStream, TransportError

TUNNEL = "/sharedllm/tunnel/2"
MAX_CHUNK = 256 * 1024  # bytes of one local read, and the most a wire chunk may inflate to
# A compressed chunk of data that does not compress is a little larger than the data itself.
MAX_WIRE_CHUNK = MAX_CHUNK + MAX_CHUNK // 64
_HEADER = 4
_OPEN_TIMEOUT_S = 10.0
_log = logging.getLogger("sharedllm.mesh.tunnel")


class TunnelRefused(Exception):
    """The far side would not connect this tunnel (the message says why)."""


@dataclass(frozen=True)
class TunnelRequest:
    """What a tunnel stream asks for: a service ("rpc" or "api") of a model's placement epoch."""

    service: str
    model_id: str
    epoch: int

    def encode(self) -> bytes:
        return records.encode("tunnel-open", [self.service, self.model_id, self.epoch])

    @staticmethod
    def decode(data: bytes) -> TunnelRequest:
        service, model_id, epoch = records.decode(data, "tunnel-open", [str, str, int])
        return TunnelRequest(service, model_id, epoch)


@dataclass
class TunnelStats:
    """Bytes each way (as the services sent them, and compressed on the wire), and round trips:
    how often the traffic turned from out to back."""

    bytes_out: int = 0
    bytes_back: int = 0
    wire_out: int = 0
    wire_back: int = 0
    round_trips: int = 0
    connections: int = 0
    refused_local: int = 0  # loopback connections from processes other than the engine's
    _last_direction: int = field(default=0, repr=False)

    def count(self, direction: int, size: int, wire: int) -> None:
        if direction > 0:
            self.bytes_out += size
            self.wire_out += wire
        else:
            self.bytes_back += size
            self.wire_back += wire
            if self._last_direction > 0:
                self.round_trips += 1
        self._last_direction = direction

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_out": self.bytes_out,
            "bytes_back": self.bytes_back,
            "wire_out": self.wire_out,
            "wire_back": self.wire_back,
            "round_trips": self.round_trips,
            "connections": self.connections,
            "refused_local": self.refused_local,
        }


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
        while len(self._buffer) >= _HEADER and not self.ended:
            size = int.from_bytes(self._buffer[:_HEADER], "big")
            if size > MAX_WIRE_CHUNK:
                raise FrameError(f"tunnel chunk of {size} bytes is over {MAX_WIRE_CHUNK}")
            if len(self._buffer) < _HEADER + size:
                break
            chunk = bytes(self._buffer[_HEADER : _HEADER + size])
            del self._buffer[: _HEADER + size]
            if size == 0:
                self.ended = True
                found.append(None)
                if self._buffer:
                    raise FrameError("data after the end of a tunnel direction")
            else:
                found.append(chunk)
        return found


def encode_chunk(data: bytes) -> bytes:
    return len(data).to_bytes(_HEADER, "big") + data


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
        await trio.aclose_forcefully(local)
        await remote.aclose()


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
        data = await remote.receive_some(MAX_WIRE_CHUNK + _HEADER)
        if not data:
            raise TransportError("the tunnel stream ended without an end marker")
        for chunk in decoder.feed(data):
            if chunk is None:
                await local.send_eof()
            else:
                unpacked = unpacker.unpack(chunk)
                stats.count(direction, len(unpacked), len(chunk))
                await local.send_all(unpacked)


OpenStream = Callable[[], Awaitable[MeshStream]]


async def open_tunnel(open_stream: OpenStream, request: TunnelRequest) -> MeshStream:
    """Opens a stream and asks the far side to connect it; raises TunnelRefused or
    TransportError."""
    stream = await open_stream()
    try:
        with trio.fail_after(_OPEN_TIMEOUT_S):
            await send_frame(stream, request.encode())
            answer = await receive_frame(stream)
    except (trio.TooSlowError, FrameError, TransportError) as err:
        await stream.aclose()
        raise TransportError(f"tunnel to {stream.remote_peer} did not open: {err}") from None
    if answer != b"ok":
        await stream.aclose()
        raise TunnelRefused(answer.decode(errors="replace")[:300])
    return stream


class TunnelListener:
    """A loopback port whose connections are tunnelled to one peer's service: every one, or
    with `allowed_pids` only those the kernel says one of those processes opened.

    The port is bound at construction, so callers outside a task can hand it out at once.
    `watcher()`, if given, makes a `Watch` for each connection's outgoing bytes.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        request: TunnelRequest,
        watcher: Callable[[], Watch] | None = None,
        allowed_pids: Callable[[], Collection[int]] | None = None,
    ) -> None:
        self.open_stream = open_stream
        self.request = request
        self._watcher = watcher
        # Whose connections are carried (the engine's, the node's own); None: any process's.
        self._allowed_pids = allowed_pids if kernel_can_tell() else None
        self.stats = TunnelStats()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = int(sock.getsockname()[1])
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def run(self) -> None:
        """Serves connections until cancelled, then closes the port."""
        async with self._listener:
            await trio.serve_listeners(self._carry, [self._listener])

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _carry(self, local: trio.SocketStream) -> None:
        # /proc/net/tcp lists every connection of the host: read it off the event loop.
        if self._allowed_pids is not None and not await trio.to_thread.run_sync(
            opened_by, local.socket.getpeername(), local.socket.getsockname(), self._allowed_pids()
        ):
            self.stats.refused_local += 1
            if self.stats.refused_local in (1, 10, 100, 1000):
                _log.warning(
                    "tunnel for %s %s: refused %d local connections not opened by its engine",
                    self.request.model_id,
                    self.request.service,
                    self.stats.refused_local,
                )
            await trio.aclose_forcefully(local)
            return
        try:
            remote = await open_tunnel(self.open_stream, self.request)
        except (TransportError, TunnelRefused) as err:
            _log.warning("tunnel for %s %s: %s", self.request.model_id, self.request.service, err)
            await trio.aclose_forcefully(local)
            return
        self.stats.connections += 1
        watch = self._watcher() if self._watcher is not None else None
        await splice(local, remote, self.stats, outward=True, watch=watch)


LocalTarget = Callable[[TunnelRequest, str], Awaitable[str]]


async def _connect_local(endpoint: str) -> trio.SocketStream:
    """`unix:/path` (an engine's private socket) or `host:port` on loopback."""
    if endpoint.startswith("unix:"):
        return await trio.open_unix_socket(endpoint[len("unix:") :])
    host, _, port = endpoint.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def serve_tunnel(stream: MeshStream, target: LocalTarget, stats: TunnelStats) -> None:
    """The far end: `target(request, peer)` names the loopback host:port or `unix:` socket to
    connect the stream to, or raises TunnelRefused."""
    try:
        request = TunnelRequest.decode(await receive_frame(stream, _OPEN_TIMEOUT_S))
        endpoint = await target(request, stream.remote_peer)
        local = await _connect_local(endpoint)
    except (RecordError, FrameError, TunnelRefused, OSError) as err:
        _log.info("refused a tunnel from %s: %s", stream.remote_peer, err)
        await send_frame(stream, str(err).encode()[:300] or b"refused")
        return
    await send_frame(stream, b"ok")
    stats.connections += 1
    await splice(local, stream, stats, outward=False)
