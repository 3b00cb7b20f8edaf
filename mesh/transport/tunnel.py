"""Tunnels: a local TCP connection carried over an authenticated mesh stream.

The primary's llama-server talks to each worker's rpc-server, and every node's API talks to a
model's primary, through a loopback listener whose connections become data-plane streams. On the
far side the stream is connected to a loopback service (the rpc-server, the llama-server), so no
engine port is ever reachable from the network.

A tunnel on a direct data-plane stream, where both ends have the native relay (and a thread for
it), is copied by it (native_relay.py): no Python per message, no compression (since
GRAPH_RECOMPUTE a token's messages are small and do not repeat). A tunnel carried over the
control connection, or to a peer without the relay, goes the Python path: after the opening
request, each direction is a sequence of chunks, each a 4-byte length then that many bytes,
zstd-packed (tunnel_codec.py); a zero-length chunk is that direction's end (TCP half-close),
which TLS streams cannot signal themselves. A broken side closes the other at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace

import trio

from .. import records
from ..records import RecordError
from .framing import FrameError, receive_frame, send_frame
from .loopback_owner import kernel_can_tell, opened_by
from .native_relay import (
    SECRET_BYTES,
    NativeRelay,
    NativeRelayError,
    RelayCounters,
    TunnelKeys,
    new_secret,
)
from .seam import MeshStream, TransportError
from .tls_socket import DataStream
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

TUNNEL = "/sharedllm/tunnel/3"
_NATIVE_OK = b"ok-native:"  # then the answerer's secret: the rest goes through the native relay
_OPEN_TIMEOUT_S = 10.0
_CLOSE_S = 2.0
_log = logging.getLogger("sharedllm.mesh.tunnel")


class TunnelRefused(Exception):
    """The far side would not connect this tunnel (the message says why)."""


@dataclass(frozen=True)
class TunnelRequest:
    """What a tunnel stream asks for: a service ("rpc" or "api") of a model's placement epoch;
    `native_offer`, if not empty, the opener's secret for a native relay (native_relay.py)."""

    service: str
    model_id: str
    epoch: int
    native_offer: bytes = b""

    def encode(self) -> bytes:
        fields = [self.service, self.model_id, self.epoch, self.native_offer]
        return records.encode("tunnel-open", fields)

    @staticmethod
    def decode(data: bytes) -> TunnelRequest:
        fields = records.decode(data, "tunnel-open", [str, str, int, bytes])
        service, model_id, epoch, offer = fields
        if len(offer) not in (0, SECRET_BYTES):
            raise RecordError(f"a native relay offer must be {SECRET_BYTES} bytes")
        return TunnelRequest(service, model_id, epoch, offer)


@dataclass(frozen=True)
class OpenedTunnel:
    """A connected tunnel stream, and its relay keys when both ends relay it natively."""

    stream: MeshStream
    native_keys: TunnelKeys | None = None


def _can_relay(native: NativeRelay | None, stream: MeshStream) -> bool:
    """Whether this tunnel may go native here: on a direct TLS stream (not one carried over the
    control connection), with a relay thread free."""
    return native is not None and isinstance(stream, DataStream) and native.has_room()


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
        await _close_both(local, remote)


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


async def splice_natively(
    local: trio.SocketStream,
    remote: DataStream,
    native: NativeRelay,
    keys: TunnelKeys,
    stats: TunnelStats,
    *,
    outward: bool,
    rpc_commands: int = 0,
) -> None:
    """As `splice`, by the native relay: TLS ends on `remote` and the relay takes its socket.
    `rpc_commands` > 0 counts the local side's llama.cpp RPC requests (the opener's side)."""
    counters = RelayCounters()
    try:
        with trio.fail_after(_OPEN_TIMEOUT_S):
            sock = await remote.detach()
        stats.relaying(counters, outward)
        try:
            await native.relay(local.socket, sock, keys, counters, rpc_commands)
        finally:
            stats.relayed(counters)
    except (trio.TooSlowError, TransportError, NativeRelayError) as err:
        _log.debug("tunnel to %s closed: %s", remote.remote_peer, err or "TLS did not end")
    finally:
        await _close_both(local, remote)


