"""The Transport seam: what the mesh needs from a network, and nothing more.

Implementations: `libp2p_adapter` (real TCP, Noise, yamux) and, for tests at scale, the
simulated network. Everything above (membership handshake, gossip, probing, tunnels) is written
against these two small protocols only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol


class TransportError(Exception):
    """A peer could not be reached, or a stream broke; the mesh treats both the same way."""


class MeshStream(Protocol):
    """A reliable, ordered byte stream to one authenticated peer."""

    @property
    def remote_peer(self) -> str: ...

    @property
    def remote_host(self) -> str | None:
        """The IP address the peer's connection comes from, where the transport knows it."""
        ...

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to `max_bytes`; b"" once the peer has closed its side."""
        ...

    async def aclose(self) -> None: ...


StreamHandler = Callable[[MeshStream], Awaitable[None]]


class Transport(Protocol):
    @property
    def local_peer_id(self) -> str: ...

    def listen_addrs(self) -> Sequence[str]: ...

    async def connect(self, address: str) -> str:
        """Dials a multiaddr ending in /p2p/<peer id>; returns the authenticated peer id."""
        ...

    async def open_stream(self, peer_id: str, protocol: str) -> MeshStream:
        """A stream over the connection to `peer_id`; never dials (TransportError when there is
        no connection): admission is proved once per connection, by the hello on `connect`."""
        ...

    def serve(self, protocol: str, handler: StreamHandler) -> None: ...

    def connected_peers(self) -> Sequence[str]: ...

    async def disconnect(self, peer_id: str) -> None: ...
