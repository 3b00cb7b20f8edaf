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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from ..scheduler.cluster import ClusterView, Link, NodeCapacity
from ..scheduler.cost_model import CostModel
from ..scheduler.model_profile import profile_from_dict
from ..scheduler.placement import (
    Assignment,
    ModelRequest,
    Placement,
    PlannerError,
    evaluate,
    fit_together,
    memory_used,
)
from ..scheduler.planner import DEFAULT_COST, plan_model
from .member_states import MemberStates

# Until a bandwidth probe has measured a link, the planner assumes this much.
ASSUMED_BANDWIDTH_MBPS = 100.0
_MAX_MODELS_PER_NODE = 16
_MAX_CLAIMS_PER_NODE = 16


@dataclass(frozen=True)
class Claim:
    """A primary's announcement: it leads `model_id` at `epoch` with these layer ranges."""

    model_id: str
    epoch: int
    primary: str
    layers: tuple[tuple[str, int, int], ...]  # (node, first layer, last layer), in layer order
    serving: bool = False
    # Make-before-break: the placement this claim replaces keeps serving until this one serves
    # (its primary judged that both fit in memory at once on every node they share).
    overlap: bool = False

    @property
    def rank(self) -> tuple[int, str]:
        return (self.epoch, self.primary)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(node for node, _, _ in self.layers)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(node for node in self.nodes if node != self.primary)

    def nodes_in(self, members: Mapping[str, object]) -> bool:
        """Whether the primary and every node holding layers are among `members`."""
        return self.primary in members and all(node in members for node in self.nodes)

    def counts(self) -> list[tuple[str, int]]:
        return [(node, last - first + 1) for node, first, last in self.layers]

    def same_split(self, placement: Placement) -> bool:
        return self.primary == placement.primary and self.counts() == [
            (a.node, a.layer_count) for a in placement.assignments
        ]

    def as_placement(self) -> Placement:
        """The claim's layout, without the predictions only its primary computed."""
        assignments = tuple(Assignment(node, first, last, 0) for node, first, last in self.layers)
        return Placement(self.model_id, self.primary, assignments, 0, 0.0, 0.0)

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "epoch": self.epoch,
            "primary": self.primary,
            "layers": [list(entry) for entry in self.layers],
            "serving": self.serving,
            "overlap": self.overlap,
        }

    @staticmethod
    def from_wire(data: object) -> Claim:
        """Raises ValueError on anything malformed (the data comes from peers)."""
        if not isinstance(data, dict):
            raise ValueError("a claim must be a map")
        model, epoch, primary = data.get("model"), data.get("epoch"), data.get("primary")
        layers, serving = data.get("layers"), data.get("serving", False)
        overlap = data.get("overlap", False)
        if not isinstance(model, str) or not isinstance(primary, str):
            raise ValueError("a claim needs a model and a primary")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError("a claim's epoch must be a non-negative integer")
        if not isinstance(layers, list) or not isinstance(serving, bool):
            raise ValueError("a claim needs a list of layer ranges")
        if not isinstance(overlap, bool):
            raise ValueError("a claim's overlap must be a boolean")
        ranges = []
        for entry in layers:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])
            ):
                raise ValueError("a layer range is [node, first, last]")
            ranges.append((entry[0], entry[1], entry[2]))
        return Claim(model, epoch, primary, tuple(ranges), serving, overlap)


def claim_for(placement: Placement, epoch: int, *, overlap: bool = False) -> Claim:
    layers = tuple((a.node, a.first_layer, a.last_layer) for a in placement.assignments)
    return Claim(placement.model_id, epoch, placement.primary, layers, overlap=overlap)


# -- reading the gossiped states -----------------------------------------------------------


def node_capacity(peer_id: str, content: Mapping[str, Any]) -> NodeCapacity | None:
    """The planner's view of one node, or None when its state lacks what planning needs."""
    ram, vram = content.get("ram_total"), content.get("vram_total", 0)
    gflops, protocol = content.get("gflops"), content.get("rpc_protocol")
    cap = content.get("memory_cap")
    if not (_count(ram) and _count(vram) and isinstance(protocol, str)):
        return None
    if not isinstance(gflops, int | float) or not math.isfinite(gflops) or gflops <= 0:
        return None
    return NodeCapacity(
        peer_id=peer_id,
        ram_bytes=ram,
        vram_bytes=vram,
        gflops=float(gflops),
        rpc_protocol=protocol,
        models=frozenset(model_id for model_id, _ in _model_entries(content)),
        memory_cap_bytes=cap if _count(cap) else None,
    )


