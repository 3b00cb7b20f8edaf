"""The transport bench's stand-ins for engines with our sealed transport: they take a handed
tunnel as llama-server and ggml-rpc-server do (engine_handoff.py) and seal its records in
Python, so that the handed tunnel is timed with Python ends, as the TLS connection it is
compared with (the engines themselves seal in C)."""

from __future__ import annotations

import array
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sharedllm.mesh.transport.engine_handoff import HANDOFF_BYTES, MAGIC
from sharedllm.mesh.transport.native_relay import TunnelKeys

_MAX_PLAIN = 256 * 1024
_TAG = 16


class SealedStream:
    """A handed tunnel's records, as an engine seals and opens them."""

    def __init__(self, sock: socket.socket, keys: TunnelKeys, keeper: trio.socket.SocketType):
        sock.setblocking(False)
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._keeper = keeper
        self._seal, self._open = AESGCM(keys.send), AESGCM(keys.receive)
        self._sent = self._opened = 0
        self._received = b""
        self._plain = b""

    @property
    def remote_peer(self) -> str:
        return "engine"

    @property
    def remote_host(self) -> str | None:
        return None

    async def send_all(self, data: bytes) -> None:
        records = []
        for start in range(0, max(len(data), 1), _MAX_PLAIN):
            records.append(self._record(data[start : start + _MAX_PLAIN]))
        await self._stream.send_all(b"".join(records))

    def _record(self, plain: bytes) -> bytes:
        head = (len(plain) + _TAG).to_bytes(4, "big")
        nonce = bytes(4) + self._sent.to_bytes(8, "big")
        self._sent += 1
        return head + self._seal.encrypt(nonce, plain, head)

    async def receive_some(self, max_bytes: int) -> bytes:
        while not self._plain:
            if len(self._received) >= 4:
                size = int.from_bytes(self._received[:4], "big")
                if len(self._received) >= 4 + size:
                    head, body = self._received[:4], self._received[4 : 4 + size]
                    self._received = self._received[4 + size :]
                    nonce = bytes(4) + self._opened.to_bytes(8, "big")
                    self._opened += 1
                    self._plain = self._open.decrypt(nonce, body, head)
                    if not self._plain:
                        return b""  # the end record
                    continue
            got = await self._stream.receive_some(_MAX_PLAIN)
            if not got:
                return b""
            self._received += got
        taken, self._plain = self._plain[:max_bytes], self._plain[max_bytes:]
        return taken

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await self._stream.send_all(self._record(b""))
            self._stream.socket.shutdown(socket.SHUT_RDWR)
        await self._stream.aclose()
        self._keeper.close()


async def _handoff(keeper: trio.socket.SocketType) -> tuple[socket.socket, TunnelKeys]:
    message, ancillary, _, _ = await keeper.recvmsg(HANDOFF_BYTES, socket.CMSG_SPACE(8))
    fds = array.array("i", ancillary[0][2]).tolist()
    socket.close(fds[1])  # the counters page: these ends count nothing
    assert message[:5] == MAGIC + b"\x01", "the node handed no tunnel"
    keys = TunnelKeys(send=message[6:38], receive=message[38:70])
    return socket.socket(fileno=fds[0]), keys


async def ask_desk(path: str, endpoint: str) -> SealedStream:
    """As llama-server does: asks the primary's desk for the tunnel at `endpoint`."""
    keeper = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await keeper.connect(path)
    await keeper.send(MAGIC + bytes([len(endpoint)]) + endpoint.encode())
    sock, keys = await _handoff(keeper)
    return SealedStream(sock, keys, keeper)


@asynccontextmanager
async def handoff_service(
    path: str, serve: Callable[[SealedStream], Awaitable[None]]
) -> AsyncIterator[None]:
    """As ggml-rpc-server does: takes handed tunnels at `path` and serves each."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(8)

    async def take(keeper: trio.socket.SocketType) -> None:
        sock, keys = await _handoff(keeper)
        await keeper.send(b"k")
        stream = SealedStream(sock, keys, keeper)
        await serve(stream)
        await stream.aclose()

    async def accept_all() -> None:
        while True:
            keeper, _ = await listener.accept()
            nursery.start_soon(take, keeper)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_all)
        yield
        nursery.cancel_scope.cancel()
    listener.close()
