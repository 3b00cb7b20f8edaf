"""Tunnels handed to the engine: a real llama-server and ggml-rpc-server of our build seal the
records themselves over the real TLS data plane's connection. Either end may hand its tunnel to
its engine or relay it natively (the wire is the same), the answer is the same whichever, the
engine counts what crosses into the node's stats, and a fenced tunnel is cut."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.transport.data_plane import DataPlane
from sharedllm.mesh.transport.engine_handoff import HandoffDesk, engine_env, hand_to_rpc_server
from sharedllm.mesh.transport.native_relay import (
    NativeRelay,
    NativeRelayError,
    RelayCounters,
    TunnelKeys,
)
from sharedllm.mesh.transport.seam import MeshStream
from sharedllm.mesh.transport.tunnel import TUNNEL, TunnelListener, TunnelRequest, serve_tunnel
from sharedllm.mesh.transport.tunnel_stats import TunnelStats
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port
from sharedllm.node.engine.native_build import native_relay_library
from sharedllm.node.engine.rpc_traffic import COMMANDS
from sharedllm.node.engine.sealed_patch import SEALED_PATCH_NAME

pytestmark = pytest.mark.integration
MESH = MeshKey.generate(b"\x41" * 32)
_BASE_ENV = {"PATH": os.environ.get("PATH", ""), "GGML_RPC_NO_RDMA": "1"}


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> NativeRelay:
    return NativeRelay(native_relay_library(Path(tmp_path_factory.mktemp("cache"))))


@pytest.fixture
def sealing_engine(engine: EngineInfo) -> EngineInfo:
    assert SEALED_PATCH_NAME in engine.changes.split(","), "the engine we build seals tunnels"
    return engine


def _plane(seed: int) -> DataPlane:
    identity = NodeIdentity.from_seed(bytes([seed]) * 32)
    proof = Proof(certificate=Certificate.issue(MESH, identity.peer_id, "n", ["member"], 0.0))
    return DataPlane(identity, proof, MembershipState(MESH.public_key).admit_encoded)


class _Split:
    """The primary's and the worker's nodes' views of one tunnel, and the engines' output."""

    def __init__(self, listener: TunnelListener, far: TunnelStats, desk: HandoffDesk) -> None:
        self.listener, self.far, self.desk = listener, far, desk
        self.api_port = free_loopback_port()


@asynccontextmanager
async def _split(
    engine: EngineInfo,
    native: NativeRelay,
    model: Path,
    work: Path,
    *,
    primary_hands: bool,
    worker_hands: bool,
) -> AsyncIterator[_Split]:
    """A worker's rpc-server behind a data plane, and a primary's llama-server whose only
    device is that rpc-server, reached through a tunnel."""
    rpc_port = free_loopback_port()
    rpc_handoff = work / f"rpc-{rpc_port}.sock"
    server, client = _plane(1), _plane(2)
    far = TunnelStats()

    async def target(_request: TunnelRequest, _peer: str) -> str:
        return f"127.0.0.1:{rpc_port}"

    def handoff_of(_endpoint: str) -> str | None:
        return str(rpc_handoff) if worker_hands and rpc_handoff.exists() else None

    engine_pids: list[int] = []
    log = (work / "engines.log").open("ab")
    async with trio.open_nursery() as nursery:
        rpc_env = {**_BASE_ENV, **(engine_env(str(rpc_handoff)) if worker_hands else {})}
        rpc_argv = [str(engine.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1"]
        rpc = await trio.lowlevel.open_process(rpc_argv, env=rpc_env, stdout=log, stderr=log)
        server.serve(
            TUNNEL,
            partial(serve_tunnel, target=target, stats=far, native=native, handoff=handoff_of),
        )
        host, port = await nursery.start(server.run, ["127.0.0.1"], 0)

        async def open_stream() -> MeshStream:
            return await client.open_stream(server.identity.peer_id, host, port, TUNNEL)

        listener = TunnelListener(
            open_stream, TunnelRequest("rpc", "m", 1), native=native, rpc_commands=len(COMMANDS)
        )
        nursery.start_soon(listener.run)
        desk = HandoffDesk(
            str(work / "engine-handoff.sock"), lambda _e: listener, lambda: engine_pids
        )
        nursery.start_soon(desk.run)
        with trio.fail_after(30):  # the rpc-server listens (its handoff socket comes last)
            while not (rpc_handoff.exists() if worker_hands else await _listens(rpc_port)):
                await trio.sleep(0.02)
        split = _Split(listener, far, desk)
        llama_env = {**_BASE_ENV, **(engine_env(desk.path) if primary_hands else {})}
        llama_argv = [
            str(engine.llama_server),
            *("--host", "127.0.0.1", "--port", str(split.api_port), "--model", str(model)),
            *("--rpc", listener.endpoint, "--n-gpu-layers", "99", "--ctx-size", "256"),
            *("--no-webui", "--threads", "1"),
        ]
        llama = await trio.lowlevel.open_process(llama_argv, env=llama_env, stdout=log, stderr=log)
        engine_pids.append(llama.pid)
        try:
            yield split
        finally:
            for process in (llama, rpc):
                process.terminate()
                with trio.move_on_after(30):
                    await process.wait()
            log.close()
            nursery.cancel_scope.cancel()


async def _listens(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def _complete(api_port: int) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{api_port}"
        with trio.fail_after(120):
            while True:
                try:
                    if (await http.get(f"{url}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
        body = {"prompt": "Hello world", "n_predict": 8, "temperature": 0}
        answer = await http.post(f"{url}/completion", json=body)
        answer.raise_for_status()
        return str(answer.json()["content"])


@pytest.mark.parametrize("ends", [(True, True), (True, False), (False, True), (False, False)])
async def test_either_end_hands_its_tunnel_to_its_engine_and_the_answer_is_the_same(
    sealing_engine: EngineInfo,
    native: NativeRelay,
    tiny_model: Path,
    tmp_path: Path,
    ends: tuple[bool, bool],
) -> None:
    primary_hands, worker_hands = ends
    async with _split(
        sealing_engine,
        native,
        tiny_model,
        tmp_path,
        primary_hands=primary_hands,
        worker_hands=worker_hands,
    ) as split:
        text = await _complete(split.api_port)
        near, far = split.listener.stats.as_dict(), split.far.as_dict()
        counted = split.listener.stats.native_rpc_counts()
    (tmp_path / "relayed").mkdir()
    async with _split(
        sealing_engine,
        native,
        tiny_model,
        tmp_path / "relayed",
        primary_hands=False,
        worker_hands=False,
    ) as relayed:
        assert await _complete(relayed.api_port) == text
    # llama-server opens several connections (a probe of the device, then the device's own).
    assert near["connections"] == far["connections"] > 0
    assert near["native_connections"] == far["native_connections"] == near["connections"]
    assert near["handed_connections"] == (near["connections"] if primary_hands else 0)
    assert far["handed_connections"] == (far["connections"] if worker_hands else 0)
    # The engine counted what crossed as the relay would have: requests, both ways.
    assert near["bytes_out"] > 0 and near["bytes_back"] > 0 and near["round_trips"] > 0
    assert far["bytes_out"] > 0 and far["bytes_back"] > 0
    graph_compute = COMMANDS.index("GRAPH_COMPUTE")
    assert counted.get(graph_compute, (0, 0))[0] >= 1


async def _hello(stream: trio.SocketStream) -> bytes:
    """llama.cpp RPC's HELLO: the server's protocol version, as it answers it."""
    await stream.send_all(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
    answer = b""
    with trio.fail_after(30):
        while len(answer) < 8 + 28:
            answer += await stream.receive_some(64)
    return answer[8:11]


async def _handed_session(
    path: Path, native: NativeRelay, stats: TunnelStats, *, cut: bool
) -> bytes | None:
    """Hands the rpc-server at `path` a tunnel whose other end the node's relay seals, and says
    HELLO through it; or, with `cut`, cuts the tunnel once handed, as a fenced primary's is.
    The server's version, or None where the tunnel was cut."""
    fence = trio.CancelScope()
    engine_end, relay_end = socket.socketpair()
    local, client = socket.socketpair()
    for end in (relay_end, local, client):
        end.setblocking(False)
    secrets = (b"\x01" * 32, b"\x02" * 32)

    async def relay() -> None:
        keys = TunnelKeys.derive(*secrets, opener=True)
        with contextlib.suppress(NativeRelayError):  # the cut peer: an end without its record
            await native.relay(local, relay_end, keys, RelayCounters())
        local.close()
        relay_end.close()

    async def handed() -> None:
        with fence:
            keys = TunnelKeys.derive(*secrets, opener=False)
            await hand_to_rpc_server(str(path), engine_end, keys, stats)

    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handed)
        nursery.start_soon(relay)
        if cut:
            with trio.fail_after(30):
                while stats.handed_connections == 0:
                    await trio.sleep(0.01)
                fence.cancel()
                answer = await stream.receive_some(64)  # the cut reaches this end
            await stream.aclose()
            return answer or None
        version = await _hello(stream)
        await stream.aclose()  # the relay ends its direction; the rpc-server closes
    return version


