"""The primary's handoff desk, as an engine (or a stranger) meets it: only the engine's process
is served; a malformed request or an endpoint that is not ours is dropped and the desk serves
on; a tunnel that cannot go native is answered "use TCP"; a handed tunnel comes with its keys,
its connection and a counters page that the node reads, and is shut down when the engine lets
go of it."""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import socket
from pathlib import Path

import pytest
import trio
from sharedllm.mesh.transport import engine_handoff
from sharedllm.mesh.transport.engine_handoff import HANDOFF_BYTES, MAGIC, HandoffDesk
from sharedllm.mesh.transport.native_relay import RelayCounters, TunnelKeys
from sharedllm.mesh.transport.tunnel_stats import TunnelStats

KEYS = TunnelKeys(send=b"\x0a" * 32, receive=b"\x0b" * 32)


class _Listener:
    """A tunnel listener's part the desk uses: hands `tunnel` (or None: cannot go native)."""

    def __init__(self, tunnel: socket.socket | None) -> None:
        self.stats = TunnelStats()
        self.rpc_commands = 18
        self.tunnel = tunnel

    async def open_for_engine(self) -> tuple[socket.socket, TunnelKeys] | None:
        return None if self.tunnel is None else (self.tunnel, KEYS)


def _request(endpoint: bytes) -> bytes:
    return MAGIC + bytes([len(endpoint)]) + endpoint


async def _ask(path: str, data: bytes) -> tuple[bytes, list[int]]:
    """Sends `data` as an engine would and reads the answer (b"" if closed) and its fds."""
    unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix:
        await unix.connect(path)
        try:
            await unix.send(data)
            with trio.fail_after(10):
                message, ancillary, _, _ = await unix.recvmsg(HANDOFF_BYTES, socket.CMSG_SPACE(8))
        except (ConnectionResetError, BrokenPipeError):  # closed with our request unread
            return b"", []
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
    return message, fds


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "desk.sock")


async def test_a_stranger_is_refused_and_malformed_requests_are_dropped(path: str) -> None:
    listener = _Listener(None)
    allowed: list[int] = []

    def listener_for(endpoint: str) -> _Listener:
        if endpoint != "127.0.0.1:5000":
            raise LookupError(endpoint)
        return listener

    desk = HandoffDesk(path, listener_for, lambda: allowed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.run)
        assert await _ask(path, _request(b"127.0.0.1:5000")) == (b"", [])
        assert desk.refused == 1
        allowed.append(os.getpid())
        for bad in (b"XXXX" + bytes(20), _request(b"127.0.0.1:6000"), _request(b"\xff\xfe")):
            assert await _ask(path, bad) == (b"", [])
        answer, fds = await _ask(path, _request(b"127.0.0.1:5000"))
        assert answer == MAGIC + bytes(HANDOFF_BYTES - len(MAGIC)) and fds == []
        nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()


async def test_a_handed_tunnel_carries_keys_connection_and_counters(path: str) -> None:
    ours, peer = socket.socketpair()
    listener = _Listener(ours)
    desk = HandoffDesk(path, lambda _endpoint: listener, lambda: (os.getpid(),))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.run)
        unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await unix.connect(path)
        await unix.send(_request(b"127.0.0.1:5000"))
        message, ancillary, _, _ = await unix.recvmsg(HANDOFF_BYTES, socket.CMSG_SPACE(8))
        fds = array.array("i", ancillary[0][2]).tolist()
        assert message == MAGIC + bytes([1, 18]) + KEYS.send + KEYS.receive and len(fds) == 2
        handed, page = socket.socket(fileno=fds[0]), mmap.mmap(fds[1], ctypes.sizeof(RelayCounters))
        os.close(fds[1])
        handed.sendall(b"through the handed connection")
        assert peer.recv(64) == b"through the handed connection"
        counters = RelayCounters.from_buffer(page)
        counters.bytes_out, counters.round_trips = 1234, 7  # as the engine counts
        with trio.fail_after(10):  # the desk holds the tunnel once it is handed
            while listener.stats.handed_connections == 0:
                await trio.sleep(0.01)
        stats = listener.stats.as_dict()
        assert stats["bytes_out"] == 1234 and stats["round_trips"] == 7
        assert stats["handed_connections"] == stats["connections"] == 1
        unix.close()  # the engine lets go of the tunnel (or dies)
        peer.setblocking(False)
        peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
        with trio.fail_after(10):  # shut down by the node, although the engine's copy is open
            while await peer_stream.receive_some(64):
                pass
        assert listener.stats.as_dict()["bytes_out"] == 1234
        del counters
        page.close()
        handed.close()
        nursery.cancel_scope.cancel()
    await peer_stream.aclose()


async def test_a_desk_serves_a_bounded_number_of_engine_connections(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_handoff, "MAX_AT_DESK", 2)
    desk = HandoffDesk(path, lambda _endpoint: _Listener(None), lambda: (os.getpid(),))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.run)
        stalled = []
        for _ in range(2):  # connected, asking nothing yet
            unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await unix.connect(path)
            stalled.append(unix)
        with trio.fail_after(10):
            while desk.serving < 2:
                await trio.sleep(0.01)
        assert await _ask(path, _request(b"127.0.0.1:5000")) == (b"", [])
        assert desk.refused == 1
        for unix in stalled:
            unix.close()
        with trio.fail_after(10):  # room again once they went
            while desk.serving > 0:
                await trio.sleep(0.01)
            answer, _ = await _ask(path, _request(b"127.0.0.1:5000"))
        assert answer[:5] == MAGIC + b"\x00"
        nursery.cancel_scope.cancel()


async def test_a_desk_takes_over_a_socket_file_left_by_a_crash(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(path)
    desk = HandoffDesk(path, lambda _endpoint: _Listener(None), lambda: (os.getpid(),))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.run)
        answer, _ = await _ask(path, _request(b"127.0.0.1:5000"))
        assert answer[:5] == MAGIC + b"\x00"
        nursery.cancel_scope.cancel()
