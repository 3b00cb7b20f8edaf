"""The Transport seam over py-libp2p: TCP, Noise (only: never plaintext or secio), yamux, and
circuit relay v2 with hole punching for members behind NATs (`libp2p_relay`).

This module and `libp2p_relay` are the only ones that import libp2p (mDNS aside). It adapts
libp2p's streams (which raise `StreamEOF` instead of returning b"") to `MeshStream` and maps
libp2p's exceptions to `TransportError`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio

from ..addresses import advertised_hosts
from ..identity import NodeIdentity
from .interfaces import local_interfaces
from .libp2p_relay import MeshRelay, RelayOptions, is_circuit, running_relay
from .seam import MeshStream, StreamHandler, TransportError

with warnings.catch_warnings():
    # py-libp2p's import chain emits deprecation warnings we cannot fix from here.
    warnings.simplefilter("ignore")
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.auto_connector import AutoConnector
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.network.swarm import Swarm
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

_log = logging.getLogger("sharedllm.mesh.libp2p")


class _OurDialsOnly(AutoConnector):
    """py-libp2p redials peers from its peerstore on its own whenever a host has fewer than
    its low watermark of connections (100), which is always in a small mesh. Such a connection
    carries no hello: the peer that closed it (a member that revoked us, say) drops every
    stream on it, while we take it for the admitted one. Only the mesh dials."""

    async def maybe_connect(self) -> None:
        return


class _Libp2pStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._peer = str(stream.muxed_conn.peer_id)
        try:
            address = stream.get_remote_address()
        except Exception:  # noqa: BLE001 - an optional fact; relayed streams may lack it
            address = None
        self._host = None if address is None else str(address[0])

    @property
    def remote_peer(self) -> str:
        return self._peer

    @property
    def remote_host(self) -> str | None:
        return self._host

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except Exception as err:  # noqa: BLE001 - libp2p raises many unrelated types here
            raise TransportError(f"write to {self._peer} failed: {type(err).__name__}") from None

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            data: bytes = await self._stream.read(max_bytes)
        except StreamEOF:
            return b""
        except Exception as err:  # noqa: BLE001
            raise TransportError(f"read from {self._peer} failed: {type(err).__name__}") from None
        return data

    async def aclose(self) -> None:
        # Closing a broken stream may fail in many ways; there is nothing left to do then.
        with contextlib.suppress(Exception):
            await self._stream.close()


class Libp2pTransport:
    """A libp2p host bound to this node's identity; use `open_libp2p_transport` to run it."""

    def __init__(self, host: Any, relay: MeshRelay) -> None:
        self._host = host
        self.relay = relay
        self.public: list[str] = []  # where the router forwards to us (UPnP), as multiaddrs

    @property
    def local_peer_id(self) -> str:
        return str(self._host.get_id())

    def listen_addrs(self) -> Sequence[str]:
        """Dialable addresses, likely useful ones first: a wildcard listen address is expanded
        to each of this machine's addresses of its family (`advertised_hosts`)."""
        interfaces = local_interfaces()
        found: list[str] = []
        for address in (str(a) for a in self._host.get_addrs()):
            family, _, rest = address.strip("/").partition("/")
            host, _, rest = rest.partition("/")
            if family in ("ip4", "ip6") and host in ("0.0.0.0", "::"):
                found += [f"/{family}/{ip}/{rest}" for ip in advertised_hosts(host, interfaces)]
            else:
                found.append(address)
        found += [f"{address}/p2p/{self.local_peer_id}" for address in self.public]
        found += self.relay.reserved.values()  # through relays: last, the slowest way in
        return list(dict.fromkeys(found))

    async def connect(self, address: str) -> str:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        except Exception as err:  # noqa: BLE001
            raise TransportError(f"not a peer address: {address} ({err})") from None
        self._allow_dial(info.peer_id)
        if is_circuit(address):
            await self.relay.dial(address)
            return str(info.peer_id)
        # libp2p dials every address its peerstore holds for the peer, in the order learned
        # (identify adds the peer's own list); the mesh dials exactly the one it chose.
        self._host.get_network().peerstore.clear_addrs(info.peer_id)
        try:
            await self._host.connect(info)
        except Exception as err:  # noqa: BLE001
            raise TransportError(
                f"cannot connect to {address}: {type(err).__name__}: {err}"
            ) from None
        return str(info.peer_id)

    def free_inbound_slots(self) -> int:
        """How many more inbound connections the host would take into a handshake now."""
        return int(self._host.get_network()._inbound_limiter.available_tokens)

    def _allow_dial(self, peer: Any) -> None:
        """Our mesh paces its own dials (bootstrap retries, probes); libp2p's swarm would refuse
        to dial a peer for 60 s after one failed dial, which let a brief flood of its inbound
        slots lock joiners out for a minute."""
        self._host.get_network().unblock_peer(peer)

    async def open_stream(self, peer_id: str, protocol: str) -> MeshStream:
        try:
            peer = ID.from_base58(peer_id)
        except Exception as err:  # noqa: BLE001
            raise TransportError(f"not a peer id: {peer_id} ({err})") from None
        if peer not in self._host.get_connected_peers():
            # libp2p would dial it again on its own; that new connection carries no hello,
            # and a peer that dropped us (a revoked node, say) would never be told why.
            raise TransportError(f"not connected to {peer_id}")
        try:
            stream = await self._host.new_stream(peer, [TProtocol(protocol)])
        except Exception as err:  # noqa: BLE001
            raise TransportError(
                f"cannot open {protocol} to {peer_id}: {type(err).__name__}"
            ) from None
        return _Libp2pStream(stream)

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        async def adapted(stream: Any) -> None:
            wrapped = _Libp2pStream(stream)
            try:
                await handler(wrapped)
            except TransportError as err:
                _log.debug("%s stream from %s ended: %s", protocol, wrapped.remote_peer, err)
            finally:
                await wrapped.aclose()

        self._host.set_stream_handler(TProtocol(protocol), adapted)

    def path_to(self, peer_id: str) -> tuple[str, str | None]:
        """How we are connected to `peer_id` ("direct", "relayed", "hole-punched" or "none")
        and the address in use."""
        return self.relay.path_to(peer_id)

    def connected_peers(self) -> Sequence[str]:
        return [str(p) for p in self._host.get_connected_peers()]

    async def disconnect(self, peer_id: str) -> None:
        try:
            await self._host.disconnect(ID.from_base58(peer_id))
        except Exception as err:  # noqa: BLE001
            _log.debug("disconnecting %s: %s", peer_id, err)


