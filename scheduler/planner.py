"""The link-aware planner: choose each model's primary and layer split to minimise time per token.

A node that holds the model file is preferred as primary (its llama-server reads the file); another
node leads only when that is faster by a clear margin, since it must first fetch the file.

For a fixed primary and a fixed set of nodes, time per token is linear in the layers each node
holds plus a fixed network cost per worker, so the best fill of that set is greedy: the fastest
node takes as many layers as fit, then the next. Every optimal plan is thus "some subset, filled
fastest first", which a dynamic programme over nodes in speed order finds exactly in
O(nodes x layers) per primary: each node is skipped, filled to capacity, or finishes the model.

Every node computes this on the same gossiped view and gets the same answer: inputs are sorted
by peer id, ties go to the lower peer id, and nothing here reads a clock or a random source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .baselines import memory_proportional
from .cluster import ClusterView, NodeCapacity
from .cost_model import CostModel
from .placement import ModelRequest, Placement, PlannerError, evaluate

DEFAULT_STABILITY_MARGIN = 0.10
PREFER_HOLDER_MARGIN = 0.25
# A placement changes only its speculation mode when the other mode is faster by this much:
# the engine restarts (a reload from the workers' caches), but no layers move.
SPECULATION_MARGIN = 0.05
DEFAULT_COST = CostModel()
_MAX_PRIMARY_CANDIDATES = 24


@dataclass(frozen=True)
class _Candidate:
    node: NodeCapacity
    capacity_layers: int
    layer_s: float
    fixed_s: float


def plan_model(
    view: ClusterView,
    request: ModelRequest,
    cost: CostModel = DEFAULT_COST,
    current: Placement | None = None,
    stability_margin: float = DEFAULT_STABILITY_MARGIN,
) -> Placement:
    """The fastest feasible placement, or `current` if it is still feasible and not beaten by
    more than `stability_margin` (a fraction of its time per token). The split is chosen for
    time per token without speculation, then the speculation mode for the split; `current`
    keeps its mode (switching restarts the engine), so a mode must win by the margin too."""
    best = _best_placement(view, request, cost) if request.split == "planner" else None
    if best is None:
        best = memory_proportional(view, request, cost)
        if best is None:
            raise PlannerError(
                f"model {request.model_id}: a split in proportion to memory "
                "does not fit the reachable nodes"
            )
    held = None if current is None else request.speculation.only(current.speculation)
    if current is not None and held is not None:
        counts = [(a.node, a.layer_count) for a in current.assignments]
        kept = evaluate(view, replace(request, speculation=held), cost, current.primary, counts)
        if kept is not None:
            same_layout = (best.primary, best.assignments) == (kept.primary, kept.assignments)
            margin = SPECULATION_MARGIN if same_layout else stability_margin
            asked_for = same_layout or request.split == "planner"  # a memory split is exact
            if asked_for and best.ms_per_token >= kept.ms_per_token * (1 - margin):
                return kept
    return best


def plan_with_slots(
    view: ClusterView,
    request: ModelRequest,
    cost: CostModel = DEFAULT_COST,
    current: Placement | None = None,
) -> Placement:
    """`plan_model` with as many of the requested parallel slots as come free: the most of
    requested, half that, ... whose placement is no slower per token (within the stability
    margin) than the fastest one-slot placement. Slots never cost a single request its speed,
    nor pull in another node just for their KV cache; the one-slot shortfall is the error."""
    fastest = plan_model(view, replace(request, slots=1), cost, current)
    slots = request.slots
    while slots > 1:
        try:
            placement = plan_model(view, replace(request, slots=slots), cost, current)
        except PlannerError:
            placement = None
        limit = fastest.ms_per_token * (1 + DEFAULT_STABILITY_MARGIN)
        if placement is not None and placement.ms_per_token <= limit:
            return placement
        slots //= 2
    return fastest


def _best_placement(view: ClusterView, request: ModelRequest, cost: CostModel) -> Placement:
    """The fastest plan led by a node that holds the model file, unless a plan led by another
    node (which must first fetch the file) is faster by more than `PREFER_HOLDER_MARGIN`."""
    if not view.nodes:
        raise PlannerError(f"model {request.model_id}: the mesh has no nodes")
    holders, others = _primary_candidates(view, request, cost)
    best_holder = _best_led_by(view, request, cost, holders)
    best_other = None if request.primary_must_hold else _best_led_by(view, request, cost, others)
    if best_holder is None or (
        best_other is not None and best_other[0] < best_holder[0] * (1 - PREFER_HOLDER_MARGIN)
    ):
        best_holder = best_other
    if best_holder is None:
        raise PlannerError(_shortfall_message(view, request, cost))
    _, primary_id, counts = best_holder
    placement = evaluate(view, request, cost, primary_id, counts)
    assert placement is not None, "the planner produced a placement that breaks a limit"
    return placement


def _best_led_by(
    view: ClusterView, request: ModelRequest, cost: CostModel, primaries: list[NodeCapacity]
) -> tuple[float, str, list[tuple[str, int]]] | None:
    best: tuple[float, str, list[tuple[str, int]]] | None = None
    for primary in primaries:
        found = _best_for_primary(view, request, cost, primary)
        if found is not None and (best is None or found[0] < best[0] - 1e-12):
            best = (found[0], primary.peer_id, found[1])
    return best


def _primary_candidates(
    view: ClusterView, request: ModelRequest, cost: CostModel
) -> tuple[list[NodeCapacity], list[NodeCapacity]]:
    """Nodes able to hold the embeddings, split into those holding the model file and the rest.

    With many candidates, the fastest and best-connected are tried and the rest skipped.
    """
    extra = cost.primary_extra_memory(request.profile)
    able = [n for n in view.nodes if cost.memory_budget(n) >= extra]

    def promise(node: NodeCapacity) -> tuple[float, str]:
        reachable = view.reachable_count(node.peer_id) + 1  # it reaches itself too
        return (-node.gflops * math.log2(1 + reachable), node.peer_id)

    holders = sorted((n for n in able if request.model_id in n.models), key=promise)
    if request.primary_must_hold:
        return holders[:_MAX_PRIMARY_CANDIDATES], []
    others = sorted((n for n in able if request.model_id not in n.models), key=promise)
    return holders[:_MAX_PRIMARY_CANDIDATES], others[:_MAX_PRIMARY_CANDIDATES]


def _best_for_primary(
    view: ClusterView, request: ModelRequest, cost: CostModel, primary: NodeCapacity
) -> tuple[float, list[tuple[str, int]]] | None:
    candidates = _candidates(view, request, cost, primary)
    layers = request.profile.layer_count
    infinity = math.inf
    best = [infinity] * (layers + 1)
    best[0] = 0.0
    # choices[j][k] = (layers before node j, layers node j takes) on the best path to k.
    choices: list[list[tuple[int, int]]] = []
    for candidate in candidates:
        after = list(best)
        step = [(k, 0) for k in range(layers + 1)]
        for covered in range(layers):
            if best[covered] == infinity:
                continue
            take = min(candidate.capacity_layers, layers - covered)
            if take <= 0:
                continue
            total = best[covered] + candidate.fixed_s + take * candidate.layer_s
            if total < after[covered + take] - 1e-15:
                after[covered + take] = total
                step[covered + take] = (covered, take)
        choices.append(step)
        best = after
    if best[layers] == infinity:
        return None
    counts: dict[str, int] = {}
    covered = layers
    for candidate, step in zip(reversed(candidates), reversed(choices), strict=True):
        before, take = step[covered]
        if take:
            counts[candidate.node.peer_id] = take
            covered = before
    assert covered == 0
    total_s = best[layers] + cost.head_seconds(request.profile, primary)
    order = [c.node.peer_id for c in candidates if c.node.peer_id in counts]
    return total_s, [(peer_id, counts[peer_id]) for peer_id in order]


def _candidates(
    view: ClusterView, request: ModelRequest, cost: CostModel, primary: NodeCapacity
) -> list[_Candidate]:
    """Nodes that can hold layers for this primary, fastest per layer first."""
    layer_memory = cost.layer_memory(request.profile, request.kv_tokens)
    found: list[_Candidate] = []
    for node in view.reachable_from(primary.peer_id):
        if node.rpc_protocol != primary.rpc_protocol:
            continue
        link_s = cost.worker_link_seconds(view, request.profile, primary.peer_id, node.peer_id)
        if link_s is None:
            continue
        budget = cost.memory_budget(node)
        if node.peer_id == primary.peer_id:
            budget -= cost.primary_extra_memory(request.profile)
        capacity = (
            max(0, budget // layer_memory) if layer_memory > 0 else request.profile.layer_count
        )
        if capacity == 0:
            continue
        found.append(_Candidate(node, capacity, cost.layer_seconds(request.profile, node), link_s))
    found.sort(key=lambda c: (c.layer_s, c.fixed_s, c.node.peer_id))
    return found


def _shortfall_message(view: ClusterView, request: ModelRequest, cost: CostModel) -> str:
    profile = request.profile
    needed = (
        cost.primary_extra_memory(profile)
        + profile.layer_count * cost.layer_memory(profile, request.kv_tokens)
        + cost.compute_buffer_bytes
    )
    offered = sum(max(0, cost.memory_budget(n)) for n in view.nodes)
    gib = 1024**3
    if needed > offered:
        return (
            f"model {request.model_id} needs {needed / gib:.2f} GiB (weights, KV cache for "
            f"{_tokens_in_words(request)}, buffers) but the nodes offer {offered / gib:.2f} GiB: "
            f"{(needed - offered) / gib:.2f} GiB missing{_versions_in_words(view)}"
        )
    return (
        f"model {request.model_id} fits the total memory ({offered / gib:.2f} GiB offered, "
        f"{needed / gib:.2f} GiB needed) but no primary can reach enough nodes with the same "
        f"engine RPC version to hold it{_versions_in_words(view)}"
    )


def _tokens_in_words(request: ModelRequest) -> str:
    if request.slots == 1:
        return f"{request.context} tokens"
    return f"{request.slots} slots of {request.context} tokens"


def _versions_in_words(view: ClusterView) -> str:
    counts: dict[str, int] = {}
    for node in view.nodes:
        counts[node.rpc_protocol] = counts.get(node.rpc_protocol, 0) + 1
    if len(counts) < 2:
        return ""
    listed = ", ".join(f"{version} on {n}" for version, n in sorted(counts.items()))
    return f" (RPC versions: {listed}; nodes of different versions never work together)"
