"""The running mesh: membership handshake, gossip rounds, heartbeats, pings and reconnection.

This is the I/O shell around the sans-I/O cores (membership, gossip, failure detection). It
talks only to the `Transport` seam, takes its clocks and its random source as arguments, and so
runs unchanged on libp2p and on the simulated network.

Admission: when a connection opens, the dialer sends its membership proof on the hello
protocol and the listener answers with its own; each side checks the other's proof against the
mesh key and the revocations it knows. Every other protocol is served only to admitted peers;
anyone else is disconnected.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .containment import HandlerFaults, contained
from .gossip import (
    Digest,
    Exchange,
    GossipStore,
    SignedState,
    StateTooLargeError,
    next_version,
)
from .handshake_limiter import FailedHandshakeLimiter
from .identity import NodeIdentity
from .member_states import MemberStates
from .membership import Admission, MembershipError, Proof, Revocation
from .membership_state import AdmissionNeeded, MembershipState
from .probe_records import (
    News,
    decode_hello_reply,
    decode_ping_request,
    decode_probe_header,
    encode_hello_reply,
    encode_ping_request,
    encode_probe_header,
)
from .records import RecordError
from .revocation_sync import (
    REVOCATIONS,
    RevocationBatch,
    RevokedIds,
    answer,
    provide,
    summary_of,
)
from .send_queue import SendQueue
from .swim import Liveness, Rumor, Swim
from .transport.data_plane import DataPlane
from .transport.framing import FrameError, receive_frame, send_frame
from .transport.seam import MeshStream, StreamHandler, Transport, TransportError

HELLO = "/sharedllm/hello/2"
GOSSIP = "/sharedllm/gossip/2"
PING = "/sharedllm/ping/1"
PING_REQ = "/sharedllm/ping-req/1"
BANDWIDTH = "/sharedllm/bandwidth/2"
_ECHOES = 9  # round-trip samples after each bandwidth probe
_STATES_PER_PROBE = 4
_STATE_SENDS = 4
# An exchange that brought this many new states means we are behind (a node joining, or the
# whole mesh forming): the next round comes soon instead of after the big-mesh spacing.
_CATCHING_UP_STATES = 8
# Links to this many peers (the nearest) go into our state: the planner pairs a primary with
# nearby workers, and a state listing every member would grow with the mesh.
GOSSIPED_LINKS = 32
# Parts of our state that are measurements: they change all the time, so they alone do not
# make us publish; they are refreshed every `refresh_s`.
_MEASUREMENTS = frozenset({"links", "ram_free", "load", "devices"})
_log = logging.getLogger("sharedllm.mesh")
_PROTOCOL_FAULTS = (TransportError, FrameError, RecordError)
_GONE = (Liveness.DEAD, Liveness.LEFT)


class RandomSource(Protocol):
    """The part of `random.Random` the mesh uses; injected so a seed fixes every choice."""

    def random(self) -> float: ...

    def sample(self, population: Sequence[str], k: int) -> list[str]: ...

    def shuffle(self, x: list[str]) -> None: ...


@dataclass(frozen=True)
class MeshTiming:
    heartbeat_s: float = 1.0  # how often our state is checked for changes worth publishing
    refresh_s: float = 15.0  # how long measurements (links, free memory) may age, per 25 nodes
    gossip_interval_s: float = 1.0  # anti-entropy; stretched in big meshes (see _gossip_every)
    fanout: int = 3
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    indirect_probes: int = 3
    suspicion_s: float = 4.0
    rumors_per_message: int = 12
    bandwidth_probe_interval_s: float = 30.0
    bandwidth_probe_bytes: int = 4 * 1024 * 1024
    reconnect_interval_s: float = 2.0
    min_connections: int = 6
    full_mesh_up_to: int = 32  # a mesh this small keeps a connection to every member
    exchange_timeout_s: float = 5.0
    # Members gone (dead, left, or silent) this long are forgotten; their states are refused
    # from then on. Far above how long any live member goes without republishing.
    forget_gone_after_s: float = 24 * 3600.0
    forget_check_s: float = 60.0


@dataclass
class PeerLink:
    """What this node measured of its link to one peer."""

    rtt_ms: float | None = None  # control plane (libp2p), from probes
    jitter_ms: float = 0.0
    bandwidth_mbps: float | None = None  # data plane, from bulk probes
    data_rtt_ms: float | None = None  # data plane, after each bulk probe: what tunnels pay

    def observe(self, sample_ms: float) -> None:
        if self.rtt_ms is None:
            self.rtt_ms = sample_ms
            return
        self.jitter_ms = 0.75 * self.jitter_ms + 0.25 * abs(sample_ms - self.rtt_ms)
        self.rtt_ms = 0.8 * self.rtt_ms + 0.2 * sample_ms


@dataclass
class ControlTraffic:
    """Control-plane messages (hello, gossip, probes) this node sent and received."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    faults: int = 0  # exchanges that failed: malformed or oversized messages, timeouts, resets
    refused_streams: int = 0  # streams from peers that had not proved membership
    refused_hellos: int = 0  # hellos whose membership proof did not hold
    limited_hellos: int = 0  # hellos closed unread: their address failed too often lately

    def sent(self, size: int) -> None:
        self.messages_sent += 1
        self.bytes_sent += size

    def received(self, size: int) -> None:
        self.messages_received += 1
        self.bytes_received += size


