"""Tunnels over the real TLS data plane with the native relay: both ends agree to go native
(TLS ends cleanly, the relay takes the sockets), bytes and half-closes cross both ways, RPC
requests are still counted; with the relay on one end only the Python path carries them; a
hostile offer is refused."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from sharedllm.mesh import records
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.transport.data_plane import DataPlane
from sharedllm.mesh.transport.framing import receive_frame, send_frame
from sharedllm.mesh.transport.native_relay import NativeRelay
from sharedllm.mesh.transport.seam import MeshStream
from sharedllm.mesh.transport.tunnel import TUNNEL, TunnelListener, TunnelRequest, serve_tunnel
from sharedllm.mesh.transport.tunnel_stats import TunnelStats
from sharedllm.node.engine.native_build import native_relay_library

MESH = MeshKey.generate(b"\x31" * 32)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native_relay_library(Path(tmp_path_factory.mktemp("cache")))


def _plane(seed: int) -> DataPlane:
    identity = NodeIdentity.from_seed(bytes([seed]) * 32)
    proof = Proof(certificate=Certificate.issue(MESH, identity.peer_id, "n", ["member"], 0.0))
    return DataPlane(identity, proof, MembershipState(MESH.public_key).admit_encoded)


async def _echo_upper(stream: trio.SocketStream) -> None:
    """The far service: answers every read in upper case, and half-closes when the client
    has."""
    while data := await stream.receive_some(65536):
        await stream.send_all(bytes(data).upper())
    await stream.send_eof()


@asynccontextmanager
async def _tunnel(
    opener_native: NativeRelay | None,
    answer_native: NativeRelay | None,
    service: str = "rpc",
) -> AsyncIterator[tuple[int, TunnelStats, TunnelStats, DataPlane, tuple[str, int]]]:
    server, client = _plane(1), _plane(2)
    far_stats = TunnelStats()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), _echo_upper, 0)
        endpoint = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

        async def target(_request: TunnelRequest, _peer: str) -> str:
            return endpoint

        serve = partial(serve_tunnel, target=target, stats=far_stats, native=answer_native)
        server.serve(TUNNEL, serve)
        host, port = await nursery.start(server.run, ["127.0.0.1"], 0)

        async def open_stream() -> MeshStream:
            return await client.open_stream(server.identity.peer_id, host, port, TUNNEL)

        listener = TunnelListener(
            open_stream, TunnelRequest(service, "m", 1), native=opener_native, rpc_commands=18
        )
        nursery.start_soon(listener.run)
        yield listener.port, listener.stats, far_stats, client, (host, port)
        nursery.cancel_scope.cancel()


async def _exchange(port: int, messages: list[bytes]) -> bytes:
    """Sends each message and waits for its answer (a round trip each), then half-closes and
    reads to the end: what came back."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answers = bytearray()
    for message in messages:
        await stream.send_all(message)
        while len(answers) < sum(len(m) for m in messages[: messages.index(message) + 1]):
            answers += await stream.receive_some(65536)
    await stream.send_eof()
    while data := await stream.receive_some(65536):
        answers += data
    await stream.aclose()
    return bytes(answers)


def _rpc(command: int, payload: bytes) -> bytes:
    return bytes([command]) + struct.pack("<Q", len(payload)) + payload


@pytest.mark.parametrize("service", ["rpc", "api"])
async def test_both_ends_with_the_relay_go_native_and_count(library: Path, service: str) -> None:
    messages = [_rpc(14, b""), _rpc(16, b"graph" * 20), b"x" * 300_000, _rpc(16, b"again")]
    relays = NativeRelay(library), NativeRelay(library)
    async with _tunnel(*relays, service) as (port, near, far, *_):
        with trio.fail_after(30):
            answers = await _exchange(port, messages)
            while far.as_dict()["bytes_back"] < len(answers):  # the far relay's last count
                await trio.sleep(0.01)
    assert answers == b"".join(messages).upper()
    assert near.native_connections == 1 and far.native_connections == 1
    sent = sum(len(m) for m in messages)
    # both ends count "out" as the opener sent it
    assert near.as_dict()["bytes_out"] == sent == far.as_dict()["bytes_out"]
    assert near.as_dict()["bytes_back"] == len(answers) == far.as_dict()["bytes_back"]
    assert near.as_dict()["round_trips"] >= 3
    counts = near.native_rpc_counts()
    assert counts[14] == (1, 0) and counts[16][0] >= 1  # parsing stops at the raw bytes


@pytest.mark.parametrize("which", ["opener", "answerer"])
async def test_the_python_path_carries_what_cannot_go_native(library: Path, which: str) -> None:
    opener = None if which == "answerer" else NativeRelay(library)
    answerer = None if which == "opener" else NativeRelay(library)
    async with _tunnel(opener, answerer) as (port, near, far, *_):
        with trio.fail_after(30):
            answers = await _exchange(port, [b"hello", b"world" * 1000])
    assert answers == (b"hello" + b"world" * 1000).upper()
    assert near.native_connections == 0 and far.native_connections == 0
    assert near.connections == 1


@pytest.mark.parametrize("offer", [b"short", b"x" * 33])
async def test_an_offer_of_the_wrong_size_is_refused(library: Path, offer: bytes) -> None:
    async with _tunnel(None, NativeRelay(library)) as (_, _, far, client, (host, port)):
        stream = await client.open_stream(_plane(1).identity.peer_id, host, port, TUNNEL)
        request = records.encode("tunnel-open", ["rpc", "m", 1, offer])
        await send_frame(stream, request)
        answer = await receive_frame(stream)
        await stream.aclose()
    assert answer != b"ok" and not answer.startswith(b"ok-native")
    assert far.connections == 0
