"""The native tunnel relay (C, AES-256-GCM records): both directions with half-closes, its
counters, and what it does with a hostile peer's bytes: forged, replayed, cut or oversized
records end the tunnel with a reason; nothing is passed on unauthenticated."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sharedllm.mesh.transport.native_relay import (
    MAX_RELAYS,
    NativeRelay,
    NativeRelayError,
    RelayCounters,
    TunnelKeys,
    new_secret,
    spin_for,
)
from sharedllm.node.engine.native_build import native_relay_library

OPENER = TunnelKeys.derive(b"a" * 32, b"b" * 32, opener=True)
ANSWERER = TunnelKeys.derive(b"a" * 32, b"b" * 32, opener=False)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeRelay]:
    yield NativeRelay(native_relay_library(Path(tmp_path_factory.mktemp("cache"))))


def _pair() -> tuple[socket.socket, socket.socket]:
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in ends:
        end.setblocking(False)
    return ends


def _record(key: bytes, counter: int, plain: bytes) -> bytes:
    head = struct.pack(">I", len(plain) + 16)
    return head + AESGCM(key).encrypt(b"\0" * 4 + struct.pack(">Q", counter), plain, head)


async def _read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    found = bytearray()
    while True:
        await trio.lowlevel.wait_readable(sock)
        data = sock.recv(65536)
        if not data:
            return bytes(found)
        found += data


async def _send_all(sock: socket.socket, data: bytes, chunk: int) -> None:
    sock.setblocking(False)
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(sock)
        view = view[sock.send(view[:chunk]) :]
    sock.shutdown(socket.SHUT_WR)


def test_keys_differ_per_direction_and_per_secret() -> None:
    assert OPENER.send == ANSWERER.receive and OPENER.receive == ANSWERER.send
    assert OPENER.send != OPENER.receive
    other = TunnelKeys.derive(new_secret(), b"b" * 32, opener=True)
    assert other.send != OPENER.send


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    outward=st.binary(max_size=300_000),
    back=st.binary(max_size=300_000),
    chunk=st.integers(1, 100_000),
)
def test_both_directions_arrive_whole_and_in_order(
    relay: NativeRelay, outward: bytes, back: bytes, chunk: int
) -> None:
    async def main() -> None:
        app_a, local_a = _pair()
        wire_a, wire_b = _pair()
        local_b, app_b = _pair()
        counters_a, counters_b = RelayCounters(), RelayCounters()
        got: dict[str, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.relay, local_a, wire_a, OPENER, counters_a)
            nursery.start_soon(relay.relay, local_b, wire_b, ANSWERER, counters_b)
            nursery.start_soon(_send_all, app_a, outward, chunk)
            nursery.start_soon(_send_all, app_b, back, chunk)

            async def read(name: str, sock: socket.socket) -> None:
                got[name] = await _read_all(sock)

            nursery.start_soon(read, "b", app_b)
            nursery.start_soon(read, "a", app_a)
        assert got == {"b": outward, "a": back}
        assert counters_a.bytes_out == len(outward) == counters_b.bytes_back
        assert counters_a.bytes_back == len(back) == counters_b.bytes_out
        assert counters_a.wire_out == counters_b.wire_back
        for sock in (app_a, local_a, wire_a, wire_b, local_b, app_b):
            sock.close()

    trio.run(main)


def test_a_relay_that_looks_again_before_sleeping_relays_the_same(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    spinning = NativeRelay(native_relay_library(Path(tmp_path_factory.mktemp("cache"))), 50)
    outward, back = bytes(range(256)) * 1000, b"answer" * 5000

    async def main() -> None:
        app_a, local_a = _pair()
        wire_a, wire_b = _pair()
        local_b, app_b = _pair()
        got: dict[str, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spinning.relay, local_a, wire_a, OPENER, RelayCounters())
            nursery.start_soon(spinning.relay, local_b, wire_b, ANSWERER, RelayCounters())
            nursery.start_soon(_send_all, app_a, outward, 4096)
            nursery.start_soon(_send_all, app_b, back, 100)

            async def read(name: str, sock: socket.socket) -> None:
                got[name] = await _read_all(sock)

            nursery.start_soon(read, "b", app_b)
            nursery.start_soon(read, "a", app_a)
        assert got == {"b": outward, "a": back}
        for sock in (app_a, local_a, wire_a, wire_b, local_b, app_b):
            sock.close()

    trio.run(main)


def test_relays_look_again_only_where_the_engine_leaves_cores_waiting() -> None:
    assert spin_for(16, engine_on_gpus=True) > 0
    assert spin_for(16, engine_on_gpus=False) == 0  # the engine computes on those cores
    assert spin_for(None, True) == spin_for(2, True) == 0


async def _answerer_given(relay: NativeRelay, wire: bytes) -> tuple[str, bytes]:
    """What a relay on the answering side makes of `wire` from the peer: its error, and what
    reached its local side."""
    local, app = _pair()
    ours, peer = _pair()
    peer.setblocking(True)
    peer.sendall(wire)
    peer.shutdown(socket.SHUT_WR)  # the peer says no more
    app.shutdown(socket.SHUT_WR)
    error = ""
    with trio.fail_after(10):
        try:
            await relay.relay(local, ours, ANSWERER, RelayCounters())
        except NativeRelayError as err:
            error = str(err)
    app.setblocking(False)
    try:
        passed = app.recv(1 << 20)
    except BlockingIOError:
        passed = b""
    for sock in (local, app, ours, peer):
        sock.close()
    return error, passed


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_record(OPENER.send, 0, b"hello")[:-1] + b"\0", "authentication"),  # forged tag
        (_record(OPENER.send, 0, b"hi") + _record(OPENER.send, 0, b"hi"), "authentication"),
        (_record(OPENER.send, 1, b"skipped one"), "authentication"),  # reordered
        (_record(ANSWERER.send, 0, b"own key"), "authentication"),  # reflected
        (struct.pack(">I", 0xFFFFFFFF) + b"x" * 64, "impossible length"),
        (struct.pack(">I", 3) + b"abc", "impossible length"),
        (_record(OPENER.send, 0, b"cut")[:10], "without an end record"),
        (_record(OPENER.send, 0, b"whole, then nothing"), "without an end record"),
    ],
)
def test_a_hostile_peer_s_records_end_the_tunnel_with_a_reason(
    relay: NativeRelay, wire: bytes, reason: str
) -> None:
    error, passed = trio.run(_answerer_given, relay, wire)
    assert reason in error
    assert b"hello" not in passed and b"own key" not in passed and b"skipped" not in passed


def test_a_record_arriving_in_pieces_is_put_together(relay: NativeRelay) -> None:
    payload = bytes(range(256)) * 600  # over a socket buffer's worth, in one record
    wire = _record(OPENER.send, 0, payload) + _record(OPENER.send, 1, b"")

    async def main() -> bytes:
        local, app = _pair()
        ours, peer = _pair()
        got = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.relay, local, ours, ANSWERER, RelayCounters())

            async def trickle() -> None:
                for start in range(0, len(wire), 7001):  # pieces that cut heads and bodies
                    await trio.lowlevel.wait_writable(peer)
                    peer.sendall(wire[start : start + 7001])
                    await trio.sleep(0.001)
                app.shutdown(socket.SHUT_WR)

            async def read() -> None:
                nonlocal got
                got = await _read_all(app)

            nursery.start_soon(trickle)
            nursery.start_soon(read)
        for sock in (local, app, ours, peer):
            sock.close()
        return got

    assert trio.run(main) == payload


def test_a_record_over_the_limit_is_refused_before_it_is_read(relay: NativeRelay) -> None:
    over = struct.pack(">I", 256 * 1024 + 17)
    error, _ = trio.run(_answerer_given, relay, over)
    assert "impossible length" in error


def test_cancelling_stops_the_relay(relay: NativeRelay) -> None:
    async def main() -> None:
        local, app = _pair()
        ours, peer = _pair()
        with trio.move_on_after(0.2):
            await relay.relay(local, ours, OPENER, RelayCounters())
        # the thread has returned: its sockets can be closed and the limiter is free again
        assert relay.has_room()
        for sock in (local, app, ours, peer):
            sock.close()

    trio.run(main)


def test_rpc_requests_are_counted_by_command(relay: NativeRelay) -> None:
    def request(command: int, payload: bytes) -> bytes:
        return bytes([command]) + struct.pack("<Q", len(payload)) + payload

    stream = request(14, b"") + request(6, b"w" * 1000) + request(16, b"g" * 40) * 3

    async def main() -> RelayCounters:
        app, local = _pair()
        ours, peer = _pair()
        counters = RelayCounters()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, app, stream, 7)
            nursery.start_soon(_read_all, peer)
            with trio.move_on_after(2):
                await relay.relay(local, ours, OPENER, counters, rpc_commands=18)
            nursery.cancel_scope.cancel()
        for sock in (app, local, ours, peer):
            sock.close()
        return counters

    counters = trio.run(main)
    assert counters.rpc_requests[14] == 1 and counters.rpc_requests[6] == 1
    assert counters.rpc_requests[16] == 3 and counters.rpc_bytes[16] == 120
    assert counters.rpc_lost == 0


def test_relays_at_once_are_bounded() -> None:
    assert 0 < MAX_RELAYS <= 256
