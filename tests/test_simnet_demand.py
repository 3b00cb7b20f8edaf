"""The demand scenario on the simulated mesh: models of mixed sizes, clients whose demand shifts
over virtual time, the real election and routing code; invariants are checked at every step and
the replica counts must follow the demand within the scenario's bounds."""

from __future__ import annotations

import pytest
from sharedllm.simnet.demand import (
    GROW_BOUND_S,
    MAX_REPLICAS,
    PHASE_S,
    demand_at,
    expected_replicas,
)
from sharedllm.simnet.scenarios import simulate


def test_the_demand_schedule_asks_for_growth_shrinking_and_the_maximum() -> None:
    wanted = {expected_replicas(demand_at(m, at)) for m in range(4) for at in PHASE_S}
    assert wanted == {1, 3, MAX_REPLICAS}
    assert [demand_at(0, at) for at in PHASE_S] == [0.5, 8.0, 0.5, 0.5]


@pytest.mark.slow
def test_replicas_follow_demand_and_no_invariant_breaks() -> None:
    report = simulate("demand", 24, seed=1)
    counts = {m: [int(c) for _, c, _ in series] for m, series in report.replica_counts.items()}
    print(report.invariant_violations, report.replica_tracking_misses, counts)
    assert report.converged
    assert report.invariant_violations == {
        "memory_overcommitted": 0,
        "two_primaries": 0,
        "routed_to_non_serving": 0,
    }
    assert report.requests_routed > 1000 and report.requests_unserved == 0
    assert report.replica_tracking_misses == 0
    # model 1 is flooded in phases 1 and 2: it reaches its maximum within the bound, then
    # gives all extra replicas back once idle
    flooded = report.replica_counts["sim-model-01"]
    at_max = [t for t, count, _ in flooded if count == MAX_REPLICAS]
    assert at_max and at_max[0] <= PHASE_S[1] + GROW_BOUND_S
    assert flooded[-1][1] == 1
