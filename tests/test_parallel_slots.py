"""Parallel slots: each is a KV cache of the request context, booked on every node of a split;
the planner gives a model as many of its requested slots as memory allows, claims carry the
count, and a peer's hostile count is refused."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim, claim_for
from sharedllm.mesh.gossip_reader import offered_models
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.model_profile import ModelProfile, profile_to_dict
from sharedllm.scheduler.placement import MAX_SLOTS, ModelRequest, PlannerError, evaluate
from sharedllm.scheduler.planner import DEFAULT_COST, plan_with_slots

from .planner_strategies import MIB, profiles, views

# 8 layers of 64 MiB; 1 MiB of KV cache per token and 8 layers: 4 GiB per slot of 512 tokens.
PROFILE = ModelProfile(
    name="m",
    architecture="llama",
    layer_weight_bytes=(64 * MIB,) * 8,
    embedding_bytes=32 * MIB,
    output_bytes=32 * MIB,
    other_bytes=4096,
    kv_bytes_per_token_per_layer=MIB // 8,
    embedding_length=1024,
    vocab_size=32000,
    context_length=4096,
)


def _alone(ram_gib: float) -> ClusterView:
    return ClusterView.build([NodeCapacity("a", int(ram_gib * GIB), models=frozenset({"m"}))], [])


def test_memory_grows_with_each_slot() -> None:
    view = _alone(64)
    one = evaluate(view, ModelRequest("m", PROFILE, 512), DEFAULT_COST, "a", [("a", 8)])
    four = evaluate(view, ModelRequest("m", PROFILE, 512, slots=4), DEFAULT_COST, "a", [("a", 8)])
    assert one is not None and four is not None
    assert four.primary_memory_bytes - one.primary_memory_bytes == 3 * 512 * MIB
    assert (one.slots, four.slots) == (1, 4)


@pytest.mark.parametrize(("ram_gib", "slots"), [(64, 4), (2.2, 2), (1.7, 1)])
def test_a_model_gets_as_many_slots_as_memory_allows(ram_gib: float, slots: int) -> None:
    request = ModelRequest("m", PROFILE, 512, primary_must_hold=True, slots=4)
    assert plan_with_slots(_alone(ram_gib), request).slots == slots


def test_slots_never_pull_in_another_node_for_their_kv_cache() -> None:
    # a alone holds the model with one slot; four slots would need b as a worker (slower)
    nodes = [
        NodeCapacity("a", int(1.7 * GIB), models=frozenset({"m"})),
        NodeCapacity("b", 64 * GIB),
    ]
    view = ClusterView.build(nodes, [Link("a", "b", 1.0, 1000.0)])
    placement = plan_with_slots(view, ModelRequest("m", PROFILE, 512, True, slots=4))
    assert (placement.nodes, placement.slots) == (("a",), 1)


def test_without_memory_for_one_slot_the_error_names_the_need_of_one() -> None:
    request = ModelRequest("m", PROFILE, 512, primary_must_hold=True, slots=4)
    with pytest.raises(PlannerError, match=r"512 tokens,"):
        plan_with_slots(_alone(0.5), request)


@settings(max_examples=80, deadline=None)
@given(views(max_nodes=4), profiles(max_layers=12), st.integers(1, 8))
def test_slots_never_exceed_the_request_nor_any_nodes_memory(
    view: ClusterView, profile: ModelProfile, slots: int
) -> None:
    request = ModelRequest("m", profile, 1024, slots=slots)
    try:
        placement = plan_with_slots(view, request)
    except PlannerError:
        return
    assert 1 <= placement.slots <= slots
    for assignment in placement.assignments:
        assert assignment.memory_bytes <= view.node(assignment.node).usable_bytes


def test_a_claim_carries_its_slots_and_changing_them_is_a_new_split() -> None:
    placement = plan_with_slots(_alone(64), ModelRequest("m", PROFILE, 512, slots=4))
    claim = claim_for(placement, epoch=3)
    assert claim.slots == 4 and Claim.from_wire(claim.to_wire()) == claim
    assert claim.same_split(placement)
    assert not claim.same_split(replace(placement, slots=2))
    assert Claim.from_wire({k: v for k, v in claim.to_wire().items() if k != "slots"}).slots == 1


@pytest.mark.parametrize("slots", [0, -1, MAX_SLOTS + 1, True, "4", 2.0, None, 10**30])
def test_a_hostile_slot_count_in_a_claim_is_refused(slots: object) -> None:
    wire = Claim("m", 1, "a", (("a", 0, 7),)).to_wire()
    with pytest.raises(ValueError, match="slots"):
        Claim.from_wire({**wire, "slots": slots})


def _member(slots: object) -> dict[str, Any]:
    return {
        "ram_total": 4 * GIB,
        "rpc_protocol": "7.0.0",
        "models": [
            {"id": "m", "context": 512, "slots": slots, "profile": profile_to_dict(PROFILE)}
        ],
    }


@pytest.mark.parametrize(
    ("gossiped", "read"), [(4, 4), (MAX_SLOTS, MAX_SLOTS), (0, 1), (10**9, 1), ("8", 1), (True, 1)]
)
def test_a_gossiped_slot_count_is_read_within_bounds(gossiped: object, read: int) -> None:
    assert offered_models({"a": _member(gossiped)})["m"].slots == read
