"""TLS on a socket for trio, done by the ssl module's own socket: one C call per send or receive.

trio's SSLStream runs TLS through memory buffers with a Python pump around every read and write;
on the data plane, where each token of a split model crosses several tunnel hops as small
messages, that pump was most of a hop's cost. Here the ssl module reads and writes the socket
itself, in non-blocking mode, and trio only waits for the socket to be ready.

One task may send while another receives (a tunnel's two directions), as with any trio stream.
`DataStream` is such a connection to an authenticated member, as a `MeshStream`.
TLS 1.3 never needs to read to finish a write after the handshake; should it ask, the writer
waits a moment and retries rather than compete with the reader for the socket.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import trio

from .seam import TransportError

_WRITE_WANTS_READ_PAUSE_S = 0.001
_Result = TypeVar("_Result")


class TlsSocket(trio.abc.AsyncResource):
    """A TLS connection over a TCP socket taken from trio (see `wrap`)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    @staticmethod
    def wrap(tcp: trio.SocketStream, context: ssl.SSLContext, server_side: bool) -> TlsSocket:
        """Takes the socket out of `tcp` (which is then unusable) and wraps it for TLS."""
        plain = socket.socket(fileno=tcp.socket.detach())
        plain.setblocking(False)
        tls = context.wrap_socket(plain, server_side=server_side, do_handshake_on_connect=False)
        return TlsSocket(tls)

    async def do_handshake(self) -> None:
        await self._until_done(self._sock.do_handshake)

    async def unwrap(self) -> socket.socket:
        """Ends TLS cleanly (close_notify both ways) and gives back the TCP socket, still open
        and non-blocking, positioned just after the peer's last TLS record."""
        plain = await self._until_done(self._sock.unwrap)
        assert isinstance(plain, socket.socket)
        return plain

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate, DER-encoded (after the handshake)."""
        return self._sock.getpeercert(binary_form=True)

    async def send_all(self, data: bytes) -> None:
        """Sends everything; raises OSError (ssl.SSLError included) if the connection broke."""
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._sock)
            except ssl.SSLWantReadError:
                await trio.sleep(_WRITE_WANTS_READ_PAUSE_S)
            else:
                view = view[sent:]
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` bytes as soon as any are there; b"" at the end of the stream."""
        return await self._until_done(partial(self._sock.recv, max_bytes))

    async def _until_done(self, operation: Callable[[], _Result]) -> _Result:
        """Runs a non-blocking TLS operation again each time the socket is ready for what it
        asked for, until it completes."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._sock)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return result

    async def aclose(self) -> None:
        """Closes at once (the data plane's streams say their own goodbyes)."""
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


class DataStream:
    """A TLS stream to an authenticated member, as a `MeshStream`."""

    def __init__(self, stream: TlsSocket, remote_peer: str) -> None:
        self._stream = stream
        self._peer = remote_peer

    @property
    def remote_peer(self) -> str:
        return self._peer

    @property
    def remote_host(self) -> str | None:
        return None  # the data plane limits failed handshakes before a stream exists

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise TransportError(f"data stream to {self._peer} broke: {err}") from None

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise TransportError(f"data stream from {self._peer} broke: {err}") from None

    async def detach(self) -> socket.socket:
        """Ends TLS on this stream (both ends must) and gives its TCP socket to the caller,
        who then owns it; raises TransportError if the peer does not end TLS too."""
        try:
            return await self._stream.unwrap()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise TransportError(f"data stream to {self._peer} did not end TLS: {err}") from None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)
