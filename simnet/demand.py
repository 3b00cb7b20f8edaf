"""The `demand` scenario: many models, demand that shifts over virtual time, replicas following it.

Twenty models of mixed sizes (some fit one node, some need a split), each held by a few nodes
and allowed up to four replicas, in a mesh of up to a thousand nodes. A set of entry nodes plays
the API: each sends simulated requests (of `REQUEST_S` each) at a rate that gives each model the
demand of its phase, routing them as the real API does — to a replica of a unit the election
asks for, that serves in the entry node's view, picked by `choose_replica` — and meters them as
the real API does, so the demand the mesh plans by is measured, not given.

Checked at every step: no node's memory is booked beyond what it has by the placements running
(`memory_overcommitted`), no (model, replica, epoch) has two primaries (`two_primaries`), and
every request goes to a placement its primary really serves (`routed_to_non_serving`). The
replica count tracks demand: once a model's demand has held for `GROW_BOUND_S` after rising (or
`SHRINK_BOUND_S` after falling: the shrink rule waits out its two-minute peak), its serving
replicas equal what the demand asks for, capped by its maximum; every sample that misses is
counted in `replica_tracking_misses`.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..mesh.election import replica_requests
from ..mesh.gossip_reader import GossipReader
from ..node.serving.replica_choice import ReplicaKey, ReplicaLoad, choose_replica
from ..scheduler.model_profile import ModelProfile
from ..scheduler.replica_demand import GROW_AT
from .simulation import GIB, MIB, SimModel, SimNode, Simulation

if TYPE_CHECKING:
    from .scenarios import Report

MODELS = 20
HOLDERS_PER_MODEL = 4
MAX_REPLICAS = 4
SLOTS = 4
REQUEST_S = 5.0
TICK_S = 0.5
SAMPLE_S = 10.0
GROW_BOUND_S = 75.0  # a rise: the half-minute window, the settle time, loading
SHRINK_BOUND_S = 180.0  # a fall: the two-minute peak window, then the same
IDLE_DEMAND = 0.5
# (start, demand by model index) of each phase, from when every model is served
PHASE_S = (0.0, 90.0, 240.0, 390.0)
END_S = 600.0


def models(count: int = MODELS) -> list[SimModel]:
    """Mixed sizes: 12 to 32 layers of 20 to 200 MiB, so some models need a split."""
    found = []
    for index in range(count):
        layers = (12, 20, 32)[index % 3]
        layer = (20, 60, 120, 200)[index % 4] * MIB
        profile = ModelProfile(
            name=f"sim-model-{index:02d}",
            architecture="llama",
            layer_weight_bytes=(layer,) * layers,
            embedding_bytes=layer * 2,
            output_bytes=layer * 2,
            other_bytes=MIB,
            kv_bytes_per_token_per_layer=16 * 1024,
            embedding_length=2048,
            vocab_size=64_000,
            context_length=4096,
        )
        found.append(SimModel(profile, context=2048, slots=SLOTS, max_replicas=MAX_REPLICAS))
    return found


def demand_at(model_index: int, since_start: float) -> float:
    """Requests in flight the clients aim at for a model: idle, then a third of the models
    busy (a few replicas' worth) and a quarter flooded (past their maximum), then the busy
    ones calm while others heat up, then all idle again."""
    phase = sum(1 for start in PHASE_S if since_start >= start) - 1
    group = model_index % 4
    if phase == 1 and group in (0, 1):
        return 8.0 if group == 0 else 24.0
    if phase == 2 and group in (1, 2):
        return 24.0 if group == 1 else 8.0
    return IDLE_DEMAND


def expected_replicas(demand: float) -> int:
    """What a steady demand asks for once it has held (the grow rule, capped)."""
    return max(1, min(MAX_REPLICAS, math.ceil(demand / (SLOTS * GROW_AT))))


@dataclass(frozen=True)
class _Replica:
    key: ReplicaKey
    unit: str
    slots: int


@dataclass
class _Client:
    node: SimNode
    reader: GossipReader = field(default_factory=GossipReader)
    due: list[tuple[float, int]] = field(default_factory=list)  # (end, token) heap
    # Fractional requests not yet sent, per model, from `head_start` (clients start out of
    # step, so that a light demand arrives spread out rather than from every client at once)
    owed: dict[str, float] = field(default_factory=dict)
    head_start: float = 0.0


@dataclass
class DemandRun:
    sim: Simulation
    catalog: list[SimModel]
    clients: list[_Client]
    report: Report
    started: float = 0.0
    routed: int = 0
    unserved: int = 0
    changed_at: dict[str, tuple[float, bool]] = field(default_factory=dict)  # (when, rose)
    demand_seen: dict[str, float] = field(default_factory=dict)  # at the last sample
    holders: dict[str, int] = field(default_factory=dict)  # model -> nodes holding it
    by_id: dict[str, SimNode] = field(default_factory=dict)

    def send(self, now: float) -> None:
        """One tick of every client: end the requests due, send the new ones."""
        since = now - self.started
        for client in self.clients:
            while client.due and client.due[0][0] <= now:
                _, token = heapq.heappop(client.due)
                client.node.requests.end(token, now)
            serving = self._serving_view(client)
            for index, model in enumerate(self.catalog):
                rate = demand_at(index, since) / REQUEST_S / len(self.clients)
                owed = client.owed.get(model.model_id, client.head_start) + rate * TICK_S
                while owed >= 1.0:
                    owed -= 1.0
                    self._send_one(client, serving.get(model.model_id, []), now)
                client.owed[model.model_id] = owed

    def _serving_view(self, client: _Client) -> dict[str, list[_Replica]]:
        """model -> the replicas the client may route to: of the units the election asks for
        (as the real API's election step gives them), serving, on live nodes."""
        members = client.node.service.member_states()
        current = client.reader.current_claims(members)
        offered = client.reader.offered_models(members)
        units = replica_requests(offered, client.reader.mesh_demand(members), current)
        found: dict[str, list[_Replica]] = {}
        for request in units:
            claim = current.get(request.unit)
            if claim is None or not claim.serving or not claim.nodes_in(members):
                continue
            key = (claim.model_id, claim.epoch, claim.primary)
            found.setdefault(claim.model_id, []).append(_Replica(key, claim.unit, claim.slots))
        return found

    def _send_one(self, client: _Client, replicas: list[_Replica], now: float) -> None:
        if not replicas:
            self.unserved += 1
            return
        requests = client.node.requests
        loads = [ReplicaLoad(r.key, r.slots, requests.count(r.key, now), 1.0) for r in replicas]
        chosen = choose_replica(loads, None, frozenset()).key
        replica = next(r for r in replicas if r.key == chosen)
        if not self._really_serves(replica):
            self.report.invariant_violations["routed_to_non_serving"] += 1
        token = requests.start(chosen, now)
        heapq.heappush(client.due, (now + REQUEST_S, token))
        self.routed += 1

    def _really_serves(self, replica: _Replica) -> bool:
        """Whether the replica's primary, as it is now, serves the request: it runs that
        placement and serves it, or (as a real primary's API tunnels do for a sender whose
        view is behind) leads a newer serving placement of the model."""
        model_id, epoch, primary = replica.key
        node = self.by_id.get(primary)
        if node is None or not node.alive:
            return False
        elector = node.elector
        own = (elector.claims.get(replica.unit), elector.handing_over.get(replica.unit))
        if any(c is not None and c.epoch == epoch and c.serving for c in own):
            return True
        return any(
            c.model_id == model_id and c.epoch > epoch and c.serving and c.primary == primary
            for c in elector.claims.values()
        )

    def check(self) -> None:
        violations = self.report.invariant_violations
        violations["memory_overcommitted"] += len(self.sim.overcommitted_nodes(self.catalog))
        violations["two_primaries"] = len(self.sim.election_safety_violations())

    def sample(self, now: float) -> None:
        """The replica count of every model, against what its demand asks for."""
        since = now - self.started
        running = self.sim.running_claims()
        for index, model in enumerate(self.catalog):
            demand = demand_at(index, since)
            serving = len(
                {c.replica for c in running if c.model_id == model.model_id and c.serving}
            )
            self.report.replica_counts.setdefault(model.model_id, []).append(
                [round(since, 1), serving, demand]
            )
            before = self.demand_seen.get(model.model_id, demand)
            self.demand_seen[model.model_id] = demand
            if demand != before:
                self.changed_at[model.model_id] = (since, demand > before)
            changed, rose = self.changed_at.get(model.model_id, (0.0, True))
            bound = GROW_BOUND_S if rose else SHRINK_BOUND_S
            expected = min(expected_replicas(demand), self.holders.get(model.model_id, 0))
            if since - changed >= bound and serving != expected:
                self.report.replica_tracking_misses += 1


def start_demand_mesh(sim: Simulation, count: int, report: Report) -> DemandRun:
    """Starts `count` nodes (each joining through a random earlier one) holding the catalog,
    the last twentieth of the nodes holding nothing being the clients' entry nodes."""
    rng = random.Random(sim.seed)
    catalog = models(model_count(count))
    offers = holders_of(catalog, count)
    for index in range(count):
        node = sim.add_node(ram_bytes=ram_of(index), offers=offers[index])
        sim.start(node, [rng.choice(sim.nodes[:-1])] if index else [])
    entry_nodes = [n for n in sim.nodes if not n.offers][-max(2, count // 20) :]
    clients = [_Client(n, head_start=i / len(entry_nodes)) for i, n in enumerate(entry_nodes)]
    run = DemandRun(sim, catalog, clients, report)
    run.holders = {m.model_id: sum(m in o for o in offers) for m in catalog}
    run.by_id = {n.peer_id: n for n in sim.nodes}
    return run


def holders_of(catalog: list[SimModel], nodes: int) -> list[tuple[SimModel, ...]]:
    """What each node offers: `HOLDERS_PER_MODEL` holders per model, each holder holding two
    models (node 0, the first, and the entry nodes hold nothing)."""
    offers: list[tuple[SimModel, ...]] = [() for _ in range(nodes)]
    count = len(catalog)
    for index, model in enumerate(catalog):
        for copy in range(HOLDERS_PER_MODEL):
            holder = (index + copy * count // 2) % (count * HOLDERS_PER_MODEL // 2)
            if 1 + holder < nodes:
                offers[1 + holder] = (*offers[1 + holder], model)
    return offers


def model_count(nodes: int) -> int:
    """20 models in a mesh of 1000 nodes; fewer, down to 4, in smaller ones."""
    return max(4, min(MODELS, nodes // 50))


def ram_of(index: int) -> int:
    return (4, 8, 16)[index % 3] * GIB


async def run_demand(sim: Simulation, run: DemandRun, wait_ready: float) -> None:
    """Drives the clients and checks the invariants until `END_S` after every model is served."""
    began = trio.current_time()
    while trio.current_time() - began < wait_ready:
        served = {c.model_id for c in sim.running_claims() if c.serving and c.replica == 0}
        if len(served) == len(run.catalog):
            break
        run.check()
        await trio.sleep(TICK_S)
    run.report.placements_served_s = trio.current_time() - began
    run.started = trio.current_time()
    next_sample = 0.0
    while (since := trio.current_time() - run.started) < END_S:
        run.send(trio.current_time())
        run.check()
        if since >= next_sample:
            run.sample(trio.current_time())
            next_sample += SAMPLE_S
        await trio.sleep(TICK_S)
    run.report.requests_routed = run.routed
    run.report.requests_unserved = run.unserved


__all__ = ["DemandRun", "models", "run_demand", "start_demand_mesh"]
