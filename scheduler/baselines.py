"""How other tools would split the same model, judged by our cost model, for comparison.

- `memory_proportional`: llama.cpp's default — every reachable node, layers in proportion to free
  (usable) memory, by llama.cpp's own rounding rule.
- `exo`: exo's ring split — every node, layers in proportion to total memory; the senior
  (lowest id) node leads.
- `mesh_llm`: Mesh-LLM — the host with the most VRAM (then RAM) leads and fills greedily by
  memory, using only nodes under an RTT cap.
- `brute_force`: every primary and every layer count per node; the true optimum of the cost
  model, for small clusters only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from .cluster import ClusterView, NodeCapacity
from .cost_model import CostModel
from .llama_args import llama_layer_devices
from .placement import ModelRequest, Placement, evaluate

MESH_LLM_RTT_CAP_MS = 80.0

Baseline = Callable[[ClusterView, ModelRequest, CostModel], Placement | None]


def _default_primary(view: ClusterView, request: ModelRequest) -> NodeCapacity:
    holders = [n for n in view.nodes if request.model_id in n.models]
    return (holders or list(view.nodes))[0]


def _reachable(view: ClusterView, primary: NodeCapacity) -> list[NodeCapacity]:
    return [
        n
        for n in view.nodes
        if n.rpc_protocol == primary.rpc_protocol
        and view.link(primary.peer_id, n.peer_id) is not None
        and view.link(n.peer_id, primary.peer_id) is not None
    ]


def _proportional(
    view: ClusterView,
    request: ModelRequest,
    cost: CostModel,
    primary: NodeCapacity,
    weight: Callable[[NodeCapacity], float],
) -> Placement | None:
    nodes = _reachable(view, primary)
    weights = [max(weight(n), 0.0) for n in nodes]
    if not any(weights):
        return None
    layers = request.profile.layer_count
    devices = llama_layer_devices(layers, layers + 1, weights)
    counts = [(n.peer_id, devices.count(i)) for i, n in enumerate(nodes)]
    return evaluate(view, request, cost, primary.peer_id, counts)


def memory_proportional(
    view: ClusterView, request: ModelRequest, cost: CostModel
) -> Placement | None:
    primary = _default_primary(view, request)
    return _proportional(view, request, cost, primary, lambda n: float(n.usable_bytes))


def exo(view: ClusterView, request: ModelRequest, cost: CostModel) -> Placement | None:
    primary = _default_primary(view, request)
    return _proportional(view, request, cost, primary, lambda n: float(n.total_memory_bytes))


def mesh_llm(view: ClusterView, request: ModelRequest, cost: CostModel) -> Placement | None:
    primary = min(view.nodes, key=lambda n: (-n.vram_bytes, -n.usable_bytes, n.peer_id))
    near = [
        n
        for n in _reachable(view, primary)
        if n.peer_id == primary.peer_id
        or (
            (link := view.link(primary.peer_id, n.peer_id)) is not None
            and link.rtt_ms <= MESH_LLM_RTT_CAP_MS
        )
    ]
    workers = sorted(
        (n for n in near if n.peer_id != primary.peer_id),
        key=lambda n: (-n.vram_bytes, -n.usable_bytes, n.peer_id),
    )
    layer_memory = cost.layer_memory(request.profile, request.kv_tokens)
    remaining = request.profile.layer_count
    counts: list[tuple[str, int]] = []
    for node in [primary, *workers]:
        budget = cost.memory_budget(node)
        if node is primary:
            budget -= cost.primary_extra_memory(request.profile)
        take = min(remaining, max(0, budget // layer_memory))
        counts.append((node.peer_id, take))
        remaining -= take
    if remaining:
        return None
    return evaluate(view, request, cost, primary.peer_id, counts)


def brute_force(view: ClusterView, request: ModelRequest, cost: CostModel) -> Placement | None:
    """The optimum by exhaustive search; exponential, keep it to a handful of nodes."""
    best: Placement | None = None
    ids = [n.peer_id for n in view.nodes]
    for primary in ids:
        for counts in _compositions(request.profile.layer_count, len(ids)):
            placed = evaluate(view, request, cost, primary, list(zip(ids, counts, strict=True)))
            if placed is not None and (
                best is None or placed.ms_per_token < best.ms_per_token - 1e-9
            ):
                best = placed
    return best


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """All ways to write `total` as an ordered sum of `parts` non-negative integers."""
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(parts))


BASELINES: dict[str, Baseline] = {
    "memory_proportional": memory_proportional,
    "exo": exo,
    "mesh_llm": mesh_llm,
}
