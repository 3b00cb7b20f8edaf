"""Weights from peers over the real TLS data plane: a worker without the model file gets the
same cache entries a holder would write from the file, resumes after a dropped stream, throws
away what does not match its name, and a holder refuses what it cannot answer."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.membership import Certificate, MeshKey, Proof
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.records import RecordError
from sharedllm.mesh.transport.data_plane import DataPlane
from sharedllm.mesh.transport.framing import receive_frame, send_frame
from sharedllm.mesh.transport.seam import MeshStream, TransportError
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import find_engine
from sharedllm.node.models.gguf_header import read_header
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model
from sharedllm.node.weights.cache import cached_layer_tensors, fill_cache
from sharedllm.node.weights.fetch import WeightFetch
from sharedllm.node.weights.native_hash import NativeFnv
from sharedllm.node.weights.share import WeightShare
from sharedllm.node.weights.share_wire import (
    WEIGHTS,
    TokenBucket,
    WeightRequest,
    WeightShareError,
    decode_manifest,
    decode_tensor_answer,
)

from .node_process import invite_token, node_command, start_node, wait_until_ready

MESH = MeshKey.generate(b"\x21" * 32)
SHAPE = ModelShape(blocks=2, embedding=2048, feed_forward=4096, heads=16, kv_heads=16)
MIB = 1024 * 1024
CAP = "400MiB"  # with 256 MiB of compute buffers a node, the 163 MiB model needs both


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("models") / "wide.gguf", SHAPE)


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> NativeFnv:
    return NativeFnv(tmp_path_factory.mktemp("native"))


def _plane(seed: int) -> DataPlane:
    identity = NodeIdentity.from_seed(bytes([seed]) * 32)
    cert = Certificate.issue(MESH, identity.peer_id, f"n{seed}", ["member"], 0.0)
    return DataPlane(
        identity, Proof(certificate=cert), MembershipState(MESH.public_key).admit_encoded
    )


class _CutAfter:
    """A stream that breaks after sending `limit` bytes (a link that drops mid-transfer)."""

    def __init__(self, stream: MeshStream, limit: int) -> None:
        self._stream, self._left = stream, limit

    @property
    def remote_peer(self) -> str:
        return self._stream.remote_peer

    @property
    def remote_host(self) -> str | None:
        return self._stream.remote_host

    async def send_all(self, data: bytes) -> None:
        if len(data) > self._left:
            await self._stream.send_all(data[: self._left])
            await self._stream.aclose()
            raise TransportError("link dropped")
        self._left -= len(data)
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def _holder(
    share: WeightShare, fnv: NativeFnv, cuts: list[int] | None = None
) -> AsyncIterator[WeightFetch]:
    """A holder serving `share` on loopback; yields a fetch of layers 0-1 into a fresh dir
    (the caller sets `entries`). Each number in `cuts` breaks one more stream after that many
    bytes."""
    server, client = _plane(1), _plane(2)
    pending_cuts = list(cuts or [])

    async def handler(stream: MeshStream) -> None:
        if pending_cuts:
            await share.serve(_CutAfter(stream, pending_cuts.pop(0)))
        else:
            await share.serve(stream)

    server.serve(WEIGHTS, handler)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run, ["127.0.0.1"], 0)
        holder = server.identity.peer_id

        async def open_stream(peer: str) -> MeshStream:
            return await client.open_stream(peer, host, port, WEIGHTS)

        yield WeightFetch(open_stream, [holder], "wide", 0, 1, Path("unset"), fnv)
        nursery.cancel_scope.cancel()


def _entries(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if len(p.name) == 16}


async def test_a_fetch_writes_the_entries_the_file_gives(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    from_file = tmp_path / "from-file"
    fill_cache(from_file, big_model, cached_layer_tensors(big_model, 0, 1), fnv)
    share = WeightShare({"wide": big_model}, tmp_path / "holder", rate_mbps=0)
    async with _holder(share, fnv) as fetch:
        fetch.entries = tmp_path / "fetched"
        report = await fetch.run()
        assert report.fetched == report.tensors == 6  # three 16 MiB feed-forward tensors a block
        assert _entries(fetch.entries) == _entries(from_file)
        again = await WeightFetch(
            fetch.open_stream, fetch.holders, "wide", 0, 1, fetch.entries, fnv
        ).run()
        assert again.already_cached == 6 and again.bytes_received == 0
    print(f"\nfetched {report.summary()}")


async def test_a_dropped_stream_resumes_where_it_stopped(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    share = WeightShare({"wide": big_model}, tmp_path / "holder", rate_mbps=0)
    async with _holder(share, fnv, cuts=[1 * MIB, 5 * MIB, 3 * MIB]) as fetch:
        fetch.entries, fetch.retry_s = tmp_path / "fetched", 0.01
        report = await fetch.run()
    assert report.resumed >= 2
    tensor_bytes = 6 * 16 * MIB
    assert report.bytes_received <= tensor_bytes + MIB  # nothing fetched twice beyond the cut
    from_file = tmp_path / "from-file"
    fill_cache(from_file, big_model, cached_layer_tensors(big_model, 0, 1), fnv)
    assert _entries(fetch.entries) == _entries(from_file)
    assert not list(fetch.entries.glob("*.part"))


async def test_a_part_that_does_not_match_its_name_is_thrown_away(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    share = WeightShare({"wide": big_model}, tmp_path / "holder", rate_mbps=0)
    entries = tmp_path / "fetched"
    async with _holder(share, fnv) as fetch:
        fetch.entries = entries
        manifest = await share.manifest("wide", 0, 1)
        entries.mkdir()
        # A part left by an earlier fetch, full length but with wrong bytes
        (entries / f"{manifest[0].entry}.part").write_bytes(b"\x55" * manifest[0].size)
        report = await fetch.run()
    assert report.rejected == 1 and report.fetched == 6
    assert (entries / manifest[0].entry).stat().st_size == manifest[0].size


async def test_the_holder_refuses_what_it_cannot_answer(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    share = WeightShare({"wide": big_model}, tmp_path / "holder", rate_mbps=0)
    async with _holder(share, fnv) as fetch:
        for request in (
            WeightRequest("manifest", "other-model", 0, 1),
            WeightRequest("tensor", "wide", 0, 1, "0123456789abcdef", 0),
        ):
            stream = await fetch.open_stream(fetch.holders[0])
            await send_frame(stream, request.encode())
            answer = await receive_frame(stream)
            await stream.aclose()
            with pytest.raises(WeightShareError):
                if request.kind == "manifest":
                    decode_manifest(answer)
                else:
                    decode_tensor_answer(answer)
        fetch.model_id, fetch.attempts, fetch.retry_s = "other-model", 2, 0.01
        fetch.entries = tmp_path / "fetched"
        with pytest.raises(WeightShareError, match="does not hold other-model"):
            await fetch.run()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_raise_only_their_errors(data: bytes) -> None:
    for decode in (WeightRequest.decode, decode_manifest, decode_tensor_answer):
        with suppress(RecordError, WeightShareError):
            decode(data)


@given(
    st.floats(min_value=1e3, max_value=1e9),
    st.lists(st.integers(min_value=1, max_value=10 * MIB), min_size=1, max_size=50),
)
def test_the_bucket_keeps_to_its_rate(rate: float, sizes: list[int]) -> None:
    """Bytes booked back to back may not finish sooner than the rate allows after the burst."""
    burst = 4 * MIB
    bucket = TokenBucket(rate, burst)
    now = 0.0
    for size in sizes:
        now += bucket.reserve(size, now)
    assert now >= (sum(sizes) - burst) / rate - 1e-6
    assert now <= sum(sizes) / rate + 1e-6


def test_an_unpaced_bucket_never_waits() -> None:
    assert TokenBucket(0, 0).reserve(10**9, 5.0) == 0.0


def _cli_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [node_command(), *args, "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _own_cache(cache: Path) -> dict[str, str]:
    """A cache of the node's own (nothing from earlier runs), with the engine built before."""
    engine = find_engine(default_cache_dir(), None)
    engine_dir = str(engine.rpc_server.parent)
    return {"SHAREDLLM_CACHE_DIR": str(cache), "SHAREDLLM_ENGINE_DIR": engine_dir}


