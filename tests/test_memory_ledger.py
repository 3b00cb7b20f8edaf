"""Memory is accounted once per node across all models and replicas: whatever the mesh, the
models, their replicas and who holds them, the claims standing after any election step never ask
a node for more than it has, a model's replicas share no node, and overlapping claims leave the
higher-priority model in place."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.election import Elector
from sharedllm.mesh.gossip_reader import cluster_view, current_claims, offered_models
from sharedllm.mesh.memory_ledger import MemoryLedger, claim_memory
from sharedllm.scheduler.planner import DEFAULT_COST

from .test_election import MIB, _node

PEERS = ["p1", "p2", "p3", "p4", "p5"]
MODELS = ["m1", "m2", "m3", "m4"]


def _members(
    ram: dict[str, int], holdings: dict[str, str], replicas: int = 1, everywhere: bool = False
) -> dict[str, dict[str, Any]]:
    """`holdings`: model -> the peer holding it (`everywhere`: every peer holds every model);
    each model asks for `replicas`."""
    members = {}
    for peer in sorted(ram):
        members[peer] = _node(peer, ram[peer], links=tuple(p for p in ram if p != peer))
        models = [m for m, holder in sorted(holdings.items()) if holder == peer or everywhere]
        template = _node(peer, 1, holds=True)["models"][0]
        members[peer]["models"] = [
            dict(template, id=model, min_replicas=replicas, max_replicas=replicas)
            for model in models
        ]
    return members


def _booked(members: dict[str, dict[str, Any]]) -> dict[str, int]:
    requests = offered_models(members)
    booked: dict[str, int] = {}
    for claim in current_claims(members).values():
        need = claim_memory(requests[claim.model_id], DEFAULT_COST, claim)
        for node, amount in need.items():
            booked[node] = booked.get(node, 0) + amount
    return booked


@settings(max_examples=60, deadline=None)
@example({"p1": 600, "p2": 600}, {"m1": 0, "m2": 1}, 1, False).via("two holders needing each other")
@given(
    st.dictionaries(st.sampled_from(PEERS), st.integers(400, 1000), min_size=2),
    st.dictionaries(st.sampled_from(MODELS), st.integers(0, len(PEERS) - 1), min_size=1),
    st.integers(1, 3),
    st.booleans(),
)
def test_claims_never_ask_a_node_for_more_than_it_has(
    ram: dict[str, int], holder_index: dict[str, int], replicas: int, everywhere: bool
) -> None:
    peers = sorted(ram)
    holdings = {model: peers[index % len(peers)] for model, index in holder_index.items()}
    members = _members(ram, holdings, replicas, everywhere)
    electors = [Elector(peer) for peer in sorted(members)]
    usable = {node.peer_id: node.usable_bytes for node in cluster_view(members).nodes}
    now = 0.0
    while now < 15.0:
        for elector in electors:
            elector.step(now, members)
            members[elector.me]["claims"] = elector.gossiped_claims()
            booked = _booked(members)
            assert all(booked[node] <= usable[node] for node in booked), (now, booked)
        now += 0.5
    # memory is never left idle by a deadlock: when some model fits alone on its holder, the
    # mesh serves at least one model (which one is the priority order's choice)
    if any(ram[holder] >= 1000 for holder in holdings.values()):
        assert current_claims(members)
    # and a model's replicas never share a node
    for model in holdings:
        nodes = [
            {claim.primary, *claim.nodes}
            for claim in current_claims(members).values()
            if claim.model_id == model
        ]
        assert all(not a & b for i, a in enumerate(nodes) for b in nodes[i + 1 :])


def test_of_two_overlapping_claims_the_higher_priority_one_counts() -> None:
    members = _members({"a": 600, "b": 600}, {"m1": "a", "m2": "b"})
    view, requests = cluster_view(members), offered_models(members)
    both = {
        "m1": Claim("m1", 1, "a", (("a", 0, 4), ("b", 5, 7))),
        "m2": Claim("m2", 1, "b", (("b", 0, 4), ("a", 5, 7))),
    }
    ledger = MemoryLedger.of(view, [requests["m1"], requests["m2"]], both, DEFAULT_COST)
    assert set(ledger.standing) == {"m1"}
    assert ledger.taken_before("m1") == {}  # m2's claim does not count against m1
    ledger.decide("m1", None, still_standing=True)
    taken = ledger.taken_before("m2")
    assert taken == ledger.standing["m1"] and taken["b"] > 100 * MIB


def test_a_claim_on_a_node_that_left_counts_for_nothing() -> None:
    members = _members({"a": 2000}, {"m1": "a"})
    view, requests = cluster_view(members), offered_models(members)
    gone = {"m1": Claim("m1", 1, "a", (("a", 0, 3), ("z", 4, 7)))}
    ledger = MemoryLedger.of(view, [requests["m1"]], gone, DEFAULT_COST)
    assert ledger.standing == {}