async def _hostile_peer(path: Path, records: bytes) -> bytes:
    """Hands the rpc-server a tunnel whose peer sends `records` (forged, oversized, ...);
    what the peer then receives before the tunnel ends."""
    engine_end, peer_end = socket.socketpair()
    peer_end.setblocking(False)
    keys = TunnelKeys.derive(b"\x03" * 32, b"\x04" * 32, opener=False)
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(peer_end))
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hand_to_rpc_server, str(path), engine_end, keys, TunnelStats())
        await peer.send_all(records)
        with trio.fail_after(30):  # the engine ends the tunnel, and the node shuts it down
            try:
                while got := await peer.receive_some(65536):
                    received += got
            except trio.BrokenResourceError:
                pass  # ended with our records unread: a reset
    await peer.aclose()
    return received


async def test_an_rpc_server_survives_bad_handoffs_and_a_cut_and_serves_on(
    sealing_engine: EngineInfo, native: NativeRelay, tmp_path: Path
) -> None:
    """Garbage, a short message, no connection, a connection it cannot open: each is dropped;
    a peer that sends an impossible length, a record too short to hold a tag or a forged record
    sees the tunnel end; a tunnel cut by the node (a fenced primary) ends; a handoff after all
    of them is served."""
    path = tmp_path / "rpc.sock"
    rpc_port = free_loopback_port()
    argv = [str(sealing_engine.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1"]
    env = {**_BASE_ENV, **engine_env(str(path))}
    with (tmp_path / "rpc.log").open("ab") as log:
        rpc = await trio.lowlevel.open_process(argv, env=env, stdout=log, stderr=log)
    try:
        with trio.fail_after(30):
            while not path.exists():
                await trio.sleep(0.02)
        for bad in (b"junk" * 40, b"SLH1\x01", b"SLH1\x01\x00" + bytes(64), b""):
            with socket.socket(socket.AF_UNIX) as unix:
                unix.connect(str(path))
                unix.sendall(bad)
        forged = (32).to_bytes(4, "big") + bytes(32)  # a record whose tag is wrong
        for hostile in (b"\x7f\xff\xff\xff" + bytes(64), b"\x00\x00\x00\x01", forged):
            assert await _hostile_peer(path, hostile) == b""
        stats = TunnelStats()
        assert await _handed_session(path, native, stats, cut=True) is None
        version = await _handed_session(path, native, stats, cut=False)
        assert version is not None
        assert version[0] == int(sealing_engine.rpc_protocol.split(".")[0])
        assert stats.as_dict()["handed_connections"] == 2
        assert stats.as_dict()["bytes_out"] > 0
        assert rpc.returncode is None
    finally:
        rpc.terminate()
        with trio.move_on_after(30):
            await rpc.wait()
