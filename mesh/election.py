"""Electing each model's primary and split from gossip, with no vote (sans-I/O).

Every node turns the gossiped states of the live members into the planner's view and runs the
same deterministic planner. The node the plan names as primary *claims* the model: it gossips an
announcement (epoch, primary, layer ranges). The claim with the highest (epoch, primary) among
live members is the current placement for everyone; a primary that sees a higher claim for its
model steps down, and workers serve tunnels only to the current claim's primary (fencing).

A plan replaces the current placement only when the planner says so (it keeps the current one
unless another is faster by the stability margin), and only after the planner's answer has
stayed the same for `settle_s`, so the start-up rush and flickering measurements do not cause
a storm of re-plans.

Every node plans every offered model, in one priority order, through one `MemoryLedger`: each
model sees the nodes' memory less what the others hold or were just given, so two primaries
never count on the same worker's memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..scheduler.cluster import ClusterView
from ..scheduler.cost_model import CostModel
from ..scheduler.placement import (
    ModelRequest,
    Placement,
    PlannerError,
    evaluate,
    fit_together,
    unit_key,
)
from ..scheduler.planner import DEFAULT_COST, plan_with_slots
from ..scheduler.replica_demand import Demand, rank_units, wanted_replicas
from ..scheduler.speculation import DraftRate
from .claims import Claim, claim_for, serving_predecessor, winding_down
from .gossip_reader import GossipReader, gossiped_problem, model_entries
from .member_states import MemberStates
from .memory_ledger import MemoryLedger
from .timing import MeshTiming

# Meshes this small are fully connected, so a complete view is one every member can reach; a
# model nothing serves is claimed there after a short settle.
QUICK_SETTLE_UP_TO = MeshTiming().full_mesh_up_to


@dataclass(frozen=True)
class ModelState:
    """One model as this node sees it after an election step."""

    request: ModelRequest
    current: Claim | None  # the placement everyone follows now
    planned: Placement | None  # what the planner wants on this node's view
    problem: str | None  # why nothing can be planned, in words
    previous: Claim | None = None  # still serving while `current` loads (make-before-break)
    winding_down: tuple[Claim, ...] = ()  # replaced, finishing the requests they took

    @property
    def routed(self) -> Claim | None:
        """The placement requests go to now: the current one, unless it is still loading and
        the one it replaces keeps serving meanwhile."""
        if self.previous is not None and self.current is not None and not self.current.serving:
            return self.previous
        return self.current

    def placements(self) -> tuple[Claim, ...]:
        """The placements whose processes must keep running now: more than one only during a
        make-before-break switch."""
        live = tuple(c for c in (self.current, self.previous) if c is not None)
        return live + self.winding_down


@dataclass
class Elector:
    """Keeps this node's own claims; `step` is called with the live members' states."""

    me: str
    settle_s: float = 2.0
    cost: CostModel = DEFAULT_COST
    claims: dict[str, Claim] = field(default_factory=dict)
    highest_epoch: dict[str, int] = field(default_factory=dict)
    _wanted_since: dict[str, tuple[tuple[str, tuple[tuple[str, int], ...], str], float]] = field(
        default_factory=dict
    )
    problems: dict[str, str] = field(default_factory=dict)  # gossiped: why a model waits
    replan_s: float = 5.0
    _planned_at: dict[str, tuple[float, Placement | None]] = field(default_factory=dict)
    _claim_at: dict[str, float] = field(default_factory=dict)  # when a wanted plan settles
    # Our own superseded claims that keep serving until their successor serves.
    handing_over: dict[str, Claim] = field(default_factory=dict)
    reader: GossipReader = field(default_factory=GossipReader)

    def gossiped_claims(self) -> list[dict[str, Any]]:
        """This node's claims as gossiped: current ones, then those handing over."""
        own = [claim for _, claim in sorted(self.claims.items())]
        own += [claim for _, claim in sorted(self.handing_over.items())]
        return [claim.to_wire() for claim in own]

    def note_epochs(self, states: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Remembers the highest epoch of every claim seen, live or not, so epochs only grow."""
        for origin, content in states:
            if not content.get("claims"):
                continue
            for claim in self.reader.claims_in(content, origin):
                if claim.epoch > self.highest_epoch.get(claim.model_id, 0):
                    self.highest_epoch[claim.model_id] = claim.epoch

    def step(self, now: float, members: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelState]:
        """`members` are the live members' states, this node's own included. The answer has
        one state per replica of each model, by unit (the model id for its first replica)."""
        members = MemberStates.of(members)
        self.note_epochs(members.having("claims"))
        ranked = self.reader.ranked_claims(members)
        current = {unit: claims[0] for unit, claims in ranked.items()}
        held = {model_id for model_id, _ in model_entries(members.get(self.me, {}))}
        for unit, mine in list(self.claims.items()):
            winner = current.get(unit)
            if winner is not None and winner.rank > mine.rank:
                del self.claims[unit]  # fenced: a higher claim exists
                self._hand_over(mine, winner)
        offered = with_draft_rates(
            self.reader.offered_models(members), self.reader.draft_rates(members)
        )
        units = replica_requests(offered, self.reader.mesh_demand(members), current)
        retiring = retiring_replicas(offered, units, current)
        view = self.reader.cluster_view(members, now) if units else ClusterView.build(())
        ledger = MemoryLedger.of(view, [*units, *retiring], current, self.cost)
        states: dict[str, ModelState] = {}
        for request in units:
            # Every node plans every unit on the same view, so that each knows what the others
            # will take; only holders may lead, so only they claim.
            unit, claim = request.unit, current.get(request.unit)
            taken = ledger.taken_before(unit)
            for node in _other_replicas_nodes(request, states, current):
                if node in view:
                    taken[node] = view.node(node).usable_bytes  # replicas share no node
            state = self._plan(now, members, request, claim, (view, taken))
            if request.model_id not in held:
                # The others follow the standing claim and repeat what the holders say is missing.
                problem = None if claim is not None else gossiped_problem(members, request.model_id)
                state = replace(state, current=claim, problem=problem)
            if request.replica and state.problem is not None:
                state = replace(state, problem=f"no nodes free for replica {request.replica + 1}")
            candidates = [*ranked.get(unit, ()), *self.handing_over.values()]
            previous = serving_predecessor(state.current, candidates, members)
            ending = winding_down(state.current, previous, candidates, members)
            state = replace(state, previous=previous, winding_down=ending)
            states[unit] = state
            ledger.decide(unit, state.planned, still_standing=state.current == claim)
        for request in retiring:
            states[request.unit] = self._retire(request, current[request.unit], ledger)
        for unit in list(self.claims):
            if unit not in states:
                del self.claims[unit]  # nobody holds the model, or it has fewer replicas now
        for memo in (self._planned_at, self._wanted_since, self._claim_at):
            for unit in [unit for unit in memo if unit not in states]:
                del memo[unit]
        self.handing_over = {
            unit: old
            for unit, old in self.handing_over.items()
            if unit in states and old.rank in {c.rank for c in _not_current(states[unit])}
        }
        self.problems = {
            state.request.model_id: state.problem
            for state in states.values()
            if state.request.model_id in held
            and state.request.replica == 0
            and state.problem is not None
        }
        return states

    def _plan(
        self,
        now: float,
        members: Mapping[str, Mapping[str, Any]],
        request: ModelRequest,
        claim: Claim | None,
        left: tuple[ClusterView, dict[str, int]],
    ) -> ModelState:
        """`left`: the view and the memory other units take on it (applied only when the unit
        is planned again, as a thousand-node view is costly to copy)."""
        unit = request.unit
        previous = self._planned_at.get(unit)
        if (
            claim is not None
            and claim.nodes_in(members)
            and previous is not None
            and now - previous[0] < self.replan_s
            and unit not in self._wanted_since
        ):
            # The placement stands and was checked a moment ago: measurements drift every
            # second, but a better plan must win by the stability margin anyway.
            return ModelState(request, claim, previous[1], None)
        view, taken = left
        state = self._decide(now, view.with_memory_used(taken), request, claim)
        self._planned_at[unit] = (now, state.planned)
        return state

    def _retire(self, request: ModelRequest, claim: Claim, ledger: MemoryLedger) -> ModelState:
        """A replica demand no longer asks for: nobody routes to it, and it keeps its nodes
        and memory while it finishes the requests it took (as a replaced placement does)."""
        ledger.taken_before(request.unit)
        ledger.decide(request.unit, None, still_standing=True)
        mine = self.claims.pop(request.unit, None)
        if mine is not None and mine.serving:
            self.handing_over[request.unit] = mine
        problem = f"replica {request.replica + 1} retiring: demand fell, its requests finish"
        return ModelState(request, None, None, problem, winding_down=(claim,))

    def next_claim_at(self) -> float:
        """When a plan this node waits to claim will have settled (inf: none waits), so that
        its node steps then rather than at its next tick."""
        waiting = (at for unit, at in self._claim_at.items() if unit in self._wanted_since)
        return min(waiting, default=math.inf)

    def set_serving(self, unit: str, epoch: int, serving: bool) -> None:
        claim = self.claims.get(unit)
        if claim is not None and claim.epoch == epoch and claim.serving != serving:
            self.claims[unit] = replace(claim, serving=serving)
        old = self.handing_over.get(unit)
        if old is not None and old.epoch == epoch and not serving:
            del self.handing_over[unit]  # it no longer serves: nothing left to hand over

    def _hand_over(self, mine: Claim, successor: Claim) -> None:
        """Keeps our superseded claim announced while its successor loads and then while our
        engine finishes its requests, if the successor's primary agreed (memory allows)."""
        if mine.serving and successor.overlap:
            self.handing_over[mine.unit] = mine

    def end_handover(self, unit: str, epoch: int) -> None:
        """Our replaced engine has finished (or given up on) its requests: withdraw its claim."""
        old = self.handing_over.get(unit)
        if old is not None and old.epoch == epoch:
            del self.handing_over[unit]

    def _settle_s(self, view: ClusterView, current: Claim | None) -> float:
        """How long a plan must hold before we claim it: `settle_s`, and longer in a big mesh,
        where news takes a few gossip hops more to reach every holder (two holders whose views
        still differ could otherwise both claim the same epoch). A quarter of it for a model
        nothing serves yet in a small mesh whose every link is measured: the plan waits on no
        more news there, and each second of waiting delays the first answer (a mesh starting
        again). Should news still change the plan, the claim is replaced as any other is."""
        if current is None and len(view.nodes) <= QUICK_SETTLE_UP_TO and view.fully_linked():
            return self.settle_s / 4
        return self.settle_s * max(1.0, math.log2(max(len(view.nodes), 2)) / 2)

    def _decide(
        self, now: float, view: ClusterView, request: ModelRequest, current: Claim | None
    ) -> ModelState:
        model_id, unit = request.model_id, request.unit
        kept = None
        held_to = None if current is None else request.speculation.only(current.speculation)
        if current is not None and held_to and all(node in view for node in current.nodes):
            as_claimed = replace(request, slots=current.slots, speculation=held_to)
            kept = evaluate(view, as_claimed, self.cost, current.primary, current.counts())
        try:
            planned = plan_with_slots(view, request, self.cost, kept)
        except PlannerError as err:
            self._wanted_since.pop(unit, None)
            if current is not None and current.primary == self.me and kept is None:
                # Our placement lost a node and nothing can replace it: withdraw the claim,
                # so that everyone says why instead of waiting on a dead split.
                self.claims.pop(unit, None)
                return ModelState(request, None, None, str(err))
            return ModelState(request, current, None, str(err))
        if current is not None and current.same_split(planned):
            self._wanted_since.pop(unit, None)
            return ModelState(request, current, planned, None)
        layout = tuple((a.node, a.layer_count) for a in planned.assignments)
        key = (planned.primary, layout, planned.speculation)
        since = self._wanted_since.get(unit)
        if since is None or since[0] != key:
            since = self._wanted_since[unit] = (key, now)
        if planned.primary != self.me:
            self._claim_at.pop(unit, None)
        elif now - since[1] < (settle_s := self._settle_s(view, current)):
            self._claim_at[unit] = since[1] + settle_s
        else:
            holders = [node.peer_id for node in view.nodes if model_id in node.models]
            epoch = next_epoch(self.highest_epoch.get(model_id, 0), self.me, holders)
            overlap = (
                current is not None
                and current.serving
                and kept is not None
                and fit_together(view, self.cost, kept, planned)
            )
            claim = claim_for(planned, epoch, overlap=overlap, replica=request.replica)
            old = self.claims.pop(unit, None)
            if old is not None:
                self._hand_over(old, claim)
            self.claims[unit] = claim
            self.highest_epoch[model_id] = epoch
            self._wanted_since.pop(unit, None)
            return ModelState(request, claim, planned, None)
        return ModelState(request, current, planned, None)


def next_epoch(highest: int, me: str, holders: Iterable[str]) -> int:
    """The epoch a holder claims next: above `highest`, in its own residue class modulo the
    number of holders (by peer id). Two holders whose views differ for a moment can both plan
    themselves primary; this way they still never claim the same epoch (while they agree on
    who holds the model), and the higher one fences the other as before. With one holder,
    epochs count 1, 2, 3..."""
    ordered = sorted(set(holders) | {me})
    index, count = ordered.index(me), len(ordered)
    first = max(highest, 0) + 1
    return first + (index - first) % count


def with_draft_rates(
    offered: Mapping[str, ModelRequest], rates: Mapping[str, Mapping[str, DraftRate]]
) -> dict[str, ModelRequest]:
    """The offered models, each with the draft rates (by mode) the mesh learned for it."""
    return {
        model_id: request
        if not (learned := rates.get(model_id))
        else replace(request, speculation=request.speculation.with_rates(learned))
        for model_id, request in offered.items()
    }


def replica_requests(
    offered: Mapping[str, ModelRequest],
    demand: Mapping[str, Demand],
    current: Mapping[str, Claim],
) -> list[ModelRequest]:
    """One request per replica each model's demand asks for (within its holder's minimum and
    maximum), in the order memory goes to them (`rank_units`)."""
    running: dict[str, int] = {}
    for claim in current.values():
        running[claim.model_id] = max(running.get(claim.model_id, 0), claim.replica + 1)
    counted = {
        model_id: replace(
            request,
            replicas=wanted_replicas(
                demand.get(model_id, Demand()),
                request.slots,
                running.get(model_id, 0),
                request.min_replicas,
                request.max_replicas,
            ),
        )
        for model_id, request in offered.items()
    }
    counts = {m: (r.min_replicas, r.replicas) for m, r in counted.items()}
    return [
        replace(counted[model_id], replica=replica)
        for model_id, replica in rank_units(counts, demand)
    ]


def retiring_replicas(
    offered: Mapping[str, ModelRequest],
    units: Iterable[ModelRequest],
    current: Mapping[str, Claim],
) -> list[ModelRequest]:
    """The replicas with a standing placement that demand no longer asks for (the model is
    still offered), by unit."""
    asked = {request.unit for request in units}
    return [
        replace(offered[claim.model_id], replica=claim.replica)
        for unit, claim in sorted(current.items())
        if unit not in asked and claim.model_id in offered
    ]


def _not_current(state: ModelState) -> tuple[Claim, ...]:
    return tuple(claim for claim in state.placements() if claim != state.current)


def _other_replicas_nodes(
    request: ModelRequest, states: Mapping[str, ModelState], current: Mapping[str, Claim]
) -> set[str]:
    """Nodes a further replica must leave alone: those of the model's other replicas (what
    they hold and what is planned for them). The first replica is planned as if alone."""
    if request.replica == 0:
        return set()
    taken: set[str] = set()
    for replica in range(request.replicas):
        if replica == request.replica:
            continue
        other = unit_key(request.model_id, replica)
        state = states.get(other)
        for claim in (current.get(other), None if state is None else state.current):
            if claim is not None:
                taken.update((claim.primary, *claim.nodes))
        if state is not None and state.planned is not None:
            taken.update((state.planned.primary, *state.planned.nodes))
    return taken