@dataclass
class MeshService:
    transport: Transport
    identity: NodeIdentity
    membership: MembershipState
    proof: Proof
    name: str
    describe_self: Callable[[], Mapping[str, Any]]  # capacity, models... for our gossiped state
    wall_clock: Callable[[], float]  # for state versions, comparable across restarts
    rng: RandomSource
    timing: MeshTiming = field(default_factory=MeshTiming)
    data_plane: DataPlane | None = None
    store: GossipStore = field(default_factory=GossipStore)
    admitted: set[str] = field(default_factory=set)
    links: dict[str, PeerLink] = field(default_factory=dict)
    traffic: ControlTraffic = field(default_factory=ControlTraffic)
    faults: HandlerFaults = field(default_factory=lambda: HandlerFaults(trio.current_time))
    on_new_proof: Callable[[Proof], None] | None = None  # to keep an admission we were given
    _contents: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _in_flight: set[tuple[str, str]] = field(default_factory=set)
    _hello_pending: set[str] = field(default_factory=set)
    _tasks: trio.Nursery | None = None
    _version: int = 0
    _leaving: bool = False
    _catching_up: bool = False
    _bootstrapped: bool = False  # a bootstrap peer let us in (or we founded the mesh)
    _far_spacing: int = 1  # gossip rounds between exchanges with an unconnected member
    _rounds_to_far: int = 0

    def __post_init__(self) -> None:
        self.swim = Swim(self.identity.peer_id, self.rng, suspicion_s=self.timing.suspicion_s)
        self._state_rumors: SendQueue[SignedState] = SendQueue(capacity=64)
        self._published: dict[str, Any] | None = None
        self._summary_of_revocations: tuple[int, str] = (-1, "")
        self._unsaved_revocations: list[Revocation] = []  # bounded by MAX_REVOCATIONS
        self._published_at = -math.inf
        self._checked_gone_at = -math.inf
        self._failed_hellos = FailedHandshakeLimiter()  # per source address, like the data plane
        self._known = MemberStates()  # every stored state's content
        self._members = MemberStates()  # those of live members (and ours)
        # The peers we probe: those we connected with (either way), until they die. Each node
        # keeps a few connections and is a neighbour of those who keep one to it, so each is
        # probed about once a period without anyone holding a connection to every member.
        self._neighbours: dict[str, None] = {}

    # -- running ---------------------------------------------------------------------------

    async def run(self, bootstrap: Sequence[str]) -> None:
        self._bootstrapped = not bootstrap
        self.transport.serve(HELLO, contained("control", HELLO, self._serve_hello, self.faults))
        for protocol, handler in (
            (GOSSIP, self._serve_gossip),
            (PING, self._serve_ping),
            (PING_REQ, self._serve_ping_request),
            (REVOCATIONS, self._serve_revocations),
        ):
            guarded = contained("control", protocol, self._members_only(handler), self.faults)
            self.transport.serve(protocol, guarded)
        self._publish()
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            nursery.start_soon(self._every, self.timing.heartbeat_s, self._heartbeat)
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._every, self.timing.probe_interval_s, self._probe_round)
            nursery.start_soon(
                self._every, self.timing.reconnect_interval_s, self._reconnect, bootstrap
            )
            if self.data_plane is not None:
                self.data_plane.serve(BANDWIDTH, _sink_and_acknowledge)
                nursery.start_soon(self._bandwidth_loop)

    async def leave(self) -> None:
        """Announces a clean departure to a few peers (best effort, bounded in time)."""
        self._leaving = True
        self._publish()
        self.swim.leaving()
        peers = [p for p in self.transport.connected_peers() if p in self.admitted]
        with trio.move_on_after(2.0):
            async with trio.open_nursery() as nursery:
                for peer in self.rng.sample(peers, min(self.timing.fanout, len(peers))):
                    nursery.start_soon(self._bounded, "leave", peer, self._exchange_with)

    async def _every(self, interval_s: float, action: Callable[..., Any], *args: Any) -> None:
        while True:
            await action(*args)
            await trio.sleep(interval_s * (0.8 + 0.4 * self.rng.random()))

    # -- our own state ---------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {**self._facts(), "links": self._nearest_links()}

    def _facts(self) -> dict[str, Any]:
        """Our state without the link measurements (the costly part to gather)."""
        return {
            **self.describe_self(),
            "name": self.name,
            "proof": self.proof.encode(),
            "addrs": list(self.transport.listen_addrs()),
            "data_addr": None if self.data_plane is None else self.data_plane.advertised,
            "revoked": self._revocation_summary(),
            "leaving": self._leaving,
        }

    def _nearest_links(self) -> dict[str, dict[str, float | None]]:
        measured = sorted(
            (link.rtt_ms, peer)
            for peer, link in self.links.items()
            if link.rtt_ms is not None and self.swim.is_live(peer)
        )
        return {
            peer: {
                "rtt_ms": rtt,
                "jitter_ms": self.links[peer].jitter_ms,
                "bandwidth_mbps": self.links[peer].bandwidth_mbps,
                "data_rtt_ms": self.links[peer].data_rtt_ms,
            }
            for rtt, peer in measured[:GOSSIPED_LINKS]
        }

    def _revocation_summary(self) -> str:
        """The set only grows, so its size names the summary already computed."""
        count = len(self.membership.revocations)
        if self._summary_of_revocations[0] != count:
            self._summary_of_revocations = (count, summary_of(self.membership.revocations))
        return self._summary_of_revocations[1]

    def _publish(self) -> None:
        """Signs and spreads a new version of our state. A state over the size every peer
        enforces is published without its link measurements; if even that is too large, the
        last state stays and the error is logged (the node keeps running)."""
        payload = self._payload()
        version = next_version(self._version, self.wall_clock())
        try:
            state = SignedState.publish(self.identity, version, payload)
        except StateTooLargeError:
            payload = {**payload, "links": {}}
            try:
                state = SignedState.publish(self.identity, version, payload)
            except StateTooLargeError as err:
                self.faults.log.emit("state-too-large", "not publishing our state: %s", err)
                return
        self._version = version
        self.store.merge([state])
        self._remember(state, payload)
        self._published, self._published_at = payload, trio.current_time()
        self.swim.set_incarnation(self._version)
        self._queue_state(state)

    async def _heartbeat(self) -> None:
        """Publishes when something that matters changed, when measurements have aged past
        `refresh_s`, or to refute a suspicion; otherwise our state (and everyone's work on it)
        stays as it is."""
        facts = self._facts()
        previous = self._published or {}
        changed = any(
            facts.get(key) != previous.get(key)
            for key in set(facts) | set(previous)
            if key not in _MEASUREMENTS
        )
        # Every new state travels to every node: in a big mesh, measurements age longer so that
        # each node's share of that traffic stays bounded.
        # Never longer than a quarter of the horizon after which silent members are forgotten.
        refresh_s = min(
            self.timing.refresh_s * max(1.0, len(self.store.states) / 25),
            self.timing.forget_gone_after_s / 4,
        )
        stale = trio.current_time() - self._published_at >= refresh_s
        if changed or stale or self.swim.must_refute:
            self._publish()
        for peer in self.swim.tick(trio.current_time()):
            _log.info("peer %s declared dead (suspected for %.0f s)", peer, self.timing.suspicion_s)
        self._forget_long_gone()
        connected = set(self.transport.connected_peers())
        gone = [p for status in _GONE for p in self.swim.with_status(status)]
        for peer in [p for p in gone if p in self._neighbours and p not in connected]:
            del self._neighbours[peer]  # (a connected one may be back from the dead)

    async def _send(self, stream: MeshStream, payload: bytes) -> None:
        await send_frame(stream, payload)
        self.traffic.sent(len(payload))

    async def _receive(self, stream: MeshStream, timeout_s: float) -> bytes:
        payload = await receive_frame(stream, timeout_s)
        self.traffic.received(len(payload))
        return payload

    def _queue_state(self, state: SignedState) -> None:
        """Spreads a new state by piggybacking it on the next few probes. Each node that gets
        it passes it on, so a few sends each reach nearly every node; anti-entropy finds the
        rest. (More sends would not fit: a probe carries only a few states.)"""
        self._state_rumors.put(state.origin, state, _STATE_SENDS)

    async def publish_now(self, peers: Sequence[str] = ()) -> None:
        """Republishes our state at once and pushes it to `peers` (a new claim must reach the
        workers before the engine dials them)."""
        self._publish()
        for peer in peers:
            with trio.move_on_after(self.timing.exchange_timeout_s):
                try:
                    await self._exchange_with(peer)
                except _PROTOCOL_FAULTS as err:
                    _log.debug("push to %s failed: %s", peer, err)

    def member_states(self) -> MemberStates:
        """The gossiped states of this node and of every member neither dead nor gone (kept up
        to date as states and liveness change; read-only)."""
        for peer in self.swim.take_flipped():
            self._place_member(peer)
        return self._members

    def member_addresses(self, limit: int = 64) -> list[str]:
        """Addresses other live members gossip, a few per member (for a restart's bootstrap)."""
        found: list[str] = []
        for peer, content in self.member_states().items():
            addrs = content.get("addrs")
            if peer == self.identity.peer_id or not isinstance(addrs, list):
                continue
            found.extend(a for a in addrs[:2] if isinstance(a, str))
            if len(found) >= limit:
                break
        return found[:limit]

    def claimants(self) -> list[tuple[str, Mapping[str, Any]]]:
        """Every stored state that claims a model, live or not (epochs must only grow)."""
        return self._known.having("claims")

    def content_of(self, state: SignedState) -> dict[str, Any] | None:
        """A state's decoded content, decoded once per version."""
        cached = self._contents.get(state.origin)
        if cached is not None and cached[0] == state.version:
            return cached[1]
        try:
            content = state.content()
        except RecordError:
            return None
        self._contents[state.origin] = (state.version, content)
        return content

    def _remember(self, state: SignedState, content: dict[str, Any]) -> None:
        self._contents[state.origin] = (state.version, content)
        self._known.put(state.origin, content)
        self._place_member(state.origin)

    def _place_member(self, peer: str) -> None:
        content = self._known.get(peer)
        if (peer == self.identity.peer_id or self.swim.is_live(peer)) and content is not None:
            self._members.put(peer, content)
        else:
            self._members.drop(peer)

    # -- admission -------------------------------------------------------------------------

    async def _serve_hello(self, stream: MeshStream) -> None:
        peer, source, now = stream.remote_peer, stream.remote_host, trio.current_time()
        if source is not None and not self._failed_hellos.allows(source, now):
            self.traffic.limited_hellos += 1  # no proof is read or checked for it
            await self.transport.disconnect(peer)
            return
        try:
            theirs = await self._receive(stream, self.timing.exchange_timeout_s)
            admission = self._admission_for(theirs, peer)
        except (*_PROTOCOL_FAULTS, MembershipError, ValueError) as err:
            if source is not None:
                self._failed_hellos.failed(source, now)
            self.traffic.refused_hellos += 1
            self.faults.log.emit("refused-hello", "refused %s: %s", peer, err)
            # A revoked member is told so (the signed revocation), not just turned away.
            revocation = self.membership.revocations.get(peer)
            await self._send(stream, b"" if revocation is None else revocation.encode())
            await self.transport.disconnect(peer)
            return
        await self._send(stream, encode_hello_reply(self.proof.encode(), admission))
        self._admit(peer)

    def _admission_for(self, proof: bytes, peer: str) -> bytes:
        """Checks a hello's proof; a joiner's bare invite redemption is admitted here, by our
        clock (the encoded admission, else b"")."""
        try:
            self.membership.admit_encoded(proof, peer)
        except AdmissionNeeded:
            redemption = Proof.decode(proof).redemption
            assert redemption is not None
            granted = self.membership.grant(
                redemption, self.identity, self.proof, self.wall_clock()
            )
            return granted.encode()
        return b""

    def _adopt(self, admission: Admission) -> None:
        """A member admitted our redemption: from now on we show that admission (the earliest
        one we were given), and the node keeps it for its next start."""
        current = self.proof
        if current.redemption is None or (
            current.admission is not None and current.admission.admitted_at <= admission.admitted_at
        ):
            return
        proof = Proof(redemption=current.redemption, admission=admission)
        self.membership.admit(proof, self.identity.peer_id)
        self.proof = proof
        if self.data_plane is not None:
            self.data_plane.proof = proof
        if self.on_new_proof is not None:
            self.on_new_proof(proof)
        self._publish()

    async def introduce(self, peer: str) -> bool:
        """Runs the hello exchange with a newly connected peer; False (and disconnected) if
        either side refuses."""
        self._hello_pending.add(peer)
        try:
            stream = await self.transport.open_stream(peer, HELLO)
            try:
                await self._send(stream, self.proof.encode())
                reply = await self._receive(stream, self.timing.exchange_timeout_s)
            finally:
                self._hello_pending.discard(peer)
                await stream.aclose()
            if not reply:
                raise MembershipError("the peer refused our membership proof")
            try:
                theirs, admission = decode_hello_reply(reply)
            except RecordError:
                self.learn_revocation(Revocation.decode(reply))
                raise MembershipError("the peer refused us: this node is revoked") from None
            self.membership.admit_encoded(theirs, peer)
            if admission:
                self._adopt(Admission.decode(admission))
        except AdmissionNeeded:
            # A joiner whose own hello to us is on its way (it carries the redemption we admit
            # then): cutting the connection now would cut that hello too, again and again.
            _log.debug("%s has not been admitted yet; its own hello will be", peer)
            return False
        except (*_PROTOCOL_FAULTS, MembershipError, ValueError) as err:
            _log.warning("could not join %s: %s", peer, err)
            await self.transport.disconnect(peer)
            return False
        self._admit(peer)
        # Exchange states at once: two nodes that joined through different peers may each
        # belong to a group that has not heard of the other, and only such a first exchange
        # is sure to tell the groups apart from the start (random rounds may take minutes).
        self._in_background(GOSSIP, peer, self._exchange_with)
        return True

    def _admit(self, peer: str) -> None:
        if peer not in self.admitted:
            _log.info("admitted %s", peer)
        self.admitted.add(peer)
        self._neighbours[peer] = None

    def _members_only(self, handler: StreamHandler) -> StreamHandler:
        async def members_only(stream: MeshStream) -> None:
            if stream.remote_peer in self._hello_pending:
                return  # it admitted us and spoke before its answer to our hello reached us
            if stream.remote_peer not in self.admitted:
                self.faults.log.emit(
                    "no-proof", "dropping %s: no membership proof yet", stream.remote_peer
                )
                self.traffic.refused_streams += 1
                await self.transport.disconnect(stream.remote_peer)
                return
            await handler(stream)

        return members_only

    # -- gossip ----------------------------------------------------------------------------

    def _admit_state(self, state: SignedState) -> bool:
        try:
            content = state.content()
            proof = content.get("proof", b"")
            if not isinstance(proof, bytes):
                return False
            self.membership.admit_encoded(proof, state.origin)
        except (RecordError, MembershipError, ValueError, TypeError, AttributeError):
            return False
        self._contents[state.origin] = (state.version, content)
        return True

    def learn_revocation(self, revocation: Revocation) -> None:
        """Takes a mesh-signed revocation from anywhere (a peer, the admin's `revoke`): the
        peer loses its streams, connections and place in the view, and the record is kept."""
        if self.membership.add_revocation(revocation):
            self._unsaved_revocations.append(revocation)
            if revocation.peer_id == self.identity.peer_id:
                _log.error("this node has been revoked from the mesh: %s", revocation.reason)
            _log.warning("peer %s revoked: %s", revocation.peer_id, revocation.reason)
            if self.data_plane is not None:
                self.data_plane.cut(revocation.peer_id)  # its open tunnels and transfers too
            self._drop_peer(revocation.peer_id)

    def _drop_peer(self, peer: str) -> None:
        """Forgets everything about `peer` (revoked, or gone for long)."""
        self.admitted.discard(peer)
        self._neighbours.pop(peer, None)
        self.store.forget(peer)
        self._contents.pop(peer, None)
        self._known.drop(peer)
        self._members.drop(peer)
        self.swim.forget(peer)
        self._state_rumors.discard(peer)
        self.links.pop(peer, None)

    def _forget_long_gone(self) -> None:
        """Bounded growth over time: members silent for `forget_gone_after_s` are dropped, by
        the age of their last state (the same on every node; a live member republishes at
        least every quarter of that), and those SWIM has held dead or left that long."""
        now = trio.current_time()
        if now - self._checked_gone_at < self.timing.forget_check_s:
            return
        self._checked_gone_at = now
        horizon = self.timing.forget_gone_after_s
        oldest = int((self.wall_clock() - horizon) * 1000)
        me = self.identity.peer_id
        gone = set(self.store.prune(oldest, keep=lambda peer: peer == me))
        gone.update(self.swim.gone_since(now - horizon))
        for peer in sorted(gone):
            self._drop_peer(peer)
        if gone:
            _log.info("forgot %d members gone for over %.0f s", len(gone), horizon)

    def take_unsaved_revocations(self) -> list[Revocation]:
        """Revocations learned since the last call, for the node to keep on disk."""
        taken, self._unsaved_revocations = self._unsaved_revocations, []
        return taken

    async def _serve_revocations(self, stream: MeshStream) -> None:
        theirs = RevokedIds.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        await self._send(stream, answer(self.membership.revocations, theirs).encode())
        gift = RevocationBatch.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        for revocation in gift.revocations:
            self.learn_revocation(revocation)

    async def _sync_revocations_with(self, peer: str) -> None:
        stream = await self.transport.open_stream(peer, REVOCATIONS)
        try:
            await self._send(stream, RevokedIds.of(self.membership.revocations).encode())
            batch = RevocationBatch.decode(
                await self._receive(stream, self.timing.exchange_timeout_s)
            )
            for revocation in batch.revocations:
                self.learn_revocation(revocation)
            await self._send(stream, provide(self.membership.revocations, batch.wanted).encode())
        finally:
            await stream.aclose()

    def _sync_revocations(self, peers: Sequence[str]) -> None:
        """One revocation exchange a round, with a connected member whose set differs."""
        ours = self._revocation_summary()
        differing = [
            p
            for p in peers
            if p in self._known
            and self._known[p].get("revoked", ours) != ours
            and (REVOCATIONS, p) not in self._in_flight
        ]
        if differing:
            peer = differing[int(self.rng.random() * len(differing))]
            self._in_background(REVOCATIONS, peer, self._sync_revocations_with)

    def _merge(self, states: Sequence[SignedState]) -> int:
        """Keeps the new states among `states`; returns how many there were."""
        now = trio.current_time()
        accepted = self.store.merge(states, admit=self._admit_state)
        for state in accepted:
            if state.origin == self.identity.peer_id:
                continue
            self._queue_state(state)  # news travels on
            content = self.content_of(state)
            if content is None:
                continue
            if content.get("leaving") is True:
                self.swim.hear(Rumor(state.origin, Liveness.LEFT, state.version), now)
            else:
                self.swim.heard_of(state.origin, state.version, now)
            self._remember(state, content)
        return len(accepted)

    async def _gossip_loop(self) -> None:
        """Anti-entropy: full digest exchanges that repair whatever the rumors missed. A digest
        names every member, so in a big mesh the rounds are spaced out to keep each node's work
        per second bounded (rumors carry the news quickly in between). While exchanges bring
        many states (a node joining, a mesh forming), rounds follow each other quickly."""
        while True:
            self._catching_up = False
            await self._gossip_round()
            interval = self.timing.gossip_interval_s * (0.8 + 0.4 * self.rng.random())
            await trio.sleep(interval)  # this round's exchanges end meanwhile
            if not self._catching_up:
                spacing = max(1.0, len(self.store.states) / 50)
                await trio.sleep(interval * (spacing - 1.0))

    async def _gossip_round(self) -> None:
        """Starts exchanges with `fanout` random peers and goes on: a frozen peer holds up
        neither the other exchanges nor the next round."""
        peers = [
            p
            for p in self.transport.connected_peers()
            if p in self.admitted and (GOSSIP, p) not in self._in_flight
        ]
        for peer in self.rng.sample(peers, min(self.timing.fanout, len(peers))):
            self._in_background(GOSSIP, peer, self._exchange_with)
        self._exchange_afar(set(peers))
        self._sync_revocations(peers)
        await self._enforce_revocations()

    def _exchange_afar(self, connected: set[str]) -> None:
        """In a big mesh, one exchange a round with a random member we are not connected to:
        nodes that joined together may otherwise keep talking only among themselves, each
        knowing just the others of its group."""
        live = self.swim.live_members()
        self._rounds_to_far -= 1
        if len(live) <= self.timing.full_mesh_up_to or self._rounds_to_far > 0:
            return
        far = live[int(self.rng.random() * len(live))]
        if far not in connected:
            self._in_background(GOSSIP, far, self._dial_and_exchange)

    async def _dial_and_exchange(self, peer: str) -> None:
        """Once far exchanges stop finding members we did not know, they thin out (every
        second round, fourth..., up to every eighth); one that finds some brings them back."""
        known = len(self.store.states)
        if peer in self.transport.connected_peers() or await self._connect_to(peer):
            await self._exchange_with(peer)
        found = len(self.store.states) > known
        self._far_spacing = 1 if found else min(8, 2 * self._far_spacing)
        self._rounds_to_far = self._far_spacing

    def _in_background(
        self, kind: str, peer: str, action: Callable[[str], Awaitable[object]]
    ) -> None:
        """Runs `action(peer)` in the service's nursery, bounded in time, one per (kind, peer)."""
        if self._tasks is None or (kind, peer) in self._in_flight:
            return
        self._in_flight.add((kind, peer))

        async def run() -> None:
            try:
                await self._bounded(kind, peer, action)
            finally:
                self._in_flight.discard((kind, peer))

        self._tasks.start_soon(run)

    async def _bounded(
        self, kind: str, peer: str, action: Callable[[str], Awaitable[object]]
    ) -> None:
        with trio.move_on_after(self.timing.exchange_timeout_s):
            try:
                await action(peer)
            except _PROTOCOL_FAULTS as err:
                self.traffic.faults += 1
                _log.debug("%s with %s failed: %s", kind, peer, err)

    async def _exchange_with(self, peer: str) -> None:
        stream = await self.transport.open_stream(peer, GOSSIP)
        try:
            await self._send(stream, self.store.digest().encode())
            answer = Exchange.decode(await self._receive(stream, self.timing.exchange_timeout_s))
            known = len(self.store.states)
            self._note_news(self._merge(answer.states), answer.more, known)
            await self._send(stream, self.store.provide(answer.wanted).encode())
        finally:
            await stream.aclose()

    async def _serve_gossip(self, stream: MeshStream) -> None:
        digest = Digest.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        # A peer that knows many more members than we do: we are behind (a group of nodes
        # that joined together may have heard only of each other).
        self._note_news(len(digest.versions) - len(self.store.states), more=False)
        await self._send(stream, self.store.answer(digest).encode())
        pushed = Exchange.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        known = len(self.store.states)
        self._note_news(self._merge(pushed.states), pushed.more, known)

    def _note_news(self, new_states: int, more: bool, members_before: int | None = None) -> None:
        """An exchange that brought many states, had to leave some out or taught us of a
        member we did not know means we are behind (or the mesh is forming): the next round
        comes soon. Refreshed states of known members alone do not."""
        new_members = 0 if members_before is None else len(self.store.states) - members_before
        if more or new_states >= _CATCHING_UP_STATES or new_members > 0:
            self._catching_up = True

    async def _enforce_revocations(self) -> None:
        for peer in list(self.transport.connected_peers()):
            if peer in self.membership.revocations:
                await self.transport.disconnect(peer)

    # -- links and reconnection -----------------------------------------------------------------

    def _news(self) -> bytes:
        """What every probe and answer carries: a few rumors and a few new states."""
        rumors = self.swim.rumors_to_send(self.timing.rumors_per_message)
        return News(tuple(rumors), tuple(self._state_rumors.take(_STATES_PER_PROBE))).encode()

    def _take_news(self, data: bytes) -> None:
        news = News.decode(data, 4 * self.timing.rumors_per_message, _STATES_PER_PROBE)
        now = trio.current_time()
        for rumor in news.rumors:
            self.swim.hear(rumor, now)
        self._merge(news.states)

    async def _serve_ping(self, stream: MeshStream) -> None:
        self._take_news(await self._receive(stream, self.timing.exchange_timeout_s))
        await self._send(stream, self._news())

    async def _ping(self, peer: str) -> None:
        """One probe: news out, news back, and the round trip as an RTT sample."""
        started = trio.current_time()
        stream = await self.transport.open_stream(peer, PING)
        try:
            await self._send(stream, self._news())
            answer = await self._receive(stream, self.timing.probe_timeout_s)
        finally:
            await stream.aclose()
        self.links.setdefault(peer, PeerLink()).observe((trio.current_time() - started) * 1000)
        self._take_news(answer)

    async def _serve_ping_request(self, stream: MeshStream) -> None:
        """Probes a member on behalf of a peer that could not reach it (indirect probe)."""
        target = decode_ping_request(await self._receive(stream, self.timing.exchange_timeout_s))
        reached = target in self.admitted and await self._try(self._ping, target)
        await self._send(stream, b"1" if reached else b"0")

    async def _ask_to_ping(self, helper: str, target: str) -> bool:
        stream = await self.transport.open_stream(helper, PING_REQ)
        try:
            await self._send(stream, encode_ping_request(target))
            return await self._receive(stream, 2 * self.timing.probe_timeout_s) == b"1"
        finally:
            await stream.aclose()

    async def _try(self, action: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Whether `action` finishes without a fault within the probe timeout."""
        with trio.move_on_after(2 * self.timing.probe_timeout_s):
            try:
                result = await action(*args)
            except _PROTOCOL_FAULTS:
                return False
            return result is not False
        return False

    async def _probe_round(self) -> None:
        target = self.swim.next_probe(self._neighbours)
        if target is not None:
            self._in_background(PING, target, self._probe)

    async def _probe(self, target: str) -> None:
        """SWIM's probe: direct, then through a few others, then suspicion."""
        now = trio.current_time()
        reached = target in self.transport.connected_peers() or await self._try(
            self._connect_to, target
        )
        if reached and await self._try(self._ping, target):
            self.swim.probe_answered(target, trio.current_time())
            return
        helpers = [
            p for p in self.transport.connected_peers() if p in self.admitted and p != target
        ]
        chosen = self.rng.sample(helpers, min(self.timing.indirect_probes, len(helpers)))
        answered = False
        async with trio.open_nursery() as nursery:

            async def ask(helper: str) -> None:
                nonlocal answered
                if await self._try(self._ask_to_ping, helper, target):
                    answered = True
                    nursery.cancel_scope.cancel()

            for helper in chosen:
                nursery.start_soon(ask, helper)
        if answered:
            self.swim.probe_answered(target, trio.current_time())
        else:
            _log.debug("probe of %s failed directly and through %d others", target, len(chosen))
            self.swim.probe_failed(target, now)

    async def _connect_to(self, peer: str) -> bool:
        """Dials a member we know of by its gossiped addresses and proves membership."""
        state = self.store.states.get(peer)
        content = None if state is None else self.content_of(state)
        addresses = [] if content is None else content.get("addrs", [])
        for address in [a for a in addresses if isinstance(a, str)][:4]:
            try:
                if await self.transport.connect(address) == peer:
                    return await self.introduce(peer)
            except TransportError as err:
                _log.debug("cannot reach %s at %s: %s", peer, address, err)
        return False

    async def _bandwidth_loop(self) -> None:
        """One probe per interval (so serving traffic keeps the links), sooner while some
        member's link has not been measured yet."""
        while True:
            probed = await self._bandwidth_probe()
            measured = all(
                self.links.get(peer, PeerLink()).bandwidth_mbps is not None
                for peer in self.admitted
            )
            quiet = (
                self.timing.bandwidth_probe_interval_s
                if probed and measured
                else self.timing.reconnect_interval_s
            )
            await trio.sleep(quiet * (0.8 + 0.4 * self.rng.random()))

    async def _bandwidth_probe(self) -> bool:
        """Times a bulk transfer over the data plane to one random peer."""
        assert self.data_plane is not None
        candidates = []
        for peer in sorted(self.admitted):
            address = data_address(self.store.states.get(peer))
            if address is not None:
                candidates.append((peer, address))
        unmeasured = [
            c for c in candidates if self.links.get(c[0], PeerLink()).bandwidth_mbps is None
        ]
        candidates = unmeasured or candidates
        if not candidates:
            return False
        peer, (host, port) = candidates[int(self.rng.random() * len(candidates))]
        size = self.timing.bandwidth_probe_bytes
        with trio.move_on_after(self.timing.exchange_timeout_s * 4):
            try:
                stream = await self.data_plane.open_stream(peer, host, port, BANDWIDTH)
                try:
                    started = trio.current_time()
                    await send_frame(stream, encode_probe_header(size))
                    block = bytes(256 * 1024)
                    for _ in range(size // len(block)):
                        await stream.send_all(block)
                    await receive_frame(stream, self.timing.exchange_timeout_s)
                    seconds = trio.current_time() - started
                    round_trip_s = await _time_echoes(stream, self.timing.exchange_timeout_s)
                finally:
                    await stream.aclose()
                link = self.links.setdefault(peer, PeerLink())
                link.bandwidth_mbps = size * 8 / seconds / 1e6
                link.data_rtt_ms = round_trip_s * 1000
            except _PROTOCOL_FAULTS as err:
                _log.debug("bandwidth probe to %s failed: %s", peer, err)
        return True

    async def _reconnect(self, bootstrap: Sequence[str]) -> None:
        """Back to the bootstrap addresses when alone; otherwise keeps a connection to every
        member of a small mesh, and to a few in a big one (the probe and link measurements
        cover the peers connected either way)."""
        connected = set(self.transport.connected_peers())
        if not connected or not self._bootstrapped:
            await self._dial_bootstrap(bootstrap, connected)
            if not connected:
                return
        for peer in sorted(connected - self.admitted - self._hello_pending):
            # Connected without a hello that went through (it failed or timed out on one
            # side): without one, neither side gossips with the other.
            self._in_background(HELLO, peer, self.introduce)
        live = self.swim.live_members()
        small = len(live) <= self.timing.full_mesh_up_to
        missing = (len(live) if small else self.timing.min_connections) - len(connected)
        if missing > 0:
            unconnected = sorted(set(live) - connected)
            for peer in self.rng.sample(unconnected, min(missing, len(unconnected))):
                if small:
                    # A probe: it connects first, and a member nobody here reaches becomes
                    # suspect. Otherwise a member we know only through gossip would stay alive
                    # for as long as a partition cuts us off from all its neighbours.
                    self._in_background(PING, peer, self._probe)
                else:  # our few connections are chosen at random: one failing proves little
                    self._in_background("connect", peer, self._connect_to)

    async def _dial_bootstrap(self, bootstrap: Sequence[str], connected: set[str]) -> None:
        """Dials the bootstrap addresses until one of them has let us in. Being connected is
        not enough: nodes that joined through us may have dialed us while our own way in
        failed, and such a group would otherwise live on as a mesh of its own."""
        for address in bootstrap:
            with trio.move_on_after(self.timing.exchange_timeout_s):
                try:
                    peer = await self.transport.connect(address)
                except TransportError as err:
                    _log.debug("cannot reach %s: %s", address, err)
                    continue
                if peer == self.identity.peer_id:
                    continue
                # A new connection proves membership again, even to a peer admitted before:
                # the other side may have restarted and forgotten us.
                if peer not in connected or peer not in self.admitted:
                    connected.add(peer)
                    await self.introduce(peer)
                if peer in self.admitted:
                    self._bootstrapped = True

    # -- views ------------------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        """Every member this node knows of, for `peers` and the status page."""
        now = trio.current_time()
        rows = []
        for origin, state in sorted(self.store.states.items()):
            try:
                content = state.content()
            except RecordError:
                continue
            content.pop("proof", None)
            me = origin == self.identity.peer_id
            status = "self" if me else self.swim.status(origin).value
            since = self.swim.status_since(origin)
            link = self.links.get(origin)
            rows.append(
                {
                    "peer_id": origin,
                    "state": status,
                    "rtt_ms": None if link is None else link.rtt_ms,
                    "bandwidth_mbps": None if link is None else link.bandwidth_mbps,
                    "data_rtt_ms": None if link is None else link.data_rtt_ms,
                    "status_for_s": None if me or since is None else now - since,
                    "connected": origin in self.transport.connected_peers(),
                    **content,
                }
            )
        for peer_id, revocation in sorted(self.membership.revocations.items()):
            rows.append({"peer_id": peer_id, "state": "revoked", "reason": revocation.reason})
        return rows


def data_address(state: SignedState | None) -> tuple[str, int] | None:
    if state is None:
        return None
    try:
        value = state.content().get("data_addr")
    except RecordError:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        return value[0], value[1]
    return None


async def _sink_and_acknowledge(stream: MeshStream) -> None:
    """The far end of a bandwidth probe: reads the announced byte count, acknowledges, then
    echoes the prober's small frames (its round-trip samples)."""
    remaining = decode_probe_header(await receive_frame(stream))
    while remaining > 0:
        chunk = await stream.receive_some(min(remaining, 256 * 1024))
        if not chunk:
            return
        remaining -= len(chunk)
    await send_frame(stream, b"k")
    for _ in range(_ECHOES):
        await send_frame(stream, await receive_frame(stream))


async def _time_echoes(stream: MeshStream, timeout_s: float) -> float:
    """The median round trip of small frames on a data-plane stream, in seconds."""
    samples = []
    for index in range(_ECHOES):
        started = trio.current_time()
        await send_frame(stream, index.to_bytes(8, "big"))
        await receive_frame(stream, timeout_s)
        samples.append(trio.current_time() - started)
    return statistics.median(samples)
