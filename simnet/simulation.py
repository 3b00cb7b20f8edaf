"""A mesh of N nodes running the real mesh and election code on the simulated network.

Each node is a real `MeshService` (membership handshake, signed gossip, failure detection) and a
real `Elector`, wired to a `SimTransport`; nothing in `mesh/` or `scheduler/` knows it is
simulated. The simulation adds what a test needs: starting, crashing and restarting nodes,
partitions, and invariants checked against every live node's view.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..mesh.claims import Claim
from ..mesh.election import Elector
from ..mesh.gossip_reader import current_claims
from ..mesh.identity import NodeIdentity
from ..mesh.membership import Certificate, MeshKey, Proof, Revocation
from ..mesh.membership_state import MembershipState
from ..mesh.memory_ledger import claim_memory
from ..mesh.service import MeshService
from ..mesh.timing import MeshTiming
from ..node.serving.reconciler import JobKey, Running, reconcile
from ..node.serving.replica_choice import InFlight
from ..scheduler.model_profile import ModelProfile, profile_to_dict
from ..scheduler.placement import ModelRequest
from ..scheduler.planner import DEFAULT_COST
from .network import LinkProfile, SimNetwork, SimTransport

GIB = 1024**3
MIB = 1024**2
ELECTION_STEP_S = 0.5
# A 4 GiB, 32-layer model: a few nodes of the default size must share it.
SIM_MODEL = ModelProfile(
    name="sim-8b",
    architecture="llama",
    layer_weight_bytes=(110 * MIB,) * 32,
    embedding_bytes=250 * MIB,
    output_bytes=250 * MIB,
    other_bytes=1 * MIB,
    kv_bytes_per_token_per_layer=128 * 1024,
    embedding_length=4096,
    vocab_size=128_000,
    context_length=8192,
)


SIM_CONTEXT = 4096


@dataclass(frozen=True)
class SimModel:
    """A model some nodes hold, as its holders gossip it."""

    profile: ModelProfile
    context: int = SIM_CONTEXT
    slots: int = 1
    max_replicas: int = 1

    @property
    def model_id(self) -> str:
        return self.profile.name

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "context": self.context,
            "profile": profile_to_dict(self.profile),
            "slots": self.slots,
            "min_replicas": 1,
            "max_replicas": self.max_replicas,
        }

    def request(self) -> ModelRequest:
        return ModelRequest(self.model_id, self.profile, self.context, True, self.slots)


@dataclass
class SimNode:
    index: int
    identity: NodeIdentity
    transport: SimTransport
    service: MeshService
    elector: Elector
    ram_bytes: int
    offers: tuple[SimModel, ...]
    requests: InFlight = field(default_factory=InFlight)  # sent from this node's "API"
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    alive: bool = False

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def holds_model(self) -> bool:
        return bool(self.offers)


@dataclass
class Simulation:
    seed: int
    timing: MeshTiming = field(default_factory=MeshTiming)
    link: LinkProfile = field(default_factory=LinkProfile)
    nodes: list[SimNode] = field(default_factory=list)
    claims_seen: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    elections: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.network = SimNetwork(random.Random(self.rng.random()), self.link)
        self.mesh_key = MeshKey.generate(self._seed_bytes("mesh"))
        self._nursery: trio.Nursery | None = None

    def _seed_bytes(self, label: str) -> bytes:
        return random.Random(f"{self.seed}:{label}").randbytes(32)

    # -- building ------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hosts the nodes' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def add_node(
        self,
        ram_bytes: int = 8 * GIB,
        holds_model: bool = False,
        offers: Sequence[SimModel] = (),
    ) -> SimNode:
        """A node; `holds_model` offers the default `SIM_MODEL`, `offers` any models."""
        index = len(self.nodes)
        identity = NodeIdentity.from_seed(self._seed_bytes(f"node{index}"))
        offered = tuple(offers) or ((SimModel(SIM_MODEL),) if holds_model else ())
        node = self._make_node(index, identity, ram_bytes, offered)
        self.nodes.append(node)
        return node

    def _make_node(
        self, index: int, identity: NodeIdentity, ram_bytes: int, offers: tuple[SimModel, ...]
    ) -> SimNode:
        transport = self.network.add_node(identity.peer_id)
        certificate = Certificate.issue(
            self.mesh_key, identity.peer_id, f"n{index}", ["member"], 0.0
        )
        elector = Elector(identity.peer_id)
        node_rng = random.Random(self.rng.random())
        requests = InFlight()
        entries = [model.entry() for model in offers]

        def describe() -> dict[str, Any]:
            demand = requests.demand.report(trio.current_time())
            return {
                "ram_total": ram_bytes,
                "vram_total": 0,
                "gflops": 50.0 + index % 7 * 10,
                "rpc_protocol": "7.0.0",
                "memory_cap": None,
                "models": entries,
                "claims": elector.gossiped_claims(),
                "problems": dict(sorted(elector.problems.items())),
            } | ({"demand": demand} if demand else {})

        service = MeshService(
            transport=transport,
            identity=identity,
            membership=MembershipState(self.mesh_key.public_key),
            proof=Proof(certificate=certificate),
            name=f"n{index}",
            describe_self=describe,
            wall_clock=trio.current_time,
            rng=node_rng,
            timing=self.timing,
        )
        return SimNode(index, identity, transport, service, elector, ram_bytes, offers, requests)

    def start(self, node: SimNode, bootstrap: Sequence[SimNode]) -> None:
        assert self._nursery is not None
        node.alive = True
        node.transport.up = True
        node.scope = trio.CancelScope()
        addresses = [a for other in bootstrap for a in other.transport.listen_addrs()]
        self._nursery.start_soon(self._run_node, node, addresses)

    async def _run_node(self, node: SimNode, bootstrap: list[str]) -> None:
        with node.scope:
            async with trio.open_nursery() as nursery:
                node.transport.nursery = nursery
                nursery.start_soon(node.service.run, bootstrap)
                if node.holds_model:  # only a holder can lead or claim; the others just route
                    nursery.start_soon(self._elect, node)

    async def _elect(self, node: SimNode) -> None:
        """A real node's serving loop: the election step, then the same reconciler, carried
        out by stand-ins for the engines (they start ready at once and have no requests to
        finish when replaced)."""
        engines: dict[JobKey, bool] = {}
        while True:
            elector = node.elector
            before = elector.gossiped_claims()
            elector.note_epochs(node.service.claimants())
            states = elector.step(trio.current_time(), node.service.member_states())
            changes = reconcile(
                node.peer_id,
                {model.model_id for model in node.offers},
                states,
                claims=elector.claims,
                handing_over=elector.handing_over,
                running=Running(primaries=engines),
            )
            for key in changes.stop_primaries:
                del engines[key]
            for claim in changes.start_primaries:
                engines[(claim.model_id, claim.rank)] = True
            for unit, epoch, _ in changes.serving:
                elector.set_serving(unit, epoch, True)  # no engine to wait for
            for old in changes.wind_down:
                elector.end_handover(old.unit, old.epoch)  # no requests to finish
            for claim in elector.claims.values():
                self._note_claim(claim)
            if elector.gossiped_claims() != before:
                self.elections += 1
                workers = {w for c in elector.claims.values() for w in c.workers}
                await node.service.publish_now(sorted(workers))
            await trio.sleep(ELECTION_STEP_S)

    def _note_claim(self, claim: Claim) -> None:
        self.claims_seen.setdefault((claim.unit, claim.epoch), set()).add(claim.primary)

    # -- faults --------------------------------------------------------------------------------

    def crash(self, node: SimNode) -> None:
        node.alive = False
        node.scope.cancel()
        self.network.crash(node.peer_id)

    def restart(self, node: SimNode, bootstrap: Sequence[SimNode], keep_state: bool) -> SimNode:
        """Starts a crashed node's machine again. A real node keeps only its data directory:
        with `keep_state` it comes back with the same identity (and empty memory); without, its
        disk was wiped and a new identity joins in its place (the old one stays dead)."""
        assert not node.alive
        if keep_state:
            identity = node.identity
        else:
            identity = NodeIdentity.from_seed(self._seed_bytes(f"node{node.index}-wiped"))
        fresh = self._make_node(node.index, identity, node.ram_bytes, node.offers)
        if keep_state:
            self.nodes[self.nodes.index(node)] = fresh
        else:
            self.nodes.append(fresh)
        self.start(fresh, bootstrap)
        return fresh

    def revoke(self, node: SimNode, via: SimNode) -> None:
        """An admin's revocation, entered at node `via` (as `sharedllm-node revoke` does)."""
        revocation = Revocation.issue(self.mesh_key, node.peer_id, "revoked in simulation", 0.0)
        via.service.membership.add_revocation(revocation)

    # -- views and invariants -------------------------------------------------------------------

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if n.alive]

    def members_seen(self, node: SimNode) -> set[str]:
        return set(node.service.member_states().ids())

    def converged(self, expected: set[str] | None = None) -> bool:
        """Every live node sees exactly the live nodes (or `expected`) as members."""
        wanted = expected if expected is not None else {n.peer_id for n in self.live()}
        return all(n.service.member_states().ids() == wanted for n in self.live())

    def placements_agree(self) -> bool:
        views = [current_claims(n.service.member_states()) for n in self.live()]
        return all(v == views[0] for v in views)

    def running_claims(self) -> list[Claim]:
        """The placements that hold memory now: each unit's highest claim among the live
        primaries (a lower one is fenced: its workers serve it nothing), and the claims still
        finishing their requests (replaced or retiring)."""
        best: dict[str, Claim] = {}
        finishing: list[Claim] = []
        for node in self.live():
            finishing.extend(node.elector.handing_over.values())
            for unit, claim in node.elector.claims.items():
                if unit not in best or claim.rank > best[unit].rank:
                    best[unit] = claim
        return [*best.values(), *(c for c in finishing if c not in best.values())]

    def overcommitted_nodes(self, models: Sequence[SimModel]) -> list[str]:
        """Nodes whose memory the running placements book beyond what the node has."""
        requests = {model.model_id: model.request() for model in models}
        usable = {node.peer_id: node.ram_bytes for node in self.live()}
        booked: dict[str, int] = {}
        for claim in self.running_claims():
            request = requests.get(claim.model_id)
            if request is None:
                continue
            for peer, amount in claim_memory(request, DEFAULT_COST, claim).items():
                booked[peer] = booked.get(peer, 0) + amount
        return sorted(p for p, amount in booked.items() if amount > usable.get(p, 0))

    def election_safety_violations(self) -> list[tuple[str, int, set[str]]]:
        """(model, epoch, primaries) for every epoch claimed by more than one primary."""
        return [(m, e, p) for (m, e), p in sorted(self.claims_seen.items()) if len(p) > 1]
