"""Transport benchmark: round trip and bulk throughput of each stream kind, side by side, in one
run and one process (client and server share a core budget, as on a busy node):
raw TCP (the ceiling), the libp2p control plane (Noise + yamux), the TLS data plane, and a whole
rpc tunnel: handed to its ends as to engines with our sealed transport (one TCP connection,
the ends sealing the records), relayed natively (TCP in, the data plane, TCP out), and by the
Python path. Headline: `tunnel_vs_tls_round_trip_ratio`, the handed tunnel's round trip over a
direct TLS connection's (issue 26 target: at most 1.3), both with Python ends."""

from __future__ import annotations

import os
import shutil
import statistics
import struct
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.transport.data_plane import DataPlane
from sharedllm.mesh.transport.engine_handoff import HandoffDesk
from sharedllm.mesh.transport.native_relay import NativeRelay
from sharedllm.mesh.transport.seam import MeshStream
from sharedllm.mesh.transport.tunnel import (
    TUNNEL,
    TunnelListener,
    TunnelRequest,
    serve_tunnel,
)
from sharedllm.mesh.transport.tunnel_stats import (
    TunnelStats,
)
from sharedllm.node.engine.native_build import native_relay_library

from .sealed_ends import ask_desk, handoff_service

PINGS = 400
BULK_BYTES = 64 * 1024 * 1024
CHUNK = 256 * 1024
Opener = Callable[[], Awaitable[MeshStream]]


class _TcpStream:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    @property
    def remote_peer(self) -> str:
        return "tcp"

    @property
    def remote_host(self) -> str | None:
        return None

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _serve(stream: MeshStream) -> None:
    """First byte picks the test: 'p' echoes 64-byte pings, 'b' sinks a counted bulk transfer."""
    mode = await stream.receive_some(1)
    if mode == b"p":
        for _ in range(PINGS):
            data = b""
            while len(data) < 64:
                data += await stream.receive_some(64 - len(data))
            await stream.send_all(data)
    elif mode == b"b":
        header = b""
        while len(header) < 8:
            header += await stream.receive_some(8 - len(header))
        remaining = struct.unpack(">Q", header)[0]
        while remaining > 0:
            remaining -= len(await stream.receive_some(CHUNK))
        await stream.send_all(b"k")


async def _measure(open_stream: Opener) -> dict[str, float]:
    stream = await open_stream()
    await stream.send_all(b"p")
    samples = []
    for _ in range(PINGS):
        started = time.perf_counter()
        await stream.send_all(b"x" * 64)
        got = b""
        while len(got) < 64:
            got += await stream.receive_some(64 - len(got))
        samples.append((time.perf_counter() - started) * 1e6)
    await stream.aclose()
    stream = await open_stream()
    block = b"\xab" * CHUNK
    started = time.perf_counter()
    await stream.send_all(b"b" + struct.pack(">Q", BULK_BYTES))
    for _ in range(BULK_BYTES // CHUNK):
        await stream.send_all(block)
    await stream.receive_some(1)
    seconds = time.perf_counter() - started
    await stream.aclose()
    return {"rtt_us_median": statistics.median(samples), "mb_per_s": BULK_BYTES / seconds / 1e6}


@asynccontextmanager
async def _raw_tcp() -> AsyncIterator[Opener]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), lambda s: _serve(_TcpStream(s)), 0
        )
        port = listeners[0].socket.getsockname()[1]

        async def opener() -> MeshStream:
            return _TcpStream(await trio.open_tcp_stream("127.0.0.1", port))

        yield opener
        nursery.cancel_scope.cancel()


def _members() -> list[tuple[NodeIdentity, Proof]]:
    mesh = MeshKey.generate(b"\x21" * 32)
    found = []
    for seed in (1, 2):
        identity = NodeIdentity.from_seed(bytes([seed]) * 32)
        found.append(
            (
                identity,
                Proof(certificate=Certificate.issue(mesh, identity.peer_id, "b", ["member"], 0.0)),
            )
        )
    return found


