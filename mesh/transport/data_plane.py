"""The data plane: direct TCP + TLS 1.3 streams between members, for bulk and latency-bound
traffic (rpc tunnels, API forwarding, weight transfer), next to libp2p's control plane.

Identity: each node's TLS certificate is self-signed with its own Ed25519 node key, so the key
in the certificate *is* the peer id. Python's ssl module has no custom verify hook, so:

- the client checks, after the handshake, that the server's certificate key is the peer id it
  meant to reach (a man in the middle cannot present that key);
- the server then sends a fresh nonce, and the client answers with its peer id, its membership
  proof and a signature over (nonce, server id, client id) with its node key. The server admits
  it only if the signature holds and `admit(proof, peer_id)` accepts it.

Then the client names the protocol and the stream is handed to that protocol's handler.

Where no direct connection gets through (two members behind NATs), the same exchange runs
*carried* on a control-plane stream (`CARRIED`) over whatever connection the mesh has to the
peer: relayed, hole-punched or direct. Noise has authenticated that stream's peer already, so
only the certificate check is left out; the nonce signature and membership proof are the same.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import records
from ..addresses import MAX_ADVERTISED, LocalInterface, advertised_hosts, dial_order
from ..containment import HandlerFaults, contained
from ..handshake_limiter import FailedHandshakeLimiter
from ..identity import (
    NodeIdentity,
    public_key_of_peer_id,
    verify_once,
)
from ..membership import MAX_PROOF_BYTES, MembershipError, Proof
from ..records import RecordError, check_peer_id_text
from .framing import FrameError, receive_frame, send_frame
from .happy_eyeballs import first_to_connect
from .seam import MeshStream, StreamHandler, TransportError
from .tls_identity import peer_id_in_certificate, tls_contexts
from .tls_socket import DataStream, TlsSocket

_log = logging.getLogger("sharedllm.mesh.data")
_NONCE_BYTES = 32
_AUTH_KIND = "data-auth"
MAX_HANDSHAKES = 64
MAX_STREAMS_PER_PEER = 512
_HANDSHAKE_TIMEOUT_S = 10.0
_SOCKET_BUFFER = 4 * 1024 * 1024
MAX_REMEMBERED_PEERS = 1024  # which address reached a peer, for so many peers
# What a client that fails to authenticate raises (a socket error too, on a direct connection).
_REFUSALS = (
    trio.TooSlowError,
    TransportError,
    FrameError,
    RecordError,
    MembershipError,
    ValueError,
)
CARRIED = "/sharedllm/data-carried/1"  # a data stream carried over the control plane
DIRECT_BUDGET_S = 4.0  # how long direct addresses get before a stream is carried instead
CARRIED_RETRY_DIRECT_S = 60.0  # a peer reached only carried is tried directly again after this


def _auth_message(nonce: bytes, server: str, client: str) -> bytes:
    return records.signing_bytes(_AUTH_KIND, [nonce, server, client])


def _source_of(tcp: trio.SocketStream) -> str:
    try:
        return str(tcp.socket.getpeername()[0])
    except OSError:
        return "?"


def _tune(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        stream.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


@dataclass
class DataPlane:
    """Serves and opens authenticated data streams for one node."""

    identity: NodeIdentity
    proof: Proof
    admit: Callable[[bytes, str], object]  # an encoded proof; raises MembershipError to refuse
    handlers: dict[str, StreamHandler] = field(default_factory=dict)
    address: tuple[str, int] | None = None
    advertised: list[list[Any]] | None = None  # [[host, port], ...] as gossiped
    _contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
    handshaking: int = 0  # connections not authenticated yet
    streams_of: dict[str, int] = field(default_factory=dict)  # open streams by peer
    refused_connections: int = 0  # over a limit: a flood of connections or of streams
    refused_handshakes: int = 0  # connections whose authentication failed
    _served: dict[str, set[trio.CancelScope]] = field(default_factory=dict)  # by peer
    faults: HandlerFaults = field(default_factory=lambda: HandlerFaults(trio.current_time))
    failures: FailedHandshakeLimiter = field(default_factory=FailedHandshakeLimiter)
    interfaces: Sequence[LocalInterface] = ()  # this machine's, for the order of dials
    reached: dict[str, tuple[str, int]] = field(default_factory=dict)  # peer -> address that worked
    # opens a CARRIED stream to a peer over the control plane; None: direct connections only
    carrier: Callable[[str], Awaitable[MeshStream]] | None = None
    carried_until: dict[str, float] = field(default_factory=dict)  # peer -> retry direct then

    def __post_init__(self) -> None:
        self._contexts = tls_contexts(self.identity)

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = contained("data", protocol, handler, self.faults)

    def advertise_public(self, host: str, port: int) -> None:
        """Adds an address the router forwards to us (UPnP) to those we advertise."""
        kept = [a for a in self.advertised or [] if a != [host, port]][: MAX_ADVERTISED - 1]
        self.advertised = [*kept, [host, port]]

    async def run(
        self,
        hosts: Sequence[str],
        port: int,
        interfaces: Sequence[LocalInterface] = (),
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listens on each host at `port` (0: a free one, the same for every host) and
        advertises every address of `interfaces` a wildcard host is reachable at."""
        listeners: list[trio.SocketListener] = []
        for host in dict.fromkeys(hosts):
            try:
                listeners += await trio.open_tcp_listeners(port, host=host)
            except OSError as err:
                for listener in listeners:
                    await listener.aclose()
                raise TransportError(
                    f"the data plane cannot listen on {host}:{port}: {err.strerror or err}"
                ) from None
            port = listeners[0].socket.getsockname()[1]
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        self.interfaces = tuple(interfaces)
        found = [a for host in dict.fromkeys(hosts) for a in advertised_hosts(host, interfaces)]
        self.advertised = [[a, port] for a in list(dict.fromkeys(found))[:MAX_ADVERTISED]]
        task_status.started(self.address)
        await trio.serve_listeners(self._handle_connection, listeners)

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
        """Authenticates, then hands the stream to its protocol. A flood is bounded: at most
        `MAX_HANDSHAKES` connections wait to authenticate (each for a few seconds at most) and
        each member may hold `MAX_STREAMS_PER_PEER` streams; beyond that, connections close."""
        source = _source_of(tcp)
        if self.handshaking >= MAX_HANDSHAKES or not self.failures.allows(
            source, trio.current_time()
        ):
            self.refused_connections += 1
            await trio.aclose_forcefully(tcp)
            return
        self.handshaking += 1
        try:
            authenticated = await self._authenticate(tcp, source)
        finally:
            self.handshaking -= 1
        if authenticated is not None:
            tls, peer, protocol = authenticated
            await self._serve_stream(DataStream(tls, peer), protocol)

    async def serve_carried(self, carried: MeshStream) -> None:
        """A data stream carried over the control plane (the handler of `CARRIED`): the same
        proof as a direct one, from the peer Noise authenticated."""
        if self.handshaking >= MAX_HANDSHAKES:
            self.refused_connections += 1
            return
        self.handshaking += 1
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT_S):
                peer, protocol = await self._authenticate_client(carried)
            if peer != carried.remote_peer:
                raise MembershipError(f"{carried.remote_peer} spoke for {peer}")
        except _REFUSALS as err:
            self.refused_handshakes += 1
            self.faults.log.emit("refused-data", "refused a carried data stream: %s", err)
            return
        finally:
            self.handshaking -= 1
        await self._serve_stream(carried, protocol)

    async def _serve_stream(self, stream: MeshStream, protocol: str) -> None:
        peer = stream.remote_peer
        if self.streams_of.get(peer, 0) >= MAX_STREAMS_PER_PEER:
            self.refused_connections += 1
            _log.warning("refused a data stream from %s: it holds too many", peer)
            await stream.aclose()
            return
        self.streams_of[peer] = self.streams_of.get(peer, 0) + 1
        scope = trio.CancelScope()
        self._served.setdefault(peer, set()).add(scope)
        try:
            with scope:
                await self.handlers[protocol](stream)  # contained: see `serve`
        finally:
            self.streams_of[peer] -= 1
            if not self.streams_of[peer]:
                del self.streams_of[peer]
            self._served[peer].discard(scope)
            if not self._served[peer]:
                del self._served[peer]
            await stream.aclose()  # cut (revoked): closed at once, with no goodbye

    def cut(self, peer: str) -> int:
        """Ends every stream `peer` opened to us (it was revoked); returns how many."""
        scopes = self._served.get(peer, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def _authenticate(
        self, tcp: trio.SocketStream, source: str
    ) -> tuple[TlsSocket, str, str] | None:
        """The client's peer id and protocol, or None (refused). A client that completed TLS
        and then failed to prove membership counts against its source address (one that
        never finishes TLS costs a waiting place only, bounded by `MAX_HANDSHAKES`)."""
        assert self._contexts is not None
        _tune(tcp)
        tls = TlsSocket.wrap(tcp, self._contexts[0], server_side=True)
        handshaken = False
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT_S):
                await tls.do_handshake()
                handshaken = True
                peer, protocol = await self._authenticate_client(
                    DataStream(tls, "(unauthenticated)")
                )
        except (*_REFUSALS, OSError) as err:
            self.refused_handshakes += 1
            if handshaken:
                self.failures.failed(source, trio.current_time())
            self.faults.log.emit("refused-data", "refused a data connection: %s", err)
            await trio.aclose_forcefully(tls)
            return None
        except BaseException:  # cancelled mid-handshake (the node stops)
            await trio.aclose_forcefully(tls)
            raise
        return tls, peer, protocol

    async def _authenticate_client(self, pending: MeshStream) -> tuple[str, str]:
        nonce = os.urandom(_NONCE_BYTES)
        await send_frame(pending, nonce)
        peer, proof_bytes, signature, protocol = records.decode(
            await receive_frame(pending),
            "data-hello",
            [str, bytes, bytes, str],
            max_bytes=MAX_PROOF_BYTES + 1024,
        )
        check_peer_id_text(peer)
        if not verify_once(
            public_key_of_peer_id(peer),
            signature,
            _auth_message(nonce, self.identity.peer_id, peer),
        ):
            raise MembershipError(f"{peer} did not prove it holds its key")
        self.admit(proof_bytes, peer)
        if protocol not in self.handlers:
            raise MembershipError(f"{peer} asked for unknown protocol {protocol!r}")
        await send_frame(pending, b"ok")
        return peer, protocol

    async def connect(
        self, peer_id: str, addresses: Sequence[tuple[str, int]], protocol: str
    ) -> MeshStream:
        """A stream to `peer_id`: direct at the first of its addresses to let us in (tried in
        dial order, the one that worked last first, raced with a short stagger), else carried
        over the control plane. A peer reached only carried is tried directly again after
        `CARRIED_RETRY_DIRECT_S`; meanwhile its streams go carried at once."""
        now = trio.current_time()
        if self.carrier is not None and self.carried_until.get(peer_id, 0.0) > now:
            return await self._open_carried(peer_id, protocol)
        try:
            if self.carrier is None or not addresses:
                return await self._connect_direct(peer_id, addresses, protocol)
            with trio.fail_after(DIRECT_BUDGET_S):
                return await self._connect_direct(peer_id, addresses, protocol)
        except (TransportError, trio.TooSlowError) as err:
            if self.carrier is None:
                raise TransportError(str(err) or f"no direct path to {peer_id}") from None
            _log.debug("no direct data path to %s (%s): carrying it", peer_id, err)
        stream = await self._open_carried(peer_id, protocol)
        self.carried_until[peer_id] = now + CARRIED_RETRY_DIRECT_S
        while len(self.carried_until) > MAX_REMEMBERED_PEERS:
            del self.carried_until[next(iter(self.carried_until))]
        self.reached.pop(peer_id, None)
        return stream

    def path_to(self, peer_id: str) -> str | None:
        """How our last data stream to `peer_id` went: "host:port" (direct), "carried", or
        None (none yet)."""
        if self.carried_until.get(peer_id, 0.0) > trio.current_time():
            return "carried"
        address = self.reached.get(peer_id)
        return None if address is None else f"{address[0]}:{address[1]}"

    async def _open_carried(self, peer_id: str, protocol: str) -> MeshStream:
        assert self.carrier is not None
        stream = await self.carrier(peer_id)
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT_S):
                return await self._prove_ourselves(stream, peer_id, protocol)
        except (trio.TooSlowError, FrameError, TransportError) as err:
            await stream.aclose()
            raise TransportError(f"carried data stream to {peer_id} failed: {err}") from None

    async def _connect_direct(
        self, peer_id: str, addresses: Sequence[tuple[str, int]], protocol: str
    ) -> DataStream:
        if not addresses:
            raise TransportError(f"{peer_id} has not gossiped a data address")
        remembered = self.reached.get(peer_id)
        port_of: dict[str, int] = {}
        for host, port in addresses:
            port_of.setdefault(host, port)  # the first port given for each host
        order = dial_order(
            list(port_of), self.interfaces, None if remembered is None else remembered[0]
        )
        address, stream = await first_to_connect(
            [(host, port_of[host]) for host in order],
            lambda a: self.open_stream(peer_id, a[0], a[1], protocol),
        )
        self.carried_until.pop(peer_id, None)
        self.reached.pop(peer_id, None)
        self.reached[peer_id] = address
        while len(self.reached) > MAX_REMEMBERED_PEERS:
            del self.reached[next(iter(self.reached))]
        return stream

    async def open_stream(self, peer_id: str, host: str, port: int, protocol: str) -> DataStream:
        """Connects to `peer_id` at host:port, checking its certificate, then proves ourselves."""
        assert self._contexts is not None
        tls: TlsSocket | None = None
        try:
            with trio.fail_after(_HANDSHAKE_TIMEOUT_S):
                tcp = await trio.open_tcp_stream(host, port)
                _tune(tcp)
                tls = TlsSocket.wrap(tcp, self._contexts[1], server_side=False)
                await tls.do_handshake()
                found = peer_id_in_certificate(tls.peer_certificate())
                if found != peer_id:
                    raise TransportError(f"the server is {found}, not {peer_id}")
                stream = DataStream(tls, peer_id)
                await self._prove_ourselves(stream, peer_id, protocol)
                return stream
        except BaseException as err:  # cancelled too: the socket is ours to close
            if tls is not None:
                await trio.aclose_forcefully(tls)
            if isinstance(err, (trio.TooSlowError, OSError, FrameError, TransportError)):
                raise TransportError(
                    f"data stream to {peer_id} at {host}:{port} failed: {err}"
                ) from None
            raise

    async def _prove_ourselves(self, stream: MeshStream, peer_id: str, protocol: str) -> MeshStream:
        """Answers the server's nonce with our signature and proof, and names `protocol`."""
        nonce = await receive_frame(stream)
        signature = self.identity.sign(_auth_message(nonce, peer_id, self.identity.peer_id))
        hello = [self.identity.peer_id, self.proof.encode(), signature, protocol]
        await send_frame(stream, records.encode("data-hello", hello))
        if await receive_frame(stream) != b"ok":
            raise TransportError(f"{peer_id} refused the data stream")
        return stream


async def echo_handler(stream: MeshStream) -> None:
    """Sends back everything it receives (benchmarks and tests)."""
    while data := await stream.receive_some(256 * 1024):
        await stream.send_all(data)
