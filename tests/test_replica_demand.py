"""Replicas by demand: the meter that measures it at each API, the gossip that sums it over the
mesh, the rule that turns it into a replica count and an order for memory, and the election
that follows it (grows under load, shrinks when idle, never past the holder's bounds)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.election import Elector
from sharedllm.mesh.gossip_reader import (
    MAX_DEMAND_ENTRIES,
    GossipReader,
    current_claims,
    demand_entries,
)
from sharedllm.node.serving.demand_meter import (
    BUCKET_S,
    MAX_METERED_MODELS,
    PEAK_BUCKETS,
    DemandMeter,
)
from sharedllm.node.serving.reconciler import Running, reconcile
from sharedllm.scheduler.placement import MAX_REPLICAS, unit_key
from sharedllm.scheduler.replica_demand import (
    DEMAND_FIGURES,
    GROW_AT,
    MAX_DEMAND,
    SHRINK_AT,
    Demand,
    rank_units,
    wanted_replicas,
)

from .test_election import _mesh

counts = st.integers(min_value=0, max_value=MAX_REPLICAS)
demands = st.floats(min_value=0, max_value=500, allow_nan=False)


@given(demands, st.integers(1, 16), counts, st.integers(1, MAX_REPLICAS), counts)
def test_the_count_stays_in_bounds_and_a_steady_demand_keeps_it(
    demand: float, slots: int, running: int, least: int, extra: int
) -> None:
    most = min(MAX_REPLICAS, least + extra)
    steady = Demand(demand, demand)
    wanted = wanted_replicas(steady, slots, running, least, most)
    assert least <= wanted <= most
    # once the replicas run, the same demand asks for the same count: no flapping
    assert wanted_replicas(steady, slots, wanted, least, most) == wanted
    if least < wanted < most:  # unbounded: under the grow threshold, over the shrink one
        assert demand <= wanted * slots * GROW_AT + 1e-9
        assert demand > (wanted - 1) * slots * SHRINK_AT - 1e-9


@given(demands, demands, st.integers(1, 16), counts)
def test_more_demand_never_asks_for_fewer_replicas(
    low: float, high: float, slots: int, running: int
) -> None:
    low, high = sorted((low, high))
    fewer = wanted_replicas(Demand(low, low), slots, running, 1, MAX_REPLICAS)
    assert wanted_replicas(Demand(high, high), slots, running, 1, MAX_REPLICAS) >= fewer


def test_growing_needs_demand_past_the_slots_and_shrinking_needs_a_quiet_peak() -> None:
    assert wanted_replicas(Demand(3.0, 3.0), 4, 1, 1, 4) == 1  # 3 of 4 slots busy: enough
    assert wanted_replicas(Demand(3.1, 3.1), 4, 1, 1, 4) == 2
    assert wanted_replicas(Demand(10.0, 10.0), 4, 1, 1, 4) == 4  # straight to what it needs
    assert wanted_replicas(Demand(50.0, 50.0), 4, 1, 1, 4) == 4  # the holder's maximum
    assert wanted_replicas(Demand(2.0, 2.0), 4, 2, 1, 4) == 2  # half busy: keeps both
    assert wanted_replicas(Demand(0.5, 3.0), 4, 2, 1, 4) == 2  # quiet now, busy a minute ago
    assert wanted_replicas(Demand(0.5, 1.5), 4, 2, 1, 4) == 1
    assert wanted_replicas(Demand(0.0, 0.0), 4, 3, 2, 4) == 2  # never below the minimum


def test_minimum_replicas_come_first_then_extra_ones_by_demand_per_replica() -> None:
    order = rank_units(
        {"a": (1, 3), "b": (2, 2), "c": (1, 2)},
        {"a": Demand(9.0, 9.0), "c": Demand(6.0, 6.0)},
    )
    # minimums by replica then id; then a's 2nd (9/1), c's 2nd (6/1), a's 3rd (9/2)
    assert order == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("a", 1), ("c", 1), ("a", 2)]


def test_the_meter_averages_requests_in_flight_over_time() -> None:
    meter = DemandMeter()
    for _ in range(3):
        meter.change("m", 0.0, +1)
    meter.change("m", 15.0, -1)  # 3 in flight for 15 s, then 2
    recent, *buckets = meter.report(60.0)["m"]  # buckets newest first: 50-60 s, ... 0-10 s
    assert recent == 2.0 and buckets == [2.0, 2.0, 2.0, 2.0, 2.5, 3.0]
    for _ in range(2):
        meter.change("m", 60.0, -1)
    recent, *buckets = meter.report(70.0)["m"]  # the last 20 s: 2 in flight for the first 10
    assert recent == 1.0 and buckets == [0.0, 2.0, 2.0, 2.0, 2.0, 2.5, 3.0]
    assert meter.report(60.0 + BUCKET_S * (PEAK_BUCKETS + 1)) == {}  # idle two minutes: gone


def test_the_meter_is_bounded_and_ignores_unmatched_ends() -> None:
    meter = DemandMeter()
    meter.change("never-started", 0.0, -1)
    for index in range(MAX_METERED_MODELS + 10):
        meter.change(f"m{index}", 0.0, +1)
    report = meter.report(5.0)
    assert len(report) == MAX_METERED_MODELS and "never-started" not in report
    meter.change("m0", 5.0, -1)
    meter.change("m0", 5.0, -1)  # one end too many: not below zero
    assert meter.report(6.0)["m0"][0] >= 0


@given(st.lists(st.tuples(st.floats(0, 1e6, allow_nan=False), st.sampled_from([1, -1]))))
def test_the_meter_never_reports_more_than_was_in_flight(events: list[tuple[float, int]]) -> None:
    meter, in_flight, most = DemandMeter(), 0, 0
    for at, delta in sorted(events):
        meter.change("m", at, delta)
        in_flight = max(0, in_flight + delta)
        most = max(most, in_flight)
    end = max((at for at, _ in events), default=0.0) + 1.0
    for figures in meter.report(end).values():
        assert 1 <= len(figures) <= DEMAND_FIGURES
        assert all(0 <= value <= most + 0.01 for value in figures)


def test_hostile_demand_gossip_is_dropped_or_capped() -> None:
    raw: dict[object, object] = {
        "ok": [1.5, 2.0, 0.5],
        "recent-only": [1.0],
        "nan": [math.nan, 1.0],
        "negative": [1, -2],
        "huge": [1e300, 1e300],
        "empty": [],
        "too-long": [1.0] * (DEMAND_FIGURES + 1),
        "text": ["1", "2"],
        "flag": [True, True],
        "nested": [1.0, [2.0]],
        "m\x1f1": [5.0, 5.0],  # a replica's key, not a model id
        7: [1.0, 1.0],
    }
    found = {model: (recent, buckets) for model, recent, buckets in demand_entries(raw)}
    assert found == {
        "ok": (1.5, (2.0, 0.5)),
        "recent-only": (1.0, ()),
        "huge": (MAX_DEMAND, (MAX_DEMAND,)),
    }
    assert demand_entries([1, 2]) == () and demand_entries(None) == ()
    many = {f"m{i}": [1.0, 1.0] for i in range(MAX_DEMAND_ENTRIES * 4)}
    assert len(demand_entries(many)) == MAX_DEMAND_ENTRIES


def test_demand_is_summed_over_the_members_bucket_by_bucket() -> None:
    members: dict[str, dict[str, Any]] = {
        "a": {"demand": {"m": [1.0, 2.0]}},
        "b": {"demand": {"m": [0.5, 0.5], "n": [4.0, 4.0]}},
        "c": {"demand": "nonsense"},
    }
    assert GossipReader().mesh_demand(members) == {"m": Demand(1.5, 2.5), "n": Demand(4.0, 4.0)}
    # ten nodes each busy in a different ten seconds: the mesh's peak is one node's, not ten
    scattered = {
        f"p{i}": {"demand": {"m": [0.0] + [1.0 if age == i else 0.0 for age in range(10)]}}
        for i in range(10)
    }
    assert GossipReader().mesh_demand(scattered) == {"m": Demand(0.0, 1.0)}


def _replicas_claimed(members: dict[str, dict[str, Any]]) -> int:
    return sum(len(content.get("claims") or []) for content in members.values())


def _run(
    electors: list[Elector], members: dict[str, dict[str, Any]], start: float, end: float
) -> None:
    now = start
    while now < end:
        for elector in electors:
            elector.step(now, members)
            members[elector.me]["claims"] = elector.gossiped_claims()
        now += 0.5


def test_the_mesh_adds_replicas_under_load_and_gives_them_up_when_idle() -> None:
    members = _mesh({p: 2048 for p in "abcd"}, holders=set("abcd"))
    for content in members.values():
        content["models"] = [{**e, "max_replicas": 3} for e in content["models"]]
    electors = [Elector(peer) for peer in sorted(members)]
    _run(electors, members, 0.0, 10.0)
    assert _replicas_claimed(members) == 1
    members["a"]["demand"] = {"m": [1.2, 1.2]}  # one slot each: 1.2 busy asks for two
    members["b"]["demand"] = {"m": [0.8, 0.8]}  # 2.0 in all: three
    _run(electors, members, 10.0, 30.0)
    assert _replicas_claimed(members) == 3
    members["a"]["demand"] = {"m": [0.0, 0.6]}  # quiet now, a little in the last minutes
    members["b"]["demand"] = {"m": [0.0, 0.0]}
    _run(electors, members, 30.0, 40.0)
    assert _replicas_claimed(members) == 2  # 0.6 busy still needs two at 40% each
    members["a"]["demand"] = {"m": [0.0, 0.0]}
    _run(electors, members, 40.0, 50.0)
    assert _replicas_claimed(members) == 1
    members["a"]["demand"] = {"m": [MAX_DEMAND, MAX_DEMAND]}  # a flood: the holder's maximum
    _run(electors, members, 50.0, 70.0)
    assert _replicas_claimed(members) == 3


def test_a_replica_demand_gives_up_finishes_its_requests_before_it_goes() -> None:
    members = _mesh({p: 2048 for p in "abcd"}, holders=set("abcd"))
    for content in members.values():
        content["models"] = [{**e, "max_replicas": 2} for e in content["models"]]
    electors = {peer: Elector(peer) for peer in sorted(members)}
    members["a"]["demand"] = {"m": [1.0, 1.0]}  # one slot: asks for two replicas
    now = 0.0
    while now < 30.0:
        for elector in electors.values():
            elector.step(now, members)
            for unit, claim in list(elector.claims.items()):
                elector.set_serving(unit, claim.epoch, True)  # as its engine would say
            members[elector.me]["claims"] = elector.gossiped_claims()
        now += 0.5
    second = current_claims(members)[unit_key("m", 1)]
    members["a"]["demand"] = {"m": [0.0, 0.0]}
    leader = electors[second.primary]
    states = leader.step(now, members)
    retiring = states[unit_key("m", 1)]
    assert retiring.current is None and retiring.winding_down == (second,)
    assert "retiring" in (retiring.problem or "")
    assert leader.handing_over[second.unit] == second and second.unit not in leader.claims
    members[second.primary]["claims"] = leader.gossiped_claims()
    # every node keeps it among the placements to run (its workers keep their rpc-servers) ...
    for elector in electors.values():
        assert elector.step(now, members)[second.unit].winding_down == (second,)
    # ... and its primary's reconciler winds it down, then withdraws it
    changes = reconcile(
        leader.me,
        {"m"},
        states,
        claims=leader.claims,
        handing_over=leader.handing_over,
        running=Running(primaries={(second.model_id, second.rank): True}),
    )
    assert changes.wind_down == (second,) and not changes.stop_primaries
    leader.end_handover(second.unit, second.epoch)
    members[second.primary]["claims"] = leader.gossiped_claims()
    assert unit_key("m", 1) not in leader.step(now + 0.5, members)