def check_port_free(address: multiaddr.Multiaddr | str, setting: str = "--listen") -> None:
    """libp2p listens with SO_REUSEPORT, so two nodes could silently share a port; refuse that."""
    text = str(address)
    parts = text.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or parts[3] == "0":
        return
    family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # A crashed node's connections linger in TIME_WAIT for up to a minute; they must not
        # keep it from starting again (a listener still there does: Linux refuses the bind).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((parts[1], int(parts[3])))
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise TransportError(
                f"cannot listen on {text}: {reason} (use {setting} to pick another)"
            ) from None


@asynccontextmanager
async def open_libp2p_transport(
    identity: NodeIdentity, listen: Sequence[str], relay: RelayOptions | None = None
) -> AsyncIterator[Libp2pTransport]:
    """Runs a libp2p host with Noise as the only security option and yamux streams, able to
    dial and be reached through relays (and to relay for members where `relay.serves`)."""
    key_pair = create_new_key_pair(identity.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_pair().private_key)
    try:
        addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as err:  # noqa: BLE001
        raise TransportError(f"bad listen address in {list(listen)}: {err}") from None
    for address in addrs:
        check_port_free(address)
    host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_preference="YAMUX")
    swarm = host.get_network()
    if not isinstance(swarm, Swarm):
        raise TypeError(f"py-libp2p gave a {type(swarm).__name__}, not the Swarm we tune")
    swarm.auto_connector = _OurDialsOnly(swarm, swarm.connection_config.auto_connect_interval)
    async with (
        host.run(listen_addrs=addrs),
        running_relay(host, relay or RelayOptions()) as mesh_relay,
        trio.open_nursery() as nursery,
    ):
        transport = Libp2pTransport(host, mesh_relay)
        if str(host.get_id()) != identity.peer_id:
            raise TransportError("libp2p derived another peer id from our key")
        nursery.start_soon(_return_closed_inbound_slots, host.get_network())
        try:
            yield transport
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for peer in list(host.get_connected_peers()):
                    # py-libp2p 0.8.1 leaves the sockets of open connections behind at stop
                    await transport.disconnect(str(peer))


def inbound_slot_tokens(base: int, borrowed: int, live_connections: int) -> int:
    """How many inbound slots the swarm should have so that `base` of them are free for new
    handshakes whenever fewer than `base` connections live: the slots still held by
    connections that have closed (`borrowed` minus the live ones) are added on top."""
    return base + max(0, borrowed - live_connections)


async def _return_closed_inbound_slots(swarm: Any, period_s: float = 2.0) -> None:
    """py-libp2p 0.8.1 keeps an inbound connection's slot until the whole host stops, also
    after that connection has closed; a node would stop accepting members after its 250th
    inbound connection ever. Every `period_s` the slots of closed connections are given back
    (counting every live connection as inbound, which can only give back too few)."""
    limiter = swarm._inbound_limiter  # the pinned version's own cap on waiting handshakes
    base = int(limiter.total_tokens)
    while True:
        await trio.sleep(period_s)
        live = len(swarm.get_connections())
        limiter.total_tokens = inbound_slot_tokens(base, int(limiter.borrowed_tokens), live)
