"""Circuit relay v2 through a member (real libp2p hosts on 127.0.0.1): a member reserves a slot
at a relay member, another reaches it through the relay, data streams are carried over that
relayed connection, and the relay serves members only."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import DCUTR_PROTOCOL_ID
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.transport import libp2p_relay
from sharedllm.mesh.transport.data_plane import CARRIED, DataPlane, echo_handler
from sharedllm.mesh.transport.libp2p_adapter import Libp2pTransport, open_libp2p_transport
from sharedllm.mesh.transport.libp2p_relay import RelayOptions, _PacedStream
from sharedllm.mesh.transport.seam import MeshStream, TransportError

_ECHO = "/sharedllm-test/echo/1"
_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
MESH = MeshKey.generate(b"\x14" * 32)
NOW = 1_800_000_000.0


async def _echo(stream: MeshStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.aclose()


@asynccontextmanager
async def _three(members: set[str]) -> AsyncIterator[tuple[Libp2pTransport, ...]]:
    """A relay member and two others; the relay counts `members` as admitted."""
    identities = [NodeIdentity.from_seed(bytes([40 + i]) * 32) for i in range(3)]
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            open_libp2p_transport(identities[0], _LISTEN, RelayOptions(serves=True))
        )
        relay.relay.is_member = lambda peer: peer in members
        others = [
            await stack.enter_async_context(open_libp2p_transport(i, _LISTEN))
            for i in identities[1:]
        ]
        yield relay, *others


def _address(transport: Libp2pTransport) -> str:
    return next(a for a in transport.listen_addrs() if "/127.0.0.1/" in a)


async def test_a_member_reached_only_through_a_relay_member_answers_streams() -> None:
    members: set[str] = set()
    async with _three(members) as (relay, behind_nat, dialer):
        members |= {behind_nat.local_peer_id, dialer.local_peer_id}
        behind_nat.serve(_ECHO, _echo)
        await behind_nat.connect(_address(relay))
        circuits = await behind_nat.relay.keep_reservations([relay.local_peer_id])
        assert len(circuits) == 1 and "/p2p-circuit/p2p/" in circuits[0]
        assert circuits[0] in behind_nat.listen_addrs()  # advertised, last
        assert behind_nat.listen_addrs()[-1] == circuits[0]
        with trio.fail_after(30):
            assert await dialer.connect(circuits[0]) == behind_nat.local_peer_id
            stream = await dialer.open_stream(behind_nat.local_peer_id, _ECHO)
            await stream.send_all(b"through the relay")
            assert await stream.receive_some(64) == b"through the relay"
        path, address = dialer.path_to(behind_nat.local_peer_id)
        assert path == "relayed" and address is not None and "/p2p-circuit" in address
        assert dialer.path_to(relay.local_peer_id)[0] == "direct"


async def test_the_relay_refuses_reservations_and_circuits_of_strangers() -> None:
    async with _three(set()) as (relay, stranger, _):
        await stranger.connect(_address(relay))
        assert await stranger.relay.keep_reservations([relay.local_peer_id]) == []
        assert relay.relay.refused_hops == 1
        assert stranger.listen_addrs() == [_address(stranger)]


async def test_a_member_that_serves_no_relay_refuses_to_carry() -> None:
    async with _three(set()) as (_, not_a_relay, other):
        await other.connect(_address(not_a_relay))
        assert await other.relay.keep_reservations([not_a_relay.local_peer_id]) == []
        with pytest.raises(TransportError):
            fake = f"{_address(not_a_relay)}/p2p-circuit/p2p/{other.local_peer_id}"
            await other.connect(fake)


class _Sink:
    def __init__(self) -> None:
        self.written = 0

    async def write(self, data: bytes) -> None:
        self.written += len(data)


async def test_a_relayed_circuit_is_paced_to_its_rate(autojump_clock: trio.abc.Clock) -> None:
    """Each direction of a circuit is held to the relay's rate (a bucket of a tenth of a second)."""
    sink = _Sink()
    paced = _PacedStream(sink, rate_bytes_per_s=1000)
    started = trio.current_time()
    for _ in range(30):
        await paced.write(b"x" * 200)  # 6,000 bytes: 100 at once, then 1,000 a second
    assert sink.written == 6000
    assert trio.current_time() - started == pytest.approx(5.9, abs=0.3)


def _plane(identity: NodeIdentity, transport: Libp2pTransport, mesh: MeshKey = MESH) -> DataPlane:
    cert = Certificate.issue(mesh, identity.peer_id, "n", ["member"], NOW)
    plane = DataPlane(
        identity, Proof(certificate=cert), MembershipState(MESH.public_key).admit_encoded
    )
    plane.carrier = lambda peer: transport.open_stream(peer, CARRIED)
    transport.serve(CARRIED, plane.serve_carried)
    return plane


