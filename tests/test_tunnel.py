"""Tunnels: the chunk codec (round trip, any split of the byte stream, hostile input), and real
loopback connections carried through a stream pair both ways with half-close and byte counts."""

from __future__ import annotations

import contextlib
import os
from functools import partial

import pytest
import trio
import trio.testing
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.transport.framing import FrameError
from sharedllm.mesh.transport.seam import TransportError
from sharedllm.mesh.transport.tunnel import (
    TunnelListener,
    TunnelRefused,
    TunnelRequest,
    open_tunnel,
    serve_tunnel,
)
from sharedllm.mesh.transport.tunnel_codec import (
    MAX_CHUNK,
    MAX_WIRE_CHUNK,
    ChunkDecoder,
    Packer,
    Unpacker,
    encode_chunk,
)
from sharedllm.mesh.transport.tunnel_stats import (
    TunnelStats,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=10),
)
def test_chunks_survive_any_split_of_the_stream(chunks: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_chunk(c) for c in chunks) + encode_chunk(b"")
    decoder = ChunkDecoder()
    found: list[bytes | None] = []
    position, index = 0, 0
    while position < len(wire):
        step = cuts[index % len(cuts)]
        found += decoder.feed(wire[position : position + step])
        position += step
        index += 1
    assert found == [*chunks, None] and decoder.ended


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_hostile_bytes_decode_or_fail_with_our_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        ChunkDecoder().feed(data)


def test_oversized_chunk_is_refused_before_buffering() -> None:
    decoder = ChunkDecoder()
    try:
        decoder.feed((MAX_WIRE_CHUNK + 1).to_bytes(4, "big"))
    except FrameError as err:
        assert "over" in str(err)
    else:
        raise AssertionError("an oversized chunk was accepted")


def test_request_round_trip() -> None:
    request = TunnelRequest("rpc", "model-a", 7)
    assert TunnelRequest.decode(request.encode()) == request


class _MemoryMeshStream:
    """One end of an in-memory stream pair, as a MeshStream."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self._stream = stream
        self.remote_peer = peer
        self.remote_host: str | None = None

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise TransportError(str(err)) from None

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self._stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise TransportError(str(err)) from None

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _echo_upper(stream: trio.SocketStream) -> None:
    """A loopback service that answers in capitals and closes after the client's end."""
    received = b""
    while data := await stream.receive_some(65536):
        received += data
    await stream.send_all(received.upper())
    await stream.aclose()


@pytest.mark.parametrize(
    "payload",
    [b"hello tunnel " * 50_000, os.urandom(1_500_000)],  # several chunks; and incompressible
    ids=["text", "random"],
)
async def test_a_loopback_connection_crosses_the_tunnel_with_half_close(payload: bytes) -> None:
    server_stats = TunnelStats()
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, host="127.0.0.1")
        service = (await nursery.start(serve, _echo_upper, 0))[0]
        service_port = service.socket.getsockname()[1]

        async def target(request: TunnelRequest, peer: str) -> str:
            if peer != "primary" or request.service != "rpc":
                raise TunnelRefused("not for you")
            return f"127.0.0.1:{service_port}"

        async def open_stream() -> _MemoryMeshStream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(
                serve_tunnel, _MemoryMeshStream(theirs, "primary"), target, server_stats
            )
            return _MemoryMeshStream(ours, "worker")

        listener = TunnelListener(open_stream, TunnelRequest("rpc", "m", 1))
        nursery.start_soon(listener.run)
        client = await trio.open_tcp_stream("127.0.0.1", listener.port)
        await client.send_all(payload)
        await client.send_eof()  # half-close: the service answers only after our end
        answer = b""
        with trio.fail_after(10):
            while data := await client.receive_some(65536):
                answer += data
        assert answer == payload.upper()
        assert listener.stats.bytes_out == len(payload)
        assert listener.stats.bytes_back == len(payload)
        assert listener.stats.round_trips == 1
        assert server_stats.bytes_back == len(payload)  # the far side counts its own direction
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_refused_tunnel_reports_why() -> None:
    async def target(request: TunnelRequest, peer: str) -> str:
        raise TunnelRefused(f"{peer} is not the primary")

    async with trio.open_nursery() as nursery:

        async def open_stream() -> _MemoryMeshStream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(
                serve_tunnel, _MemoryMeshStream(theirs, "intruder"), target, TunnelStats()
            )
            return _MemoryMeshStream(ours, "worker")

        try:
            await open_tunnel(open_stream, TunnelRequest("rpc", "m", 1))
        except TunnelRefused as err:
            assert "intruder is not the primary" in str(err)
        else:
            raise AssertionError("the tunnel opened")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=4096),
            st.builds(
                lambda n, b: b * n,
                st.integers(1, MAX_CHUNK // 16),
                st.binary(min_size=16, max_size=16),
            ),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_compressed_chunks_come_out_as_they_went_in(chunks: list[bytes]) -> None:
    packer, unpacker = Packer(), Unpacker()
    for chunk in chunks:
        assert unpacker.unpack(packer.pack(chunk)) == chunk


def test_full_chunks_that_do_not_compress_still_fit_on_the_wire() -> None:
    packer, unpacker, decoder = Packer(), Unpacker(), ChunkDecoder()
    for _ in range(4):
        data = os.urandom(MAX_CHUNK)
        packed = packer.pack(data)
        assert len(packed) > MAX_CHUNK  # a little larger than what went in
        (chunk,) = decoder.feed(encode_chunk(packed))
        assert chunk is not None and unpacker.unpack(chunk) == data


def test_a_repeated_message_costs_a_few_bytes_after_the_first() -> None:
    """What makes compression pay: llama.cpp RPC resends nearly the same graph every token."""
    graph = bytes(range(256)) * 400  # 100 KiB that the window still holds next time
    packer = Packer()
    first, again = packer.pack(graph), packer.pack(graph)
    assert len(again) < 64 < len(first)


def test_hostile_chunks_are_refused_not_inflated() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * MAX_CHUNK))  # ~4 KiB on the wire
    with pytest.raises(FrameError, match="inflates to over"):
        Unpacker().unpack(b"\x01" + bomb)
    with pytest.raises(FrameError, match="does not decompress"):
        Unpacker().unpack(b"\x01not zstd at all")
    with pytest.raises(FrameError, match="neither plain nor compressed"):
        Unpacker().unpack(b"\x07whatever")
    with pytest.raises(FrameError, match="too large"):
        Unpacker().unpack(b"\x00" + bytes(MAX_CHUNK + 1))


def test_data_that_does_not_compress_goes_as_it_is_and_the_stream_carries_on() -> None:
    packer, unpacker = Packer(), Unpacker()
    graph = bytes(range(256)) * 400
    weights = os.urandom(MAX_CHUNK)
    assert unpacker.unpack(packer.pack(graph)) == graph
    plain = packer.pack(weights)
    assert plain == b"\x00" + weights  # not compressed: no time spent on it
    assert unpacker.unpack(plain) == weights
    again = packer.pack(graph)  # the compressed stream still holds the graph from before
    assert len(again) < 64 and unpacker.unpack(again) == graph
