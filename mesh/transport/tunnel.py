"""Tunnels: a local TCP connection carried over an authenticated mesh stream.

The primary's llama-server talks to each worker's rpc-server, and every node's API talks to a
model's primary, through a loopback listener whose connections become data-plane streams. On the
far side the stream is connected to a loopback service (the rpc-server, the llama-server), so no
engine port is ever reachable from the network.

A tunnel on a direct data-plane stream, where both ends have the native relay (and a thread for
it), goes native: its records are sealed in C with keys both ends agreed on (native_relay.py),
no Python per message, no compression (since GRAPH_RECOMPUTE a token's messages are small and
do not repeat). Each end then either relays it (a thread copies between the engine's loopback
connection and the peer's) or, where its engine has our sealed transport, hands the peer's
connection to the engine, which seals the records itself (engine_handoff.py): the same wire,
no relay hop. A tunnel carried over the control connection, or to a peer without the relay,
goes the Python path (tunnel_splice.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace

import trio

from .. import records
from ..records import RecordError
from .engine_handoff import HandoffFailed, hand_to_rpc_server
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
from .tunnel_splice import Watch, close_both, splice
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
    try:
        sock = await _detached(remote)
        await _relay(local, sock, native, keys, stats, outward=outward, rpc_commands=rpc_commands)
    except TransportError as err:
        _log.debug("tunnel to %s closed: %s", remote.remote_peer, err)
    finally:
        await close_both(local, remote)


async def _detached(remote: DataStream) -> socket.socket:
    """The stream's TCP socket once TLS has ended on it (TransportError if it does not)."""
    try:
        with trio.fail_after(_OPEN_TIMEOUT_S):
            return await remote.detach()
    except trio.TooSlowError:
        raise TransportError(f"data stream to {remote.remote_peer} did not end TLS") from None


async def _relay(
    local: trio.SocketStream,
    sock: socket.socket,
    native: NativeRelay,
    keys: TunnelKeys,
    stats: TunnelStats,
    *,
    outward: bool,
    rpc_commands: int = 0,
) -> None:
    """Relays natively until the tunnel ends, then closes the peer's socket and `local`."""
    counters = RelayCounters()
    stats.relaying(counters, outward)
    try:
        await native.relay(local.socket, sock, keys, counters, rpc_commands)
    except NativeRelayError as err:
        _log.debug("a natively relayed tunnel closed: %s", err)
    finally:
        stats.relayed(counters)
        sock.close()
        with trio.move_on_after(_CLOSE_S, shield=True):
            await trio.aclose_forcefully(local)


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
        self.rpc_commands = rpc_commands  # > 0: a native relay counts RPC requests (as watch)
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

    async def open_for_engine(self) -> tuple[socket.socket, TunnelKeys] | None:
        """Opens a tunnel for an engine that seals its records itself (engine_handoff.py): its
        TCP connection and keys, or None where it cannot go native (the engine then connects
        to our port). Raises HandoffFailed where the tunnel does not open."""
        if self._native is None:
            return None
        try:
            opened = await open_tunnel(self.open_stream, self.request, self._native)
        except (TransportError, TunnelRefused) as err:
            raise HandoffFailed(f"tunnel for {self.request.model_id}: {err}") from None
        if opened.native_keys is None or not isinstance(opened.stream, DataStream):
            await opened.stream.aclose()
            return None
        try:
            return await _detached(opened.stream), opened.native_keys
        except TransportError as err:
            await opened.stream.aclose()
            raise HandoffFailed(f"tunnel for {self.request.model_id}: {err}") from None

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
                rpc_commands=self.rpc_commands,
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
    handoff: Callable[[str], str | None] | None = None,
) -> None:
    """The far end: `target(request, peer)` names the loopback host:port or `unix:` socket to
    connect the stream to, or raises TunnelRefused. With `native`, an offer to relay natively
    is taken where this end can; then, where `handoff(endpoint)` names the service's handoff
    socket, the service takes the tunnel itself (engine_handoff.py), else the relay carries it."""
    try:
        request = TunnelRequest.decode(await receive_frame(stream, _OPEN_TIMEOUT_S))
        endpoint = await target(request, stream.remote_peer)
        handoff_path = handoff(endpoint) if handoff is not None else None
        native_here = bool(request.native_offer) and _can_relay(native, stream)
        local = None if native_here and handoff_path else await _connect_local(endpoint)
    except (RecordError, FrameError, TunnelRefused, OSError) as err:
        _log.info("refused a tunnel from %s: %s", stream.remote_peer, err)
        await send_frame(stream, str(err).encode()[:300] or b"refused")
        return
    stats.connections += 1
    if native_here and native is not None:
        assert isinstance(stream, DataStream)
        secret = new_secret()
        await send_frame(stream, _NATIVE_OK + secret)
        keys = TunnelKeys.derive(request.native_offer, secret, opener=False)
        if local is None and handoff_path is not None:
            await _hand_or_relay(stream, endpoint, handoff_path, native, keys, stats=stats)
        else:
            assert local is not None
            await splice_natively(local, stream, native, keys, stats, outward=False)
        return
    assert local is not None
    await send_frame(stream, b"ok")
    await splice(local, stream, stats, outward=False)


async def _hand_or_relay(
    stream: DataStream,
    endpoint: str,
    handoff_path: str,
    native: NativeRelay,
    keys: TunnelKeys,
    *,
    stats: TunnelStats,
) -> None:
    """Hands the tunnel to the service at `handoff_path`; where it does not take it, relays
    the tunnel to `endpoint` natively."""
    try:
        sock = await _detached(stream)
    except TransportError as err:
        _log.debug("tunnel from %s closed: %s", stream.remote_peer, err)
        await stream.aclose()
        return
    try:
        await hand_to_rpc_server(handoff_path, sock, keys, stats)
        return
    except HandoffFailed as err:
        _log.info("tunnel from %s: %s; relaying it", stream.remote_peer, err)
    try:
        local = await _connect_local(endpoint)
    except OSError as err:
        _log.info("tunnel from %s: %s", stream.remote_peer, err)
        sock.close()
        return
    await _relay(local, sock, native, keys, stats, outward=False)