def cluster_view(members: Mapping[str, Mapping[str, Any]]) -> ClusterView:
    """Nodes and measured links among `members`; a link needs an RTT measured by its source."""
    nodes = [
        capacity
        for peer_id, content in members.items()
        if (capacity := node_capacity(peer_id, content)) is not None
    ]
    present = {node.peer_id for node in nodes}
    links = []
    for source in sorted(present):
        measured = members[source].get("links")
        if not isinstance(measured, dict):
            continue
        for target, link in measured.items():
            if target in present and target != source and isinstance(link, dict):
                # the data plane's round trip is what tunnels pay; the control plane's until then
                rtt, bandwidth = link.get("data_rtt_ms"), link.get("bandwidth_mbps")
                if not _positive(rtt):
                    rtt = link.get("rtt_ms")
                if not _positive(rtt):
                    continue
                if not _positive(bandwidth):
                    bandwidth = ASSUMED_BANDWIDTH_MBPS
                links.append(Link(source, target, float(rtt), float(bandwidth)))
    return ClusterView.build(nodes, links)


def offered_models(members: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelRequest]:
    """Every model some member holds; its profile and context come from the lowest peer id
    holding it, so every node derives the same request."""
    requests: dict[str, ModelRequest] = {}
    for _, content in MemberStates.of(members).having("models"):
        for model_id, entry in _model_entries(content):
            if model_id not in requests and (request := _request_of(model_id, entry)):
                requests[model_id] = request
    return requests


def _request_of(model_id: str, entry: dict[str, Any]) -> ModelRequest | None:
    """The request a gossiped model entry describes (None if malformed), parsed once per entry:
    gossiped contents never change, and every node reads them twice a second."""
    memo = _requests_memo.get(id(entry))
    if memo is not None and memo[0] is entry:
        return memo[1]
    try:
        profile = profile_from_dict(entry.get("profile"))
    except ValueError:
        request = None
    else:
        context = entry.get("context")
        request = ModelRequest(
            model_id,
            profile,
            context if _count(context) and context > 0 else 4096,
            primary_must_hold=True,
        )
    if len(_requests_memo) >= _CLAIMS_MEMO_SIZE:
        _requests_memo.clear()
    _requests_memo[id(entry)] = (entry, request)
    return request


_requests_memo: dict[int, tuple[object, ModelRequest | None]] = {}


def claims_in(content: Mapping[str, Any], origin: str) -> tuple[Claim, ...]:
    """The claims a node makes for itself (a claim naming another primary is ignored)."""
    raw = content.get("claims")
    memo = _claims_memo.get(id(raw))
    if memo is not None and memo[0] is raw and memo[1] == origin:
        return memo[2]
    found = []
    for item in raw[:_MAX_CLAIMS_PER_NODE] if isinstance(raw, list) else []:
        try:
            claim = Claim.from_wire(item)
        except ValueError:
            continue
        if claim.primary == origin:
            found.append(claim)
    if len(_claims_memo) >= _CLAIMS_MEMO_SIZE:
        _claims_memo.clear()
    _claims_memo[id(raw)] = (raw, origin, tuple(found))
    return tuple(found)


# Every node reads the claims in the same few states several times a second; gossiped contents
# are never modified, so each claims list is parsed once (the memo holds the list, so its id
# stays its own).
_CLAIMS_MEMO_SIZE = 4096
_claims_memo: dict[int, tuple[object, str, tuple[Claim, ...]]] = {}


def current_claims(members: Mapping[str, Mapping[str, Any]]) -> dict[str, Claim]:
    """For each model, the highest-ranked claim among `members`."""
    return {model_id: ranked[0] for model_id, ranked in ranked_claims(members).items()}


def ranked_claims(members: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Claim]]:
    """For each model, the claims among `members`, highest rank first."""
    found: dict[str, list[Claim]] = {}
    for origin, content in MemberStates.of(members).having("claims"):
        for claim in claims_in(content, origin):
            found.setdefault(claim.model_id, []).append(claim)
    for claims in found.values():
        claims.sort(key=lambda claim: claim.rank, reverse=True)
    return found


