"""How many replicas a model's demand asks for, and which model's replica gets memory first (pure).

Demand is the number of the model's requests in flight, averaged over time (by Little's law, the
requests' total time over the window's length) and summed over every node whose API took them;
queued requests count, since a request is in flight from the moment a node takes it until its
answer ends. A replica serves `slots` requests at once, so the replicas a demand needs is demand
over slots, with headroom:

- grow as soon as the recent demand (`Demand.recent`, the last half minute) passes
  `GROW_AT` of the running replicas' slots: to as many replicas as keep it under that;
- shrink only when even the busiest stretch of the last two minutes (`Demand.peak`) would leave
  the remaining replicas under `SHRINK_AT` of their slots.

Between the two thresholds the count stays, so a demand that wavers does not start and stop
replicas (to shrink after growing, demand must fall to about half). The holder's settings bound
the count: at least `min_replicas`, at most `max_replicas`.

Models compete for memory by a fair rule: every model's minimum replicas come first (by model
id), then the extra replicas of all models in order of demand per replica, highest first (the
highest-averages rule: a model's k-th extra replica ranks by its demand over the replicas it
would then share it with). A replica that stands is never evicted for another model's: an idle
model gives its extra replicas up by the shrink rule, and the memory goes to the next in line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GROW_AT = 0.75
DEFAULT_MAX_REPLICAS = 4  # a holder's default ceiling on its model's replicas
SHRINK_AT = 0.4
MAX_DEMAND = 100_000.0  # requests in flight; beyond, a gossiped figure is taken as this
# What a node gossips per model: its recent demand, then each of the last 11 full ten-second
# buckets, newest first. The mesh adds them up bucket by bucket before taking the busiest, so
# that many nodes each busy at a different moment do not add up to a peak nobody saw.
DEMAND_FIGURES = 12


def mesh_demand_of(reports: Iterable[tuple[float, tuple[float, ...]]]) -> Demand:
    """One model's demand over the mesh from each node's (recent, buckets newest first)."""
    recent, by_age = 0.0, [0.0] * (DEMAND_FIGURES - 1)
    for node_recent, buckets in reports:
        recent += node_recent
        for age, value in enumerate(buckets[: len(by_age)]):
            by_age[age] += value
    recent = min(MAX_DEMAND, recent)
    return Demand(recent, min(MAX_DEMAND, max(recent, *by_age)))


@dataclass(frozen=True)
class Demand:
    """One model's requests in flight, averaged: `recent` over the last half minute, `peak` the
    busiest ten seconds of the last two minutes (never below `recent`)."""

    recent: float = 0.0
    peak: float = 0.0


def wanted_replicas(demand: Demand, slots: int, running: int, least: int, most: int) -> int:
    """The replica count for a model whose first `running` replicas have placements now."""
    per_replica = max(1, slots)
    up = math.ceil(demand.recent / (per_replica * GROW_AT))
    down = math.ceil(demand.peak / (per_replica * SHRINK_AT))
    wanted = running
    if up > running:
        wanted = up
    elif down < running:
        wanted = down
    return max(least, min(most, wanted))


@dataclass(frozen=True)
class UnitRank:
    """Where one replica of a model stands in the order memory is handed out."""

    model_id: str
    replica: int
    extra: bool  # beyond the model's minimum
    demand_per_replica: float

    def sort_key(self) -> tuple[bool, float, int, str]:
        if not self.extra:
            return (False, 0.0, self.replica, self.model_id)
        return (True, -self.demand_per_replica, self.replica, self.model_id)


def rank_units(
    counts: Mapping[str, tuple[int, int]], demand: Mapping[str, Demand]
) -> list[tuple[str, int]]:
    """(model, replica) in the order memory goes to them; `counts` gives each model's
    (minimum, wanted) replicas."""
    ranks: Iterable[UnitRank] = (
        UnitRank(
            model_id,
            replica,
            replica >= least,
            _quantized(demand.get(model_id, Demand()).recent) / replica if replica else 0.0,
        )
        for model_id, (least, wanted) in counts.items()
        for replica in range(max(1, wanted))
    )
    return [(r.model_id, r.replica) for r in sorted(ranks, key=UnitRank.sort_key)]


def _quantized(value: float) -> float:
    """Demand to a tenth of a request, so that nodes whose sums differ in the last digits
    still rank alike."""
    return round(value, 1)