def _layer_bytes(model: Path, first: int, last: int) -> int:
    blocks = tuple(f"blk.{layer}." for layer in range(first, last + 1))
    return sum(t.n_bytes for t in read_header(model).tensors if t.name.startswith(blocks))


def test_a_worker_without_the_file_fetches_its_layers_before_the_load(
    tmp_path: Path, big_model: Path
) -> None:
    """Real nodes: b offers no model, a's cap makes the model need b; b gets its layers' big
    tensors from a before a's llama-server loads, so the load sends hashes, not weights."""
    holder = start_node(
        tmp_path / "a",
        *("--name", "a", "--model", str(big_model), "--max-memory", CAP),
        *("--context-size", "256"),
        wait_ready=False,
    )
    worker = None
    try:
        wait_until_ready(holder, 120, serving=False)
        token = invite_token(tmp_path / "a" / "data")
        worker = start_node(
            tmp_path / "b",
            *("--name", "b", "--join", token, "--no-model", "--max-memory", CAP),
            wait_ready=False,
            env=_own_cache(tmp_path / "b" / "cache"),
        )
        wait_until_ready(holder, 300)
        placement = _cli_json("status", "--data-dir", str(tmp_path / "a" / "data"))["models"][
            "wide"
        ]
        (tunnel,) = placement["tunnels"].values()
        fetched = re.search(r"weights for layers (\d+)-(\d+) from peers: (.*)", worker.log())
        assert fetched is not None, worker.log()
        first, last = int(fetched.group(1)), int(fetched.group(2))
        big = sum(s.size for s in cached_layer_tensors(big_model, first, last))
        small = _layer_bytes(big_model, first, last) - big  # the engine always sends these
        print(f"\nworker fetched layers {first}-{last}: {fetched.group(3)}")
        print(
            f"the load sent {tunnel['bytes_out'] / 1e6:.1f} MB through the worker's tunnel "
            f"({small / 1e6:.1f} MB of tensors under the hash threshold, {big / 1e6:.1f} MB over)"
        )
        assert f"{big // (16 * MIB)} fetched" in fetched.group(3)
        assert "weights from peers: 100%" in worker.log()  # progress, in the log
        assert tunnel["bytes_out"] < small + 2 * MIB  # no big tensor crossed the tunnel
        answer = httpx.post(
            holder.api_url + "/v1/completions",
            json={"model": "wide", "prompt": "Hello", "max_tokens": 2},
            timeout=120,
        )
        assert answer.status_code == 200
    finally:
        holder.stop()
        if worker is not None:
            worker.stop()
