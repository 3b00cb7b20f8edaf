"""A stranger's flood of data-plane hellos against a real node: what it costs the node.

The stranger holds no credential of the mesh: a certificate of another mesh with a ~60 KB name
(or, knowing the mesh's public key from any token, one that names it with a bad signature). It
sends hellos from many loopback source addresses (127.0.0.0/8), so the per-address limit on
failed handshakes does not stop all of them and the caches behind it are exercised too. We
measure the node's RSS before and after, and how long `/health` takes while the flood runs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from sharedllm.mesh import records
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.mesh_store import load_mesh
from sharedllm.mesh.transport.framing import receive_frame, send_frame
from sharedllm.mesh.transport.tls_identity import tls_contexts
from sharedllm.mesh.transport.tls_socket import TlsSocket

from tests.node_process import start_node, wait_until_ready


@dataclass
class FloodResult:
    hellos: int
    refused: int  # hellos the node did not accept (all of them, unless something is wrong)
    seconds: float


class _Stream:
    """Just enough of a mesh stream for the framing helpers."""

    remote_peer = "flood"
    remote_host: str | None = None

    def __init__(self, tls: TlsSocket) -> None:
        self._tls = tls

    async def send_all(self, data: bytes) -> None:
        await self._tls.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._tls.receive_some(max_bytes)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._tls)


def bogus_hello(mesh_public_key: bytes | None, name_bytes: int) -> bytes:
    """A data-plane hello whose proof fails: another mesh's certificate, or (given the mesh's
    public key) one naming this mesh with a signature that is not the mesh key's."""
    stranger = NodeIdentity.from_seed(os.urandom(32))
    other = MeshKey.generate()
    certificate = Certificate.issue(other, stranger.peer_id, "x" * name_bytes, ["member"], 0.0)
    if mesh_public_key is not None:
        certificate = Certificate(
            mesh_public_key, stranger.peer_id, certificate.name, ("member",), 0.0, b"\x01" * 64
        )
    proof = Proof(certificate=certificate).encode()
    return records.encode("data-hello", [stranger.peer_id, proof, b"\x00" * 64, "/bench"])


async def flood(
    host: str, port: int, count: int, hello: bytes, *, sources: int = 1000, parallel: int = 16
) -> FloodResult:
    client = tls_contexts(NodeIdentity.from_seed(b"\x99" * 32))[1]
    result = FloodResult(count, 0, 0.0)
    started = time.monotonic()
    limiter = trio.CapacityLimiter(parallel)

    async def one(index: int) -> None:
        source = f"127.{1 + index % sources // 250}.{index % 250}.{2 + index % 200}"
        async with limiter:
            try:
                with trio.fail_after(10):
                    tcp = await trio.open_tcp_stream(host, port, local_address=source)
                    tls = TlsSocket.wrap(tcp, client, server_side=False)
                    stream = _Stream(tls)
                    try:
                        await tls.do_handshake()
                        await receive_frame(stream, 10)
                        await send_frame(stream, hello)
                        await receive_frame(stream, 10)
                    finally:
                        await stream.aclose()
            except Exception:  # noqa: BLE001 - every refusal counts the same here
                result.refused += 1

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    result.seconds = time.monotonic() - started
    return result


def measure(count: int, name_bytes: int = 60_000) -> dict[str, Any]:
    """Starts a node, floods it, and returns RSS growth and /health latencies."""
    with tempfile.TemporaryDirectory() as tmp:
        node = start_node(Path(tmp), "--name", "target", "--no-model", wait_ready=False)
        try:
            wait_until_ready(node, 60, serving=False)
            view = httpx.get(node.api_url + "/mesh/peers", timeout=10).json()
            host, port = next(p for p in view["peers"] if p["state"] == "self")["data_addrs"][0]
            mesh_key = load_mesh(Path(tmp) / "data").mesh_public_key
            process = psutil.Process(node.process.pid)
            time.sleep(2)
            before = process.memory_info().rss
            health: list[float] = []
            results: dict[str, Any] = {}

            async def run() -> None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_health, node.api_url, health, nursery.cancel_scope)
                    half = count // 2
                    results["other_mesh"] = await flood(
                        host, port, half, bogus_hello(None, name_bytes)
                    )
                    results["bad_signature"] = await flood(
                        host, port, count - half, bogus_hello(mesh_key, 100)
                    )
                    nursery.cancel_scope.cancel()

            trio.run(run)
            time.sleep(1)
            after = process.memory_info().rss
            alive = node.process.poll() is None
            counted = httpx.get(node.api_url + "/mesh/peers", timeout=10).json()
        finally:
            node.stop()
    return {
        "hellos": count,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "rss_growth_mib": (after - before) / 2**20,
        "health_max_s": max(health, default=None),
        "health_median_s": statistics.median(health) if health else None,
        "health_checks": len(health),
        "refused": sum(r.refused for r in results.values()),
        "closed_over_limit": counted["data_plane_refused"],
        "failed_handshakes": counted["data_plane_refused_handshakes"],
        "flood_seconds": sum(r.seconds for r in results.values()),
        "node_alive": alive,
    }


async def _watch_health(url: str, samples: list[float], _scope: trio.CancelScope) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            started = time.monotonic()
            await client.get(url + "/health")
            samples.append(time.monotonic() - started)
            await trio.sleep(0.25)


def run() -> dict[str, Any]:
    count = int(os.environ.get("SHAREDLLM_FLOOD_COUNT", "20000"))
    print(f"hello flood: {count} bogus data-plane hellos from up to 1000 loopback addresses")
    result = measure(count)
    print(
        f"  RSS {result['rss_before_mib']:.0f} -> {result['rss_after_mib']:.0f} MiB "
        f"(growth {result['rss_growth_mib']:.1f} MiB, target <= 20); /health max "
        f"{result['health_max_s']:.2f} s over {result['health_checks']} checks (target < 1 s); "
        f"{result['failed_handshakes']} failed authentication, {result['closed_over_limit']} "
        f"closed at once over the per-address limit; {result['flood_seconds']:.0f} s"
    )
    return {**result, "hello_flood_rss_growth_mib": result["rss_growth_mib"]}
