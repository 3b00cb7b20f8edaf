"""The running mesh: the I/O shell that carries out `MeshCore`'s decisions over the Transport
seam, and the hello exchange that admits peers.

It talks only to the `Transport` seam, takes its clocks and its random source as arguments, and
so runs unchanged on libp2p and on the simulated network. Its parts: `OwnState` (our gossiped
state), `AntiEntropy` (exchanges of states and revocations), `Probing` (SWIM's probes and link
measurements); the decisions of when and with whom live in `MeshCore`, those of admission in
`HelloDesk`.

Every protocol but the hello is served only to admitted peers; anyone else is disconnected.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .addresses import LocalInterface
from .admission import HelloDesk
from .anti_entropy import GOSSIP, AntiEntropy
from .containment import HandlerFaults, contained
from .gossip import GossipStore, SignedState
from .hello import HELLO, Hello
from .identity import NodeIdentity
from .link_stats import ControlTraffic, PeerLink
from .member_states import MemberStates
from .membership import Admission, Proof, Revocation
from .membership_state import MembershipState
from .mesh_core import Action, Do, MeshCore
from .own_state import OwnState
from .peer_views import peer_rows
from .probing import BANDWIDTH, PING, PING_REQ, Probing, sink_and_acknowledge
from .random_source import RandomSource
from .revocation_sync import REVOCATIONS
from .send_queue import SendQueue
from .shell import PROTOCOL_FAULTS
from .swim import Liveness, Swim
from .timing import MeshTiming
from .transport.data_plane import DataPlane
from .transport.seam import Transport

_log = logging.getLogger("sharedllm.mesh")
_GONE = (Liveness.DEAD, Liveness.LEFT)


@dataclass
class MeshService(Hello, OwnState, AntiEntropy, Probing):
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
    on_state_news: Callable[[], None] | None = None  # news serving acts on at once
    interfaces: Callable[[], Sequence[LocalInterface]] = tuple  # this machine's addresses
    discovered: Callable[[], Sequence[str]] = tuple  # members' addresses found on the LAN

    def __post_init__(self) -> None:
        self.swim = Swim(self.identity.peer_id, self.rng, suspicion_s=self.timing.suspicion_s)
        self.core = MeshCore(
            self.identity.peer_id,
            self.timing,
            self.rng,
            self.swim,
            bootstrapped=True,
            measures_bandwidth=self.data_plane is not None,
        )
        self.hello_desk = HelloDesk(self.membership, self.identity, lambda: self.proof)
        self._tasks: trio.Nursery | None = None
        self._timers_moved = trio.Event()  # the core wants to be asked sooner than it said
        self._contents: dict[str, tuple[int, dict[str, Any]]] = {}
        self._hello_pending: set[str] = set()
        self._hello_expected: dict[str, float] = {}
        self._version = 0
        self._leaving = False
        self._state_rumors: SendQueue[SignedState] = SendQueue(capacity=64)
        self._summary_of_revocations = (-1, "")
        self._unsaved_revocations: list[Revocation] = []  # bounded by MAX_REVOCATIONS
        self._known = MemberStates()  # every stored state's content
        self._members = MemberStates()  # those of live members (and ours)
        self._runners: dict[Do, Callable[[str], Awaitable[object]]] = {
            Do.EXCHANGE: self._exchange_with,
            Do.EXCHANGE_AFAR: self._dial_and_exchange,
            Do.SYNC_REVOCATIONS: self._sync_revocations_with,
            Do.PROBE: self._probe,
            Do.CONNECT: self._connect_to,
            Do.INTRODUCE: self.introduce,
        }

    # -- running ---------------------------------------------------------------------------

    async def run(self, bootstrap: Sequence[str]) -> None:
        self.core.bootstrapped = not bootstrap
        self.transport.serve(HELLO, contained("control", HELLO, self._serve_hello, self.faults))
        for protocol, handler in (
            (GOSSIP, self._serve_gossip),
            (PING, self._serve_ping),
            (PING_REQ, self._serve_ping_request),
            (REVOCATIONS, self._serve_revocations),
        ):
            guarded = contained("control", protocol, self._members_only(handler), self.faults)
            self.transport.serve(protocol, guarded)
        if self.data_plane is not None:
            self.data_plane.serve(BANDWIDTH, sink_and_acknowledge)
        self._publish()
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            self.core.start(trio.current_time())
            while True:
                with trio.move_on_at(self.core.next_timer()):
                    await self._timers_moved.wait()
                self._timers_moved = trio.Event()
                for action in self.core.handle_timer(trio.current_time(), self):
                    await self._execute(action, bootstrap)

    async def _execute(self, action: Action, bootstrap: Sequence[str]) -> None:
        if action.do is Do.HEARTBEAT:
            self._heartbeat()
        elif action.do is Do.DISCONNECT:
            await self.transport.disconnect(action.peer)
        elif action.do is Do.DIAL_BOOTSTRAP:  # each address bounded on its own
            self._spawn(action, lambda _: self._dial_bootstrap(bootstrap), bounded=False)
        elif action.do is Do.MEASURE_BANDWIDTH:  # bounded by the probe itself
            self._spawn(action, self._bandwidth_round, bounded=False)
        else:
            self._spawn(action, self._runners[action.do])

    def _in_background(self, action: Action, run: Callable[[str], Awaitable[object]]) -> None:
        if self._tasks is not None and self.core.begin(action):
            self._spawn(action, run)

    def _spawn(
        self, action: Action, run: Callable[[str], Awaitable[object]], bounded: bool = True
    ) -> None:
        """Runs an action the core registered; reports its end to the core."""
        assert self._tasks is not None

        async def task() -> None:
            try:
                if bounded:
                    await self._bounded(action.do.value, action.peer, run)
                else:
                    await run(action.peer)
            finally:
                self.core.finished(action)

        self._tasks.start_soon(task)

    async def _bandwidth_round(self, peer: str) -> None:
        link = self.links.get(peer)
        unmeasured = link is None or link.bandwidth_mbps is None
        try:
            await self._measure_bandwidth(peer)
        finally:
            link = self.links.get(peer)
            first = unmeasured and link is not None and link.bandwidth_mbps is not None
            measured = all(measured for _, measured in self.bandwidth_candidates())
            now = trio.current_time()
            self.core.bandwidth_done(now, probed=True, all_measured=measured, first_figure=first)
            if first:
                self.measured_first()

    def measured_first(self) -> None:
        """A link's first figure: the core looks at our state soon."""
        self.core.measured_first(trio.current_time())
        self.timers_moved()

    def timers_moved(self) -> None:
        """The core may want to be asked sooner than it said: its loop looks again now."""
        self._timers_moved.set()

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

    # -- what MeshCore reads (MeshWorld) ------------------------------------------------------

    def connected_peers(self) -> Sequence[str]:
        return self.transport.connected_peers()

    def admitted_peers(self) -> set[str]:
        return self.admitted

    def saying_hello(self) -> set[str]:
        return self._hello_pending

    def known_states(self) -> int:
        return len(self.store.states)

    def revoked(self, peer: str) -> bool:
        return peer in self.membership.revocations

    # -- heartbeat ---------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Publishes when the core says so, declares the long suspected dead, forgets the
        long gone, and stops probing dead members we are not connected to."""
        now = trio.current_time()
        if self.core.should_publish(self._payload(), now, len(self.store.states)):
            self._publish()
        for peer in self.swim.tick(now):
            _log.info("peer %s declared dead (suspected for %.0f s)", peer, self.timing.suspicion_s)
        if self.core.forget_due(now):
            self._forget_long_gone(now)
        connected = set(self.transport.connected_peers())
        gone = [p for status in _GONE for p in self.swim.with_status(status)]
        for peer in [p for p in gone if p in self.core.neighbours and p not in connected]:
            self.core.dropped(peer)  # (a connected one may be back from the dead)

    def _forget_long_gone(self, now: float) -> None:
        """Bounded growth over time: members silent for `forget_gone_after_s` are dropped, by
        the age of their last state (the same on every node; a live member republishes at
        least every quarter of that), and those SWIM has held dead or left that long."""
        horizon = self.timing.forget_gone_after_s
        oldest = int((self.wall_clock() - horizon) * 1000)
        me = self.identity.peer_id
        gone = set(self.store.prune(oldest, keep=lambda peer: peer == me))
        gone.update(self.swim.gone_since(now - horizon))
        for peer in sorted(gone):
            self._drop_peer(peer)
        if gone:
            _log.info("forgot %d members gone for over %.0f s", len(gone), horizon)

    async def publish_now(self, peers: Sequence[str] = ()) -> None:
        """Republishes our state at once and pushes it to `peers` (a new claim must reach the
        workers before the engine dials them)."""
        self._publish()
        for peer in peers:
            with trio.move_on_after(self.timing.exchange_timeout_s):
                try:
                    await self._exchange_with(peer)
                except PROTOCOL_FAULTS as err:
                    _log.debug("push to %s failed: %s", peer, err)

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

    # -- revocations -------------------------------------------------------------------------

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
        self.core.dropped(peer)
        self.store.forget(peer)
        self._contents.pop(peer, None)
        self._known.drop(peer)
        self._members.drop(peer)
        self.swim.forget(peer)
        self._state_rumors.discard(peer)
        self.links.pop(peer, None)

    def take_unsaved_revocations(self) -> list[Revocation]:
        """Revocations learned since the last call, for the node to keep on disk."""
        taken, self._unsaved_revocations = self._unsaved_revocations, []
        return taken

    # -- views ------------------------------------------------------------------------------

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

    def peers(self) -> list[dict[str, Any]]:
        """Every member this node knows of, for `peers` and the status page."""
        return peer_rows(
            self.store.states,
            me=self.identity.peer_id,
            swim=self.swim,
            links=self.links,
            connected=set(self.transport.connected_peers()),
            revocations=self.membership.revocations,
            now=trio.current_time(),
        )