@asynccontextmanager
async def _data_plane() -> AsyncIterator[Opener]:
    (server_id, server_proof), (client_id, client_proof) = _members()
    mesh_key = server_proof.certificate.mesh_public_key if server_proof.certificate else b""
    server = DataPlane(server_id, server_proof, MembershipState(mesh_key).admit_encoded)
    client = DataPlane(client_id, client_proof, MembershipState(mesh_key).admit_encoded)
    server.serve("/bench", _serve)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run, ["127.0.0.1"], 0)

        async def opener() -> MeshStream:
            return await client.open_stream(server_id.peer_id, host, port, "/bench")

        yield opener
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _tunnel(native: NativeRelay | None, handed: bool = False) -> AsyncIterator[Opener]:
    """What llama-server's RPC traffic crosses: plain TCP into a tunnel listener, the data plane
    (with `native`, the native relay's sealed records; else TLS and compressed chunks from
    Python), and plain TCP out to the service on the far side. `handed`: the tunnel as engines
    with our sealed transport take it, the connection handed to both ends, which seal the
    records themselves (here in Python, as sealed_ends.py says)."""
    (server_id, server_proof), (client_id, client_proof) = _members()
    mesh_key = server_proof.certificate.mesh_public_key if server_proof.certificate else b""
    server = DataPlane(server_id, server_proof, MembershipState(mesh_key).admit_encoded)
    client = DataPlane(client_id, client_proof, MembershipState(mesh_key).admit_encoded)
    work = tempfile.mkdtemp(prefix="sharedllm-bench-")
    rpc_path, desk_path = f"{work}/rpc.sock", f"{work}/desk.sock"
    async with trio.open_nursery() as nursery, handoff_service(rpc_path, _serve):
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), lambda s: _serve(_TcpStream(s)), 0
        )
        service = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

        async def target(_request: TunnelRequest, _peer: str) -> str:
            return service

        serve = partial(
            serve_tunnel,
            target=target,
            stats=TunnelStats(),
            native=native,
            handoff=(lambda _endpoint: rpc_path) if handed else None,
        )
        server.serve(TUNNEL, serve)
        host, port = await nursery.start(server.run, ["127.0.0.1"], 0)

        async def open_data_stream() -> MeshStream:
            return await client.open_stream(server_id.peer_id, host, port, TUNNEL)

        request = TunnelRequest("rpc", "bench", 1)
        listener = TunnelListener(open_data_stream, request, native=native, rpc_commands=18)
        nursery.start_soon(listener.run)
        desk = HandoffDesk(desk_path, lambda _endpoint: listener, lambda: (os.getpid(),))
        nursery.start_soon(desk.run)

        async def opener() -> MeshStream:
            if handed:
                return await ask_desk(desk_path, listener.endpoint)
            return _TcpStream(await trio.open_tcp_stream("127.0.0.1", listener.port))

        yield opener
        nursery.cancel_scope.cancel()
    shutil.rmtree(work, ignore_errors=True)


@asynccontextmanager
async def _libp2p() -> AsyncIterator[Opener]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sharedllm.mesh.transport.libp2p_adapter import open_libp2p_transport

    (server_id, _), (client_id, _) = _members()
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        open_libp2p_transport(server_id, loopback) as server,
        open_libp2p_transport(client_id, loopback) as client,
    ):
        server.serve("/bench", _serve)
        await client.connect(server.listen_addrs()[0])

        async def opener() -> MeshStream:
            return await client.open_stream(server.local_peer_id, "/bench")

        yield opener


async def _run_all(native: NativeRelay) -> dict[str, dict[str, float]]:
    results = {}
    for name, setup in (
        ("raw_tcp", _raw_tcp),
        ("data_plane_tls", _data_plane),
        ("tunnel_handed", partial(_tunnel, native, handed=True)),
        ("tunnel_native", partial(_tunnel, native)),
        ("tunnel_python", partial(_tunnel, None)),
        ("libp2p_noise_yamux", _libp2p),
    ):
        async with setup() as opener:
            results[name] = await _measure(opener)
    return results


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        native = NativeRelay(native_relay_library(Path(cache)))
        results: dict[str, Any] = trio.run(_run_all, native)
    raw = results["raw_tcp"]
    mib = BULK_BYTES >> 20
    print(f"transport: {PINGS} x 64-byte round trips and {mib} MiB bulk, one process, loopback")
    print(f"  {'stream':<20} {'rtt us':>8} {'MB/s':>8} {'rtt vs raw':>11} {'MB/s vs raw':>12}")
    for name, figures in results.items():
        figures["rtt_ratio_vs_raw"] = figures["rtt_us_median"] / raw["rtt_us_median"]
        figures["throughput_ratio_vs_raw"] = figures["mb_per_s"] / raw["mb_per_s"]
        print(
            f"  {name:<20} {figures['rtt_us_median']:>8.0f} {figures['mb_per_s']:>8.0f} "
            f"{figures['rtt_ratio_vs_raw']:>11.2f} {figures['throughput_ratio_vs_raw']:>12.2f}"
        )
    tls = results["data_plane_tls"]["rtt_us_median"]
    ratio = round(results["tunnel_handed"]["rtt_us_median"] / tls, 2)
    relayed_ratio = round(results["tunnel_native"]["rtt_us_median"] / tls, 2)
    python_ratio = round(results["tunnel_python"]["rtt_us_median"] / tls, 2)
    print(
        f"  tunnel round trip vs a direct TLS connection's: handed to the engines "
        f"{ratio:.2f}x (target <= 1.3), natively relayed {relayed_ratio:.2f}x, "
        f"Python path {python_ratio:.2f}x"
    )
    results["tunnel_vs_tls_round_trip_ratio"] = ratio
    results["relayed_tunnel_vs_tls_round_trip_ratio"] = relayed_ratio
    results["python_tunnel_vs_tls_round_trip_ratio"] = python_ratio
    return results