def serving_predecessor(
    current: Claim | None, candidates: Iterable[Claim], members: Mapping[str, object]
) -> Claim | None:
    """During a make-before-break switch to `current`, the claim that still serves meanwhile:
    the highest-ranked lower claim that serves with all its nodes alive."""
    if current is None or current.serving or not current.overlap:
        return None
    standing = [
        claim
        for claim in candidates
        if claim.model_id == current.model_id
        and claim.rank < current.rank
        and claim.serving
        and claim.nodes_in(members)
    ]
    return max(standing, key=lambda claim: claim.rank, default=None)


def winding_down(
    current: Claim | None,
    previous: Claim | None,
    candidates: Iterable[Claim],
    members: Mapping[str, object],
) -> tuple[Claim, ...]:
    """Claims replaced by a make-before-break switch that their primaries still announce: they
    finish the requests they took, and nobody sends them new ones."""
    if current is None or not current.overlap:
        return ()
    skip = {current.rank} if previous is None else {current.rank, previous.rank}
    found: dict[tuple[int, str], Claim] = {}
    for claim in candidates:
        if (
            claim.model_id == current.model_id
            and claim.rank < current.rank
            and claim.rank not in skip
            and claim.nodes_in(members)
        ):
            found.setdefault(claim.rank, claim)
    return tuple(found[rank] for rank in sorted(found, reverse=True))


def _gossiped_problem(members: Mapping[str, Mapping[str, Any]], model_id: str) -> str:
    """What the holders of a model (the lowest peer id first) say stops it from being served."""
    for _, content in MemberStates.of(members).having("problems"):
        problems = content.get("problems")
        if isinstance(problems, dict) and isinstance(problems.get(model_id), str):
            return str(problems[model_id])[:500]
    return "no primary elected yet"


