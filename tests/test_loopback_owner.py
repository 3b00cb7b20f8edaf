"""Loopback connections are told apart by the process that opened them, as the kernel says."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.transport.loopback_owner import connection_inode, kernel_can_tell, opened_by
from sharedllm.mesh.transport.tunnel import TunnelListener, TunnelRequest

pytestmark = pytest.mark.skipif(not kernel_can_tell(), reason="needs Linux's /proc/net/tcp")

_CONNECT = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""


def _child_connecting_to(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CONNECT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_the_kernel_names_the_process_that_connected(listener: socket.socket) -> None:
    address = listener.getsockname()
    with socket.create_connection(address) as mine:
        peer = mine.getsockname()
        assert opened_by(peer, address, [os.getpid()])
        assert not opened_by(peer, address, [1])
    with _child_connecting_to(address[1]) as child:
        assert child.stdout is not None
        peer = ("127.0.0.1", int(child.stdout.readline()))
        assert not opened_by(peer, address, [os.getpid()])
        assert opened_by(peer, address, [child.pid])
        child.kill()


@given(st.text(max_size=2000))
def test_any_table_text_is_parsed_without_error(table: str) -> None:
    connection_inode(table, ("127.0.0.1", 1), ("127.0.0.1", 2))
    connection_inode(table, ("::1", 1), ("::1", 2))


async def test_a_tunnel_listener_carries_only_the_allowed_process_connections() -> None:
    opened: list[str] = []

    async def open_stream() -> object:
        opened.append("tunnel")
        raise OSError("no peer in this test")

    tunnel = TunnelListener(
        open_stream,  # type: ignore[arg-type]
        TunnelRequest("rpc", "m", 1),
        allowed_pids=lambda: (os.getpid(),),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.run)
        with await trio.to_thread.run_sync(_child_connecting_to, tunnel.port) as child:
            assert child.stdout is not None
            await trio.to_thread.run_sync(child.stdout.readline)
            with trio.fail_after(10):
                while tunnel.stats.refused_local == 0:
                    await trio.sleep(0.05)
            assert opened == []  # the stranger's connection never reached the tunnel
            child.kill()
        nursery.cancel_scope.cancel()
