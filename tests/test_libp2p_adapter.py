"""The libp2p adapter keeps the Transport seam's contract on real libp2p hosts (127.0.0.1)."""

from __future__ import annotations

import socket

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.transport.libp2p_adapter import open_libp2p_transport
from sharedllm.mesh.transport.seam import MeshStream, TransportError

_ECHO = "/sharedllm-test/echo/1"


async def _echo(stream: MeshStream) -> None:
    await stream.send_all(await stream.receive_some(64))
    await stream.aclose()


async def test_open_stream_never_dials_a_peer_that_is_not_connected() -> None:
    """A member that dropped us (revoked, say) must not be reached again by a stream that
    libp2p dials on its own: such a connection carries no hello, and its owner never learns
    why it was refused."""
    one, two = NodeIdentity.from_seed(b"1" * 32), NodeIdentity.from_seed(b"2" * 32)
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        open_libp2p_transport(one, listen) as first,
        open_libp2p_transport(two, listen) as second,
    ):
        second.serve(_ECHO, _echo)
        address = next(a for a in second.listen_addrs() if "/127.0.0.1/" in a)
        peer = await first.connect(address)
        stream = await first.open_stream(peer, _ECHO)
        await stream.send_all(b"ping")
        assert await stream.receive_some(64) == b"ping"
        await second.disconnect(first.local_peer_id)
        with trio.fail_after(10):
            while peer in first.connected_peers():
                await trio.sleep(0.05)
        with pytest.raises(TransportError, match="not connected"):
            await first.open_stream(peer, _ECHO)
        assert peer not in first.connected_peers()


async def test_libp2p_never_dials_a_known_peer_on_its_own() -> None:
    """py-libp2p's background connector dials peers of its peerstore while a host has fewer
    than 100 connections; in a mesh that connection carries no hello, and a member that
    revoked us drops every stream on it while we take it for the admitted one."""
    one, two = NodeIdentity.from_seed(b"3" * 32), NodeIdentity.from_seed(b"4" * 32)
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        open_libp2p_transport(one, listen) as first,
        open_libp2p_transport(two, listen) as second,
    ):
        address = next(a for a in second.listen_addrs() if "/127.0.0.1/" in a)
        swarm = first._host.get_network()
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        swarm.peerstore.add_addrs(info.peer_id, info.addrs, 3600)  # known, never dialed
        await swarm.auto_connector.maybe_connect()
        await trio.sleep(0.5)
        assert second.local_peer_id not in first.connected_peers()


async def test_connect_dials_the_address_given_not_others_the_peerstore_knows() -> None:
    """libp2p dialed every address it knew for a peer, in the order learned: a decoy address
    first in the list (one that accepts and never answers) stalled every dial to that peer."""
    one, two = NodeIdentity.from_seed(b"5" * 32), NodeIdentity.from_seed(b"6" * 32)
    listen = ["/ip4/127.0.0.1/tcp/0"]
    with socket.socket() as silent:  # accepts connections (the backlog) and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        decoy = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}")
        async with (
            open_libp2p_transport(one, listen) as first,
            open_libp2p_transport(two, listen) as second,
        ):
            address = next(a for a in second.listen_addrs() if "/127.0.0.1/" in a)
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
            first._host.get_network().peerstore.add_addrs(info.peer_id, [decoy], 3600)
            with trio.fail_after(30):  # stalls for good on the decoy otherwise
                assert await first.connect(address) == second.local_peer_id
            await first.disconnect(second.local_peer_id)  # py-libp2p leaks it at shutdown