async def test_data_streams_are_carried_through_the_relay_when_no_direct_path_works() -> None:
    """The member behind a NAT gossips a data address nobody reaches: the stream goes over the
    relayed control connection instead, with the same membership proof, and later streams go
    that way at once."""
    members: set[str] = set()
    async with _three(members) as (relay, behind_nat, dialer):
        members |= {behind_nat.local_peer_id, dialer.local_peer_id}
        identities = [NodeIdentity.from_seed(bytes([41 + i]) * 32) for i in range(2)]
        server, client = _plane(identities[0], behind_nat), _plane(identities[1], dialer)
        server.serve("/echo", echo_handler)
        await behind_nat.connect(_address(relay))
        circuits = await behind_nat.relay.keep_reservations([relay.local_peer_id])
        await dialer.connect(circuits[0])
        unreachable = [("127.0.0.1", 9)]  # the discard port: nothing listens there
        with trio.fail_after(30):
            for _ in range(2):
                stream = await client.connect(behind_nat.local_peer_id, unreachable, "/echo")
                await stream.send_all(b"carried")
                assert await stream.receive_some(64) == b"carried"
                await stream.aclose()
        assert client.path_to(behind_nat.local_peer_id) == "carried"
        assert server.refused_handshakes == 0


async def test_a_carried_stream_still_needs_a_membership_proof() -> None:
    async with _three(set()) as (_, member, stranger):
        identities = [NodeIdentity.from_seed(bytes([41 + i]) * 32) for i in range(2)]
        server = _plane(identities[0], member)
        outsider = _plane(identities[1], stranger, MeshKey.generate(b"\x13" * 32))
        server.serve("/echo", echo_handler)
        await stranger.connect(_address(member))
        with trio.fail_after(30), pytest.raises(TransportError):
            await outsider.connect(member.local_peer_id, [], "/echo")
        assert server.refused_handshakes == 1


async def test_a_relay_keeps_no_more_reservations_than_its_limit() -> None:
    identities = [NodeIdentity.from_seed(bytes([50 + i]) * 32) for i in range(3)]
    options = RelayOptions(serves=True, max_reservations=1)
    async with (
        open_libp2p_transport(identities[0], _LISTEN, options) as relay,
        open_libp2p_transport(identities[1], _LISTEN) as first,
        open_libp2p_transport(identities[2], _LISTEN) as second,
    ):
        relay.relay.is_member = lambda peer: True
        for member in (first, second):
            await member.connect(_address(relay))
        assert len(await first.relay.keep_reservations([relay.local_peer_id])) == 1
        assert await second.relay.keep_reservations([relay.local_peer_id]) == []


async def test_a_relayed_connection_is_upgraded_by_hole_punching_where_peers_can_meet() -> None:
    """On one machine the peers can always dial each other: DCUtR replaces the relayed
    connection with a direct one (the namespace test shows it across NATs)."""
    members: set[str] = set()
    async with _three(members) as (relay, behind_nat, dialer):
        members |= {behind_nat.local_peer_id, dialer.local_peer_id}
        await behind_nat.connect(_address(relay))
        circuits = await behind_nat.relay.keep_reservations([relay.local_peer_id])
        await dialer.connect(circuits[0])
        with trio.fail_after(30):
            while dialer.path_to(behind_nat.local_peer_id)[0] != "hole-punched":
                await trio.sleep(0.2)
        _, address = dialer.path_to(behind_nat.local_peer_id)
        assert address is not None and "/p2p-circuit" not in address


async def test_a_stranger_cannot_make_a_node_dial_for_a_hole_punch() -> None:
    """A hole punch makes its receiver dial the addresses the other side names: from a peer
    that is not a member, the stream is reset unread."""
    async with _three(set()) as (_, node, stranger):
        await stranger.connect(_address(node))
        with trio.fail_after(10):
            with contextlib.suppress(Exception):  # reset: how py-libp2p reports it varies
                stream = await stranger._host.new_stream(
                    ID.from_base58(node.local_peer_id), [DCUTR_PROTOCOL_ID]
                )
                await stream.write(b"\x08\x64")
            while node.relay.refused_hops < 1:
                await trio.sleep(0.05)
        assert node.path_to(stranger.local_peer_id)[0] == "direct"  # no new connection made


class _RelayedConn:
    def get_transport_addresses(self) -> list[str]:
        return ["/p2p/12D3KooWrelay/p2p-circuit/p2p/12D3KooWpeer"]


async def test_the_peers_remembered_as_once_relayed_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(libp2p_relay, "REMEMBERED_RELAYED", 8)
    async with open_libp2p_transport(NodeIdentity.from_seed(b"\x60" * 32), _LISTEN) as node:
        monkeypatch.setattr(node.relay, "_connections_to", lambda peer: [_RelayedConn()])
        for index in range(50):
            assert node.path_to(f"peer-{index}")[0] == "relayed"
        assert len(node.relay._was_relayed) == 8
        assert "peer-49" in node.relay._was_relayed and "peer-0" not in node.relay._was_relayed
