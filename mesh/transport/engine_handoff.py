"""Handing a tunnel to the engine: the engine seals its records itself, no relay in between.

After a tunnel's stream is authenticated and its keys agreed (tunnel.py, native_relay.py), a
node whose engine has our sealed transport (node/engine/sealed_patch.py) passes the engine the
tunnel's TCP connection over a private Unix socket, with the keys and a shared page of
`RelayCounters` that the engine counts into; the engine then seals and opens the records the
native relay would. On the primary, llama-server asks this node's `HandoffDesk` for each
worker's tunnel; on a worker, the node hands each tunnel to its ggml-rpc-server's handoff
socket. Either way the node keeps the Unix connection (the engine closes it when it is done
with the tunnel, or dies) and its own reference to the TCP connection, which it shuts down
to cut the tunnel (a fenced primary) or once the engine is done.

The messages: the engine asks | "SLH1" | length (1) | "host:port" |; a handoff is | "SLH1" |
status (1: here is the tunnel, 0: use TCP) | RPC commands to count (1) | send key (32) |
receive key (32) | with the connection and the counters as SCM_RIGHTS; an rpc-server
acknowledges one with b"k".
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import logging
import mmap
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Collection
from typing import Protocol

import trio

from .native_relay import RelayCounters, TunnelKeys, libcrypto_path
from .tunnel_stats import TunnelStats

MAGIC = b"SLH1"
HANDOFF_BYTES = len(MAGIC) + 2 + 64
_ANSWER_WAIT_S = 10.0  # a request must come this soon after an engine connects
MAX_AT_DESK = 256  # engine connections a desk serves at once (a few per worker tunnel)
_log = logging.getLogger("sharedllm.mesh.tunnel")


class HandoffFailed(Exception):
    """The engine did not take the tunnel (the message says why); the node may relay it."""


def handoff_possible() -> bool:
    """Whether this system can hand tunnels to an engine at all (our engine change is Linux's)."""
    return sys.platform.startswith("linux") and libcrypto_path() is not None


def engine_env(handoff_path: str) -> dict[str, str]:
    """What an engine with our sealed transport needs to take tunnels at `handoff_path`."""
    crypto = libcrypto_path()
    return {"SHAREDLLM_RPC_HANDOFF": handoff_path, "SHAREDLLM_LIBCRYPTO": crypto or ""}


class SharedCounters:
    """A page the engine counts a tunnel into, read here as the relay's `RelayCounters`."""

    def __init__(self) -> None:
        size = ctypes.sizeof(RelayCounters)
        with tempfile.TemporaryFile() as file:  # unlinked at once: only the two processes see it
            file.truncate(size)
            self.fd = os.dup(file.fileno())
        self._page = mmap.mmap(self.fd, size)
        self.counters = RelayCounters.from_buffer(self._page)

    def close_fd(self) -> None:
        os.close(self.fd)


def _handoff_message(keys: TunnelKeys | None, rpc_commands: int) -> bytes:
    if keys is None:
        return MAGIC + bytes(HANDOFF_BYTES - len(MAGIC))
    return MAGIC + bytes([1, min(rpc_commands, 255)]) + keys.send + keys.receive


async def _send_handoff(
    unix: trio.socket.SocketType,
    tcp: socket.socket,
    keys: TunnelKeys,
    counters: SharedCounters,
    rpc_commands: int,
) -> None:
    fds = array.array("i", [tcp.fileno(), counters.fd])
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
    sent = await unix.sendmsg([_handoff_message(keys, rpc_commands)], ancillary)
    if sent != HANDOFF_BYTES:
        raise HandoffFailed("the engine took part of a handoff")


async def hold(
    unix: trio.socket.SocketType,
    tcp: socket.socket,
    counters: SharedCounters,
    stats: TunnelStats,
    *,
    outward: bool,
) -> None:
    """Counts the handed tunnel in `stats` until the engine closes our Unix connection (it is
    done with the tunnel, or died) or we are cancelled; then shuts the tunnel down, so that
    its peer sees it end even though we hold the connection too."""
    stats.relaying(counters.counters, outward)
    stats.handed_connections += 1
    try:
        while await unix.recv(64):
            pass
    except OSError as err:
        _log.debug("a handed tunnel's engine connection failed: %s", err)
    finally:
        stats.relayed(counters.counters)
        with contextlib.suppress(OSError):  # already ended by the peer
            tcp.shutdown(socket.SHUT_RDWR)
        tcp.close()
        unix.close()


async def hand_to_rpc_server(
    path: str,
    tcp: socket.socket,
    keys: TunnelKeys,
    stats: TunnelStats,
) -> None:
    """Hands a worker's tunnel to the rpc-server listening for handoffs at `path` and holds it
    until it ends (see `hold`). Raises HandoffFailed, with the connection still ours, where the
    rpc-server cannot be reached or does not acknowledge."""
    unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    counters = SharedCounters()
    try:
        try:
            await unix.connect(path)
            await _send_handoff(unix, tcp, keys, counters, 0)
            acknowledged = await unix.recv(1)  # when the rpc-server takes it (after its client)
        finally:
            counters.close_fd()
        if acknowledged != b"k":
            raise HandoffFailed("the rpc-server did not take the tunnel")
    except (OSError, HandoffFailed) as err:
        unix.close()
        raise HandoffFailed(f"handing a tunnel to the rpc-server failed: {err}") from None
    except BaseException:  # cancelled (a fenced primary): the tunnel goes with it
        unix.close()
        tcp.close()
        raise
    await hold(unix, tcp, counters, stats, outward=False)


class HandsTunnels(Protocol):
    """What opens a tunnel for the engine (a loopback tunnel listener of ours)."""

    stats: TunnelStats
    rpc_commands: int

    async def open_for_engine(self) -> tuple[socket.socket, TunnelKeys] | None:
        """The tunnel's TCP connection and keys, or None where it cannot be handed (the
        engine then connects to the listener)."""
        ...


class HandoffDesk:
    """The primary's Unix socket where its llama-server asks for its workers' tunnels.

    `listener_for(endpoint)` is the listener that llama-server would otherwise reach at
    `endpoint`; it raises LookupError for an endpoint that is not ours. Only processes that
    `allowed_pids()` names are served (the kernel tells the asker's pid).
    """

    def __init__(
        self,
        path: str,
        listener_for: Callable[[str], HandsTunnels],
        allowed_pids: Callable[[], Collection[int]],
    ) -> None:
        self.path = path
        self._listener_for = listener_for
        self._allowed_pids = allowed_pids
        self.refused = 0
        self._serving = 0
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):  # ours, left by a crash
                os.unlink(path)
            bound.bind(path)  # now, so that an engine started next finds it
            bound.listen(16)
        except OSError:
            bound.close()
            raise
        self._listener = trio.socket.from_stdlib_socket(bound)

    @property
    def serving(self) -> int:
        """Engine connections served now (asking, or holding a tunnel)."""
        return self._serving

    async def run(self) -> None:
        """Serves requests until cancelled, then closes the socket."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    unix, _ = await self._listener.accept()
                    if self._serving >= MAX_AT_DESK:
                        self.refused += 1
                        unix.close()
                        continue
                    nursery.start_soon(self._serve, unix)
        finally:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve(self, unix: trio.socket.SocketType) -> None:
        self._serving += 1
        try:
            try:
                opened = await self._answer(unix)
            except (OSError, HandoffFailed, LookupError, trio.TooSlowError) as err:
                _log.info("an engine's tunnel handoff failed: %s", err)
                opened = None
            if opened is None:
                unix.close()
                return
            tcp, counters, stats = opened
            await hold(unix, tcp, counters, stats, outward=True)
        finally:
            self._serving -= 1

    async def _answer(
        self, unix: trio.socket.SocketType
    ) -> tuple[socket.socket, SharedCounters, TunnelStats] | None:
        """Reads the engine's request and answers it: the tunnel handed over, or 0 (the engine
        then uses TCP to our listener). None where there is nothing to hold."""
        credentials = unix.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(credentials[:4], sys.byteorder)
        if pid not in self._allowed_pids():
            self.refused += 1
            return None
        with trio.fail_after(_ANSWER_WAIT_S):
            head = await _receive_exactly(unix, len(MAGIC) + 1)
            if head[: len(MAGIC)] != MAGIC:
                raise HandoffFailed("not a handoff request")
            endpoint = (await _receive_exactly(unix, head[-1])).decode("ascii", "replace")
        listener = self._listener_for(endpoint)
        handed = await listener.open_for_engine()
        if handed is None:
            await unix.send(_handoff_message(None, 0))
            return None
        tcp, keys = handed
        counters = SharedCounters()
        try:
            await _send_handoff(unix, tcp, keys, counters, listener.rpc_commands)
        except BaseException:  # failed or cancelled: nobody else will close it
            tcp.close()
            raise
        finally:
            counters.close_fd()
        listener.stats.connections += 1
        return tcp, counters, listener.stats


async def _receive_exactly(unix: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    while len(data) < size:
        got = await unix.recv(size - len(data))
        if not got:
            raise HandoffFailed("the engine closed its request early")
        data += got
    return data