async def _close_both(local: trio.SocketStream, remote: MeshStream) -> None:
    """Closes both ends, even while the tunnel's task is being cancelled (else the first close
    would raise Cancelled and the second would never run); a peer that does not answer a
    goodbye is not waited for long."""
    with trio.move_on_after(_CLOSE_S, shield=True):
        await trio.aclose_forcefully(local)
        await remote.aclose()


OpenStream = Callable[[], Awaitable[MeshStream]]


async def open_tunnel(
    open_stream: OpenStream, request: TunnelRequest, native: NativeRelay | None = None
) -> OpenedTunnel:
    """Opens a stream and asks the far side to connect it (natively relayed where both ends
    can); raises TunnelRefused or TransportError."""
    stream = await open_stream()
    offer = new_secret() if _can_relay(native, stream) else b""
    try:
        with trio.fail_after(_OPEN_TIMEOUT_S):
            await send_frame(stream, replace(request, native_offer=offer).encode())
            answer = await receive_frame(stream)
    except (trio.TooSlowError, FrameError, TransportError) as err:
        await stream.aclose()
        raise TransportError(f"tunnel to {stream.remote_peer} did not open: {err}") from None
    if answer == b"ok":
        return OpenedTunnel(stream)
    secret = answer[len(_NATIVE_OK) :]
    if offer and answer.startswith(_NATIVE_OK) and len(secret) == SECRET_BYTES:
        return OpenedTunnel(stream, TunnelKeys.derive(offer, secret, opener=True))
    await stream.aclose()
    raise TunnelRefused(answer.decode(errors="replace")[:300])


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
        *,
        native: NativeRelay | None = None,
        rpc_commands: int = 0,
    ) -> None:
        self.open_stream = open_stream
        self.request = request
        self._watcher = watcher
        self._native = native
        self._rpc_commands = rpc_commands  # > 0: a native relay counts RPC requests (as watch)
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
            opened = await open_tunnel(self.open_stream, self.request, self._native)
        except (TransportError, TunnelRefused) as err:
            _log.warning("tunnel for %s %s: %s", self.request.model_id, self.request.service, err)
            await trio.aclose_forcefully(local)
            return
        self.stats.connections += 1
        remote, keys = opened.stream, opened.native_keys
        if keys is not None and self._native is not None and isinstance(remote, DataStream):
            await splice_natively(
                local,
                remote,
                self._native,
                keys,
                self.stats,
                outward=True,
                rpc_commands=self._rpc_commands,
            )
            return
        watch = self._watcher() if self._watcher is not None else None
        await splice(local, remote, self.stats, outward=True, watch=watch)


LocalTarget = Callable[[TunnelRequest, str], Awaitable[str]]


async def _connect_local(endpoint: str) -> trio.SocketStream:
    """`unix:/path` (an engine's private socket) or `host:port` on loopback."""
    if endpoint.startswith("unix:"):
        return await trio.open_unix_socket(endpoint[len("unix:") :])
    host, _, port = endpoint.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def serve_tunnel(
    stream: MeshStream,
    target: LocalTarget,
    stats: TunnelStats,
    native: NativeRelay | None = None,
) -> None:
    """The far end: `target(request, peer)` names the loopback host:port or `unix:` socket to
    connect the stream to, or raises TunnelRefused. With `native`, an offer to relay natively
    is taken where this end can."""
    try:
        request = TunnelRequest.decode(await receive_frame(stream, _OPEN_TIMEOUT_S))
        endpoint = await target(request, stream.remote_peer)
        local = await _connect_local(endpoint)
    except (RecordError, FrameError, TunnelRefused, OSError) as err:
        _log.info("refused a tunnel from %s: %s", stream.remote_peer, err)
        await send_frame(stream, str(err).encode()[:300] or b"refused")
        return
    stats.connections += 1
    if request.native_offer and native is not None and _can_relay(native, stream):
        assert isinstance(stream, DataStream)
        secret = new_secret()
        await send_frame(stream, _NATIVE_OK + secret)
        keys = TunnelKeys.derive(request.native_offer, secret, opener=False)
        await splice_natively(local, stream, native, keys, stats, outward=False)
        return
    await send_frame(stream, b"ok")
    await splice(local, stream, stats, outward=False)
