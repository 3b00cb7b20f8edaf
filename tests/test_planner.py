"""Planner properties: complete and contiguous, memory-safe, order-independent, optimal under its
cost model (checked against brute force), never worse than the baselines, and stable."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sharedllm.scheduler.baselines import BASELINES, brute_force
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.cost_model import CostModel
from sharedllm.scheduler.model_profile import ModelProfile
from sharedllm.scheduler.placement import ModelRequest, Placement, PlannerError
from sharedllm.scheduler.planner import plan_model

from .planner_strategies import MIB, profiles, views

COST = CostModel()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _try_plan(view: ClusterView, request: ModelRequest) -> Placement | None:
    try:
        return plan_model(view, request, COST)
    except PlannerError:
        return None


def _check_layers_and_memory(
    view: ClusterView, request: ModelRequest, placement: Placement
) -> None:
    expected_first = 0
    for assignment in placement.assignments:
        assert assignment.first_layer == expected_first
        assert assignment.last_layer >= assignment.first_layer
        expected_first = assignment.last_layer + 1
    assert expected_first == request.profile.layer_count
    assert len(set(placement.nodes)) == len(placement.nodes)
    if placement.primary in placement.nodes:
        # as llama.cpp lays out devices: the primary's layers first on its CPU, last on its GPUs
        own = -1 if view.node(placement.primary).vram_bytes > 0 else 0
        assert placement.assignments[own].node == placement.primary
    for assignment in placement.assignments:
        node = view.node(assignment.node)
        assert assignment.memory_bytes <= node.usable_bytes
        assert node.rpc_protocol == view.node(placement.primary).rpc_protocol
    assert placement.primary_memory_bytes <= view.node(placement.primary).usable_bytes


@FAST
@given(views(max_nodes=6, protocols=2), profiles(), st.sampled_from([512, 4096, 32768]))
def test_every_layer_once_contiguous_and_within_memory(
    view: ClusterView, profile: ModelProfile, context: int
) -> None:
    request = ModelRequest("m", profile, context)
    placement = _try_plan(view, request)
    assume(placement is not None)
    assert placement is not None
    _check_layers_and_memory(view, request, placement)


@FAST
@given(views(max_nodes=6), profiles(), st.randoms(use_true_random=False))
def test_input_order_does_not_matter(view: ClusterView, profile: ModelProfile, rng: object) -> None:
    import random

    assert isinstance(rng, random.Random)
    request = ModelRequest("m", profile)
    nodes, links = list(view.nodes), list(view.links)
    rng.shuffle(nodes)
    rng.shuffle(links)
    shuffled = ClusterView.build(nodes, links)
    assert shuffled == view
    assert _try_plan(shuffled, request) == _try_plan(view, request)


@FAST
@given(views(max_nodes=6), profiles())
def test_never_worse_than_a_baseline(view: ClusterView, profile: ModelProfile) -> None:
    request = ModelRequest("m", profile)
    ours = _try_plan(view, request)
    for name, baseline in BASELINES.items():
        theirs = baseline(view, request, COST)
        if theirs is not None:
            assert ours is not None, f"{name} found a placement where we found none"
            assert ours.ms_per_token <= theirs.ms_per_token * (1 + 1e-9), name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(views(max_nodes=4), profiles(max_layers=9))
def test_matches_brute_force_on_small_clusters(view: ClusterView, profile: ModelProfile) -> None:
    request = ModelRequest("m", profile)
    ours = _try_plan(view, request)
    best = brute_force(view, request, COST)
    assert (ours is None) == (best is None)
    if ours is not None and best is not None:
        assert ours.ms_per_token == pytest.approx(best.ms_per_token, rel=1e-9)


def _gemma_like() -> ModelProfile:
    return ModelProfile(
        name="gemma",
        architecture="gemma3",
        layer_weight_bytes=(4 * MIB,) * 18,
        embedding_bytes=170 * MIB,
        output_bytes=0,
        other_bytes=2560,
        kv_bytes_per_token_per_layer=1024,
        embedding_length=640,
        vocab_size=262144,
        context_length=32768,
    )


def _big_model(layers: int = 32, layer_mib: int = 400) -> ModelProfile:
    return ModelProfile(
        name="big",
        architecture="llama",
        layer_weight_bytes=(layer_mib * MIB,) * layers,
        embedding_bytes=500 * MIB,
        output_bytes=500 * MIB,
        other_bytes=0,
        kv_bytes_per_token_per_layer=4096,
        embedding_length=4096,
        vocab_size=128000,
        context_length=8192,
    )


def test_a_node_behind_a_200ms_link_is_not_used_when_the_model_fits_elsewhere() -> None:
    nodes = [
        NodeCapacity("a", ram_bytes=16 * GIB, gflops=200, models=frozenset({"big"})),
        NodeCapacity("b", ram_bytes=16 * GIB, gflops=200),
        NodeCapacity("far", ram_bytes=64 * GIB, gflops=200),
    ]
    links = [
        Link("a", "b", 2.0, 1000.0),
        Link("a", "far", 200.0, 1000.0),
        Link("b", "far", 200.0, 1000.0),
    ]
    placement = plan_model(ClusterView.build(nodes, links), ModelRequest("big", _big_model()))
    assert "far" not in placement.nodes
    assert placement.primary == "a"


def test_slow_links_make_the_planner_use_fewer_nodes() -> None:
    nodes = [
        NodeCapacity(p, ram_bytes=32 * GIB, gflops=200, models=frozenset({"big"})) for p in "abc"
    ]
    near = [
        Link("a", "b", 1.0, 10_000.0),
        Link("a", "c", 1.0, 10_000.0),
        Link("b", "c", 1.0, 10_000.0),
    ]
    far = [Link(x.source, x.target, 150.0, 50.0) for x in near]
    request = ModelRequest("big", _big_model())
    # The model fits on one node: a worker only pays when its link is cheap next to its compute.
    assert len(plan_model(ClusterView.build(nodes, far), request).nodes) == 1


def test_primary_prefers_a_node_holding_the_model() -> None:
    def view(speed_of_a: float) -> ClusterView:
        nodes = [
            NodeCapacity("a", ram_bytes=16 * GIB, gflops=speed_of_a),
            NodeCapacity("b", ram_bytes=16 * GIB, gflops=100, models=frozenset({"gemma"})),
        ]
        return ClusterView.build(nodes, [Link("a", "b", 1.0, 1000.0)])

    request = ModelRequest("gemma", _gemma_like())
    # Slightly faster is not worth fetching the file; much faster is.
    assert plan_model(view(110.0), request).primary == "b"
    assert plan_model(view(1000.0), request).primary == "a"


def test_different_rpc_versions_are_never_mixed() -> None:
    nodes = [
        NodeCapacity(
            "a", ram_bytes=6 * GIB, gflops=100, rpc_protocol="7.0.0", models=frozenset({"big"})
        ),
        NodeCapacity("b", ram_bytes=64 * GIB, gflops=100, rpc_protocol="6.0.0"),
        NodeCapacity("c", ram_bytes=6 * GIB, gflops=100, rpc_protocol="7.0.0"),
    ]
    links = [Link(x, y, 1.0, 1000.0) for x, y in [("a", "b"), ("a", "c"), ("b", "c")]]
    placement = plan_model(
        ClusterView.build(nodes, links), ModelRequest("big", _big_model(layers=16))
    )
    assert "b" not in placement.nodes
    assert set(placement.nodes) == {"a", "c"}


def test_infeasible_says_how_much_is_missing() -> None:
    nodes = [
        NodeCapacity("a", ram_bytes=2 * GIB, models=frozenset({"big"})),
        NodeCapacity("b", ram_bytes=2 * GIB),
    ]
    view = ClusterView.build(nodes, [Link("a", "b", 1.0, 1000.0)])
    with pytest.raises(PlannerError, match=r"GiB missing"):
        plan_model(view, ModelRequest("big", _big_model()))


def test_unreachable_memory_is_explained() -> None:
    nodes = [
        NodeCapacity("a", ram_bytes=8 * GIB, models=frozenset({"big"})),
        NodeCapacity("b", ram_bytes=8 * GIB),
    ]
    with pytest.raises(PlannerError, match="no primary can reach"):
        plan_model(ClusterView.build(nodes, []), ModelRequest("big", _big_model()))


def test_stability_keeps_the_current_placement_within_the_margin() -> None:
    nodes = [
        NodeCapacity(p, ram_bytes=10 * GIB, gflops=100, models=frozenset({"big"})) for p in "ab"
    ]
    view = ClusterView.build(nodes, [Link("a", "b", 1.0, 1000.0)])
    request = ModelRequest("big", _big_model())
    current = plan_model(view, request)
    joined = ClusterView.build(
        [*nodes, NodeCapacity("c", ram_bytes=10 * GIB, gflops=104)],
        [*view.links, Link("a", "c", 1.0, 1000.0), Link("b", "c", 1.0, 1000.0)],
    )
    assert plan_model(joined, request, current=current) == current
    much_faster = ClusterView.build(
        [*nodes, NodeCapacity("c", ram_bytes=40 * GIB, gflops=5000)],
        [*view.links, Link("a", "c", 0.5, 10_000.0), Link("b", "c", 0.5, 10_000.0)],
    )
    replaced = plan_model(much_faster, request, current=current)
    assert replaced != current
    assert "c" in replaced.nodes


def test_plan_beats_memory_proportional_on_a_mixed_cluster() -> None:
    nodes = [
        NodeCapacity("desktop", ram_bytes=32 * GIB, gflops=400, models=frozenset({"big"})),
        NodeCapacity("laptop", ram_bytes=16 * GIB, gflops=80),
        NodeCapacity("old-pc", ram_bytes=24 * GIB, gflops=40),
    ]
    links = [
        Link("desktop", "laptop", 40.0, 100.0),
        Link("desktop", "old-pc", 3.0, 1000.0),
        Link("laptop", "old-pc", 40.0, 100.0),
    ]
    view = ClusterView.build(nodes, links)
    request = ModelRequest("big", _big_model())
    ours = plan_model(view, request)
    theirs = BASELINES["memory_proportional"](view, request, COST)
    assert theirs is not None
    assert ours.tokens_per_s >= 1.2 * theirs.tokens_per_s
    # a holder may ask for llama.cpp's split instead (to compare them on a real mesh)
    asked = plan_model(view, replace(request, split="memory"), COST, ours)
    assert asked == theirs


@given(profiles(), st.floats(min_value=0.5, max_value=5000.0))
def test_a_speed_calibrated_from_the_engine_predicts_that_engine_alone(
    profile: ModelProfile, tokens_per_s: float
) -> None:
    cost = CostModel()
    node = NodeCapacity("solo", ram_bytes=64 * GIB, gflops=cost.gflops_for(profile, tokens_per_s))
    seconds = cost.head_seconds(profile, node) + profile.layer_count * cost.layer_seconds(
        profile, node
    )
    assert seconds * tokens_per_s == pytest.approx(1.0, rel=1e-9)
