"""Memory accounted once per node across every model and replica the mesh serves (pure).

Each replica of each model (a unit) is planned on the view left after the others: units are
taken in priority order (every model's first replica, by model id, then every second one, ...),
and unit k sees every node's memory less (1) what the units before it were given in this step
and (2) the standing claims of the units after it. A standing claim only counts when it fits
beside the higher-priority claims before it: two claims that overlap (a race, or a node that
shrank) leave the higher-priority unit in place and make the other re-plan around it. Every node
runs the same ledger on the same gossip, so every node derives the same split of memory, and the
sum of what it hands out on a node never exceeds that node's usable memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..scheduler.cluster import ClusterView
from ..scheduler.cost_model import CostModel
from ..scheduler.placement import ModelRequest, Placement, claimed_memory, memory_used
from .claims import Claim

Bytes = dict[str, int]


@dataclass
class MemoryLedger:
    """Built once per election step; `taken_before(k)` then `decide(k, ...)` for each replica
    of each model (its `unit`) in priority order."""

    standing: dict[str, Bytes]  # unit -> node -> bytes of its counted standing claim
    _later: Bytes = field(default_factory=dict)  # standing claims of units not yet decided
    _decided: Bytes = field(default_factory=dict)

    @staticmethod
    def of(
        view: ClusterView,
        requests: Sequence[ModelRequest],
        claims: Mapping[str, Claim],
        cost: CostModel,
    ) -> MemoryLedger:
        """`requests` in priority order, one per replica; `claims` the current claim of each
        replica, by unit."""
        usable = {node.peer_id: node.usable_bytes for node in view.nodes}
        standing: dict[str, Bytes] = {}
        counted: Bytes = {}
        for request in requests:
            claim = claims.get(request.unit)
            if claim is None or not all(node in usable for node in claim.nodes):
                continue
            need = claim_memory(request, cost, claim)
            if all(counted.get(node, 0) + amount <= usable[node] for node, amount in need.items()):
                standing[request.unit] = need
                _add(counted, need)
        return MemoryLedger(standing, counted)

    def taken_before(self, unit: str) -> Bytes:
        """Memory already spoken for when `unit` (a replica of a model) is planned, its own
        claim not included; a new dict, the caller's to change."""
        _subtract(self._later, self.standing.get(unit, {}))
        taken = dict(self._decided)
        _add(taken, self._later)
        return taken

    def decide(self, unit: str, planned: Placement | None, still_standing: bool) -> None:
        """Reserves what `unit` holds after this step: its plan, and its standing claim
        while that keeps running (both during a switch, node by node the larger)."""
        held: Bytes = dict(self.standing.get(unit, {})) if still_standing else {}
        for node, amount in (memory_used(planned) if planned is not None else {}).items():
            held[node] = max(held.get(node, 0), amount)
        _add(self._decided, held)


def claim_memory(request: ModelRequest, cost: CostModel, claim: Claim) -> Bytes:
    """Bytes each node of a standing claim holds, with the slots the claim runs."""
    as_claimed = replace(request, slots=claim.slots)
    return claimed_memory(as_claimed, cost, claim.primary, claim.layers, claim.speculation)


def _add(total: Bytes, more: Mapping[str, int]) -> None:
    for node, amount in more.items():
        total[node] = total.get(node, 0) + amount


def _subtract(total: Bytes, less: Mapping[str, int]) -> None:
    for node, amount in less.items():
        left = total.get(node, 0) - amount
        if left:
            total[node] = left
        else:
            total.pop(node, None)