def _model_entries(content: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    models = content.get("models")
    if not isinstance(models, list):
        return []
    return [
        (entry["id"], entry)
        for entry in models[:_MAX_MODELS_PER_NODE]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


# -- deciding --------------------------------------------------------------------------------


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
    _wanted_since: dict[str, tuple[tuple[str, tuple[tuple[str, int], ...]], float]] = field(
        default_factory=dict
    )
    problems: dict[str, str] = field(default_factory=dict)  # gossiped: why a model waits
    replan_s: float = 5.0
    _planned_at: dict[str, tuple[float, Placement | None]] = field(default_factory=dict)
    # Our own superseded claims that keep serving until their successor serves.
    handing_over: dict[str, Claim] = field(default_factory=dict)

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
            for claim in claims_in(content, origin):
                if claim.epoch > self.highest_epoch.get(claim.model_id, 0):
                    self.highest_epoch[claim.model_id] = claim.epoch

    def step(self, now: float, members: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelState]:
        """`members` are the live members' states, this node's own included."""
        members = MemberStates.of(members)
        self.note_epochs(members.having("claims"))
        ranked = ranked_claims(members)
        current = {model_id: claims[0] for model_id, claims in ranked.items()}
        held = {model_id for model_id, _ in _model_entries(members.get(self.me, {}))}
        for model_id, mine in list(self.claims.items()):
            winner = current.get(model_id)
            if winner is not None and winner.rank > mine.rank:
                del self.claims[model_id]  # fenced: a higher claim exists
                self._hand_over(mine, winner)
        states: dict[str, ModelState] = {}
        used: dict[str, int] = {}
        views: list[ClusterView] = []  # built once, and only if a holder must plan
        for model_id, request in sorted(offered_models(members).items()):
            claim = current.get(model_id)
            if model_id in held:
                state = self._plan_held(now, members, request, claim, views=views, used=used)
            else:
                # Only holders may lead, so only they plan; the others follow the standing
                # claim and repeat what the holders say is missing.
                problem = None if claim is not None else _gossiped_problem(members, model_id)
                state = ModelState(request, claim, None, problem)
            candidates = [*ranked.get(model_id, ()), *self.handing_over.values()]
            previous = serving_predecessor(state.current, candidates, members)
            ending = winding_down(state.current, previous, candidates, members)
            state = replace(state, previous=previous, winding_down=ending)
            states[model_id] = state
            if state.planned is not None:
                for node, amount in memory_used(state.planned).items():
                    used[node] = used.get(node, 0) + amount
        for model_id in list(self.claims):
            if model_id not in states:
                del self.claims[model_id]  # nobody holds the model any more
        self.handing_over = {
            model_id: old
            for model_id, old in self.handing_over.items()
            if model_id in states
            and old.rank in {claim.rank for claim in states[model_id].placements()[1:]}
        }
        self.problems = {
            model_id: state.problem
            for model_id, state in states.items()
            if model_id in held and state.problem is not None
        }
        return states

    def _plan_held(
        self,
        now: float,
        members: Mapping[str, Mapping[str, Any]],
        request: ModelRequest,
        claim: Claim | None,
        *,
        views: list[ClusterView],
        used: Mapping[str, int],
    ) -> ModelState:
        model_id = request.model_id
        previous = self._planned_at.get(model_id)
        if (
            claim is not None
            and claim.nodes_in(members)
            and previous is not None
            and now - previous[0] < self.replan_s
            and model_id not in self._wanted_since
        ):
            # The placement stands and was checked a moment ago: measurements drift every
            # second, but a better plan must win by the stability margin anyway.
            return ModelState(request, claim, previous[1], None)
        if not views:
            views.append(cluster_view(members))
        state = self._decide(now, views[0].with_memory_used(used), request, claim)
        self._planned_at[model_id] = (now, state.planned)
        return state

    def set_serving(self, model_id: str, epoch: int, serving: bool) -> None:
        claim = self.claims.get(model_id)
        if claim is not None and claim.epoch == epoch and claim.serving != serving:
            self.claims[model_id] = replace(claim, serving=serving)
        old = self.handing_over.get(model_id)
        if old is not None and old.epoch == epoch and not serving:
            del self.handing_over[model_id]  # it no longer serves: nothing left to hand over

    def _hand_over(self, mine: Claim, successor: Claim) -> None:
        """Keeps our superseded claim announced while its successor loads and then while our
        engine finishes its requests, if the successor's primary agreed (memory allows)."""
        if mine.serving and successor.overlap:
            self.handing_over[mine.model_id] = mine

    def end_handover(self, model_id: str, epoch: int) -> None:
        """Our replaced engine has finished (or given up on) its requests: withdraw its claim."""
        old = self.handing_over.get(model_id)
        if old is not None and old.epoch == epoch:
            del self.handing_over[model_id]

    def _settle_s(self, view: ClusterView) -> float:
        """How long a plan must hold before we claim it: `settle_s`, and longer in a big mesh,
        where news takes a few gossip hops more to reach every holder (two holders whose views
        still differ could otherwise both claim the same epoch)."""
        return self.settle_s * max(1.0, math.log2(max(len(view.nodes), 2)) / 2)

    def _decide(
        self, now: float, view: ClusterView, request: ModelRequest, current: Claim | None
    ) -> ModelState:
        model_id = request.model_id
        kept = None
        if current is not None and all(node in view for node in current.nodes):
            kept = evaluate(view, request, self.cost, current.primary, current.counts())
        try:
            planned = plan_model(view, request, self.cost, kept)
        except PlannerError as err:
            self._wanted_since.pop(model_id, None)
            if current is not None and current.primary == self.me and kept is None:
                # Our placement lost a node and nothing can replace it: withdraw the claim,
                # so that everyone says why instead of waiting on a dead split.
                self.claims.pop(model_id, None)
                return ModelState(request, None, None, str(err))
            return ModelState(request, current, None, str(err))
        if current is not None and current.same_split(planned):
            self._wanted_since.pop(model_id, None)
            return ModelState(request, current, planned, None)
        key = (planned.primary, tuple((a.node, a.layer_count) for a in planned.assignments))
        since = self._wanted_since.get(model_id)
        if since is None or since[0] != key:
            self._wanted_since[model_id] = (key, now)
        elif planned.primary == self.me and now - since[1] >= self._settle_s(view):
            epoch = max(self.highest_epoch.get(model_id, 0), 0) + 1
            overlap = (
                current is not None
                and current.serving
                and kept is not None
                and fit_together(view, self.cost, kept, planned)
            )
            claim = claim_for(planned, epoch, overlap=overlap)
            old = self.claims.pop(model_id, None)
            if old is not None:
                self._hand_over(old, claim)
            self.claims[model_id] = claim
            self.highest_epoch[model_id] = epoch
            self._wanted_since.pop(model_id, None)
            return ModelState(request, claim, planned, None)
        return ModelState(request, current, planned, None)
