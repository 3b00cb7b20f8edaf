"""Election from gossip: every node reaches the same claim from the same states, claims wait for
the plan to settle, higher claims fence lower ones, epochs only grow, and hostile state content is
ignored rather than trusted."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.election import Elector, next_epoch
from sharedllm.mesh.gossip_reader import (
    ASSUMED_BANDWIDTH_MBPS,
    claims_in,
    cluster_view,
    current_claims,
    offered_models,
)
from sharedllm.mesh.memory_ledger import claim_memory
from sharedllm.scheduler.model_profile import ModelProfile, profile_to_dict
from sharedllm.scheduler.planner import DEFAULT_COST

MIB = 1024**2
PROFILE = ModelProfile(
    name="m",
    architecture="llama",
    layer_weight_bytes=(40 * MIB,) * 8,
    embedding_bytes=100 * MIB,
    output_bytes=0,
    other_bytes=1024,
    kv_bytes_per_token_per_layer=1024,
    embedding_length=1024,
    vocab_size=32000,
    context_length=4096,
)


def _node(
    peer: str,
    ram_mib: int,
    *,
    holds: bool = False,
    links: tuple[str, ...] = (),
    model_id: str = "m",
) -> dict[str, Any]:
    return {
        "ram_total": ram_mib * MIB,
        "vram_total": 0,
        "gflops": 50.0,
        "rpc_protocol": "7.0.0",
        "memory_cap": None,
        "models": [{"id": model_id, "context": 1024, "profile": profile_to_dict(PROFILE)}]
        if holds
        else [],
        "links": {other: {"rtt_ms": 0.5, "bandwidth_mbps": 1000.0} for other in links},
        "claims": [],
    }


def _mesh(ram: dict[str, int], holders: set[str]) -> dict[str, dict[str, Any]]:
    peers = sorted(ram)
    return {
        p: _node(p, ram[p], holds=p in holders, links=tuple(o for o in peers if o != p))
        for p in peers
    }


def _run(elector: Elector, members: dict[str, dict[str, Any]], until: float) -> None:
    """Steps every half second; the elector's claims go into its own state, as its node
    publishes them."""
    now = 0.0
    while now <= until:
        elector.step(now, members)
        if elector.me in members:
            members[elector.me]["claims"] = elector.gossiped_claims()
        now += 0.5


def test_the_planned_primary_claims_after_the_plan_settles() -> None:
    members = _mesh({"a": 4096, "b": 4096}, holders={"a"})
    members["c"] = _node("c", 4096)  # measured by nobody yet: the view is not complete
    elector = Elector("a", settle_s=2.0)
    elector.step(0.0, members)
    assert elector.claims == {}  # the plan must stay the same for settle_s first
    elector.step(1.0, members)
    assert elector.claims == {}
    states = elector.step(2.0, members)
    claim = elector.claims["m"]
    assert claim.primary == "a" and claim.epoch == 1 and not claim.serving
    assert states["m"].current == claim


def test_a_model_nothing_serves_is_claimed_soon_once_every_link_is_measured() -> None:
    # A small mesh whose views are complete (as when its members start again together): the
    # plan waits on no more news, so a quarter of the settle time is enough.
    members = _mesh({"a": 4096, "b": 4096, "c": 4096}, holders={"a"})
    elector = Elector("a", settle_s=2.0)
    elector.step(0.0, members)
    elector.step(0.4, members)
    assert elector.claims == {}
    elector.step(0.5, members)
    assert elector.claims["m"].primary == "a"


def test_the_elector_says_when_the_plan_it_waits_to_claim_settles() -> None:
    # Its node steps then, rather than at its next tick.
    members = _mesh({"a": 4096, "b": 4096}, holders={"a"})
    members["c"] = _node("c", 4096)  # unmeasured: the whole settle time
    primary, other = Elector("a", settle_s=2.0), Elector("b", settle_s=2.0)
    assert primary.next_claim_at() == float("inf")
    primary.step(3.0, members)
    other.step(3.0, members)
    assert primary.next_claim_at() == 5.0
    assert other.next_claim_at() == float("inf")  # b is not the planned primary
    members = _mesh({"a": 4096, "b": 4096, "c": 4096}, holders={"a"})
    primary.step(3.2, members)  # every link measured now: a quarter of it, from when it began
    assert primary.next_claim_at() == 3.5
    primary.step(3.5, members)
    assert "m" in primary.claims and primary.next_claim_at() == float("inf")


def test_replacing_a_standing_placement_waits_the_whole_settle_time() -> None:
    members = _mesh({"a": 700, "b": 4096, "c": 4096}, holders={"a"})
    elector = Elector("a", settle_s=2.0)
    _run(elector, members, 1.0)
    first = elector.claims["m"]
    members["a"]["claims"] = [first.to_wire()]
    del members[first.workers[0]]  # its worker is gone: the claim must be replaced
    elector.step(10.0, members)
    elector.step(11.0, members)
    assert elector.claims["m"] == first  # a complete view, but a placement stands
    elector.step(12.0, members)
    assert elector.claims["m"].epoch > first.epoch


def test_a_node_that_is_not_the_planned_primary_never_claims() -> None:
    members = _mesh({"a": 4096, "b": 4096}, holders={"a"})
    elector = Elector("b")
    _run(elector, members, 10.0)
    assert elector.claims == {}


def test_only_a_holder_may_lead() -> None:
    # b is far bigger, but without the file it may only lend memory.
    members = _mesh({"a": 1024, "b": 65536}, holders={"a"})
    elector = Elector("a")
    _run(elector, members, 3.0)
    assert elector.claims["m"].primary == "a"


def test_no_holder_means_no_model_and_a_shortfall_is_explained() -> None:
    assert offered_models(_mesh({"a": 4096}, holders=set())) == {}
    members = _mesh({"a": 300}, holders={"a"})
    states = Elector("a").step(0.0, members)
    assert states["m"].current is None
    assert states["m"].problem is not None and "GiB" in states["m"].problem


def test_a_higher_claim_fences_ours_and_epochs_only_grow() -> None:
    members = _mesh({"a": 4096, "b": 4096}, holders={"a", "b"})
    elector = Elector("a")
    _run(elector, members, 3.0)
    mine = elector.claims["m"]
    members["b"]["claims"] = [Claim("m", mine.epoch + 1, "b", (("b", 0, 7),)).to_wire()]
    states = elector.step(10.0, members)
    assert "m" not in elector.claims
    assert states["m"].current is not None and states["m"].current.primary == "b"
    # b dies: a leads again, with an epoch above every epoch it has seen
    del members["b"]
    _run(elector, members, 3.0)
    assert elector.claims["m"].epoch == mine.epoch + 2


def test_a_lost_worker_is_replaced_by_a_new_claim() -> None:
    members = _mesh({"a": 700, "b": 1400, "c": 1400}, holders={"a"})
    elector = Elector("a")
    _run(elector, members, 3.0)
    first = elector.claims["m"]
    assert first.workers  # a cannot hold the model alone
    lost = first.workers[0]
    del members[lost]
    for other in members.values():
        other["links"].pop(lost, None)
    _run(elector, members, 3.0)
    second = elector.claims["m"]
    assert second.epoch > first.epoch and lost not in second.nodes


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["p1", "p2", "p3", "p4", "p5"]),
        st.integers(min_value=600, max_value=4000),
        min_size=1,
    ),
    st.data(),
)
def test_every_node_computes_the_same_plan(ram: dict[str, int], data: st.DataObject) -> None:
    holders = set(data.draw(st.sets(st.sampled_from(sorted(ram)), min_size=1)))
    members = _mesh(ram, holders)
    claimants = []
    planned = set()
    for peer in ram:
        elector = Elector(peer)
        states = {}
        for now in (0.0, 1.0, 2.0, 3.0):
            states = elector.step(now, members)
        if elector.claims:
            claimants.append(peer)
        plan = states["m"].planned  # every node plans, holder or not, to share out memory
        planned.add(None if plan is None else (plan.primary, plan.nodes))
    assert len(planned) == 1  # one answer from one view
    assert len(claimants) <= 1  # and so at most one node claims the model


def test_hostile_content_is_ignored() -> None:
    garbage: list[Any] = [None, 7, "x", [], {"models": "no"}, {"claims": [{"epoch": -1}]}]
    members: dict[str, Any] = {f"bad{i}": g for i, g in enumerate(garbage) if isinstance(g, dict)}
    members["good"] = _node("good", 4096, holds=True)
    members["good"]["links"] = {"bad0": {"rtt_ms": float("nan")}, "x": "y"}
    members["liar"] = {**_node("liar", 4096), "claims": [{"model": "m"}, "junk"]}
    view = cluster_view(members)
    assert {n.peer_id for n in view.nodes} == {"good", "liar"}
    assert claims_in(members["liar"], "liar") == ()
    # a claim naming another node as primary counts for nothing
    members["liar"]["claims"] = [Claim("m", 99, "good", (("good", 0, 7),)).to_wire()]
    assert current_claims(members) == {}


def test_unmeasured_bandwidth_is_assumed() -> None:
    members = _mesh({"a": 4096, "b": 4096}, holders={"a"})
    members["a"]["links"]["b"] = {"rtt_ms": 1.0, "bandwidth_mbps": None}
    link = cluster_view(members).link("a", "b")
    assert link is not None and link.bandwidth_mbps == ASSUMED_BANDWIDTH_MBPS


def test_tunnels_are_priced_with_the_data_planes_round_trip_once_measured() -> None:
    members = _mesh({"a": 4096, "b": 4096}, holders={"a"})
    members["a"]["links"]["b"] = {"rtt_ms": 4.0, "bandwidth_mbps": 900.0, "data_rtt_ms": 0.3}
    members["b"]["links"]["a"] = {"rtt_ms": 5.0, "data_rtt_ms": float("nan")}  # not measured
    ab, ba = cluster_view(members).link("a", "b"), cluster_view(members).link("b", "a")
    assert ab is not None and ab.rtt_ms == 0.3
    assert ba is not None and ba.rtt_ms == 5.0  # the control plane's until then


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=5), st.lists, max_leaves=12))
def test_claim_decoder_accepts_or_refuses_cleanly(data: object) -> None:
    wire = {"model": "m", "epoch": 1, "primary": "p", "layers": data, "serving": False}
    try:
        claim = Claim.from_wire(wire)
    except ValueError:
        return
    assert Claim.from_wire(claim.to_wire()) == claim


def test_nodes_without_the_file_repeat_what_the_holder_says_is_missing() -> None:
    members = _mesh({"a": 300, "b": 300}, holders={"a"})
    holder, other = Elector("a"), Elector("b")
    problem = holder.step(0.0, members)["m"].problem
    assert problem is not None and holder.problems == {"m": problem}
    assert other.step(0.0, members)["m"].problem == "no primary elected yet"
    members["a"]["problems"] = dict(holder.problems)  # what a's next gossiped state carries
    assert other.step(1.0, members)["m"].problem == problem
    assert other.claims == {} and other.step(1.0, members)["m"].planned is None


def test_a_primary_that_cannot_replace_a_lost_worker_withdraws() -> None:
    members = _mesh({"a": 700, "b": 700}, holders={"a"})
    elector = Elector("a")
    _run(elector, members, 3.0)
    assert elector.claims["m"].workers == ("b",)
    members["a"]["claims"] = [elector.claims["m"].to_wire()]
    del members["b"]
    members["a"]["links"].clear()
    state = elector.step(10.0, members)["m"]
    assert elector.claims == {} and state.current is None
    assert state.problem is not None and "GiB" in state.problem


def _publish(members: dict[str, dict[str, Any]], elector: Elector) -> None:
    members[elector.me]["claims"] = elector.gossiped_claims()


def _serving_alone(ram_mib: int) -> tuple[dict[str, dict[str, Any]], Elector, Claim]:
    """`a` serves the model alone; then a much faster `c` joins."""
    members = _mesh({"a": ram_mib}, holders={"a"})
    elector = Elector("a")
    _run(elector, members, 3.0)
    first = elector.claims["m"]
    elector.set_serving("m", first.epoch, True)
    _publish(members, elector)
    members["c"] = _node("c", 4096, links=("a",))
    members["c"]["gflops"] = 5000.0
    members["a"]["links"]["c"] = {"rtt_ms": 0.5, "bandwidth_mbps": 1000.0}
    return members, elector, elector.claims["m"]


def _until_new_claim(elector: Elector, members: dict[str, dict[str, Any]], old: Claim) -> Claim:
    now = 10.0
    while elector.claims["m"].rank == old.rank:
        elector.step(now, members)
        now += 0.5
        assert now < 30
    _publish(members, elector)
    return elector.claims["m"]


def test_a_switch_with_room_for_both_placements_is_make_before_break() -> None:
    members, elector, first = _serving_alone(4096)
    second = _until_new_claim(elector, members, first)
    assert second.overlap and "c" in second.nodes
    follower = Elector("c")
    for node in (elector, follower):
        state = node.step(20.0, members)["m"]
        assert state.current == second and state.routed == first  # the old one serves meanwhile
        assert {claim.rank for claim in state.placements()} == {first.rank, second.rank}
    elector.set_serving("m", second.epoch, True)
    _publish(members, elector)
    for node in (elector, follower):
        state = node.step(21.0, members)["m"]
        assert state.routed is not None and state.routed.rank == second.rank
        assert [claim.rank for claim in state.winding_down] == [first.rank]  # finishing
    elector.end_handover("m", first.epoch)
    _publish(members, elector)
    state = follower.step(22.0, members)["m"]
    assert state.placements() == (state.current,) and state.winding_down == ()


def test_a_switch_without_room_for_both_stops_the_old_placement_first() -> None:
    members, elector, first = _serving_alone(900)
    second = _until_new_claim(elector, members, first)
    assert not second.overlap and elector.handing_over == {}
    state = Elector("c").step(20.0, members)["m"]
    assert state.routed == second and state.placements() == (second,)


def test_a_replaced_placement_that_stops_serving_is_withdrawn_at_once() -> None:
    members, elector, first = _serving_alone(4096)
    _until_new_claim(elector, members, first)
    assert elector.handing_over["m"] == first
    elector.set_serving("m", first.epoch, False)  # its engine died during the switch
    assert elector.handing_over == {}


def _memory_per_node(members: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Bytes every current claim asks of each node, all models together."""
    view, requests = cluster_view(members), offered_models(members)
    used: dict[str, int] = {}
    for model_id, claim in current_claims(members).items():
        for node, amount in claim_memory(requests[model_id], DEFAULT_COST, claim).items():
            used[node] = used.get(node, 0) + amount
    assert all(node in view for node in used)
    return used


def test_two_models_never_book_the_same_worker_memory_twice() -> None:
    # Each model needs a 600 MiB holder and three layers on a worker; c can take one model's.
    members = {
        "a": _node("a", 600, holds=True, links=("b", "c")),
        "b": _node("b", 600, holds=True, links=("a", "c"), model_id="n"),
        "c": _node("c", 600, links=("a", "b")),
    }
    electors = [Elector(peer) for peer in members]
    now = 0.0
    while now < 20.0:
        for elector in electors:
            elector.step(now, members)
            _publish(members, elector)
        now += 0.5
    claims = current_claims(members)
    assert set(claims) == {"m"}  # the first model in order is served, n waits for memory
    usable = {node.peer_id: node.usable_bytes for node in cluster_view(members).nodes}
    assert all(used <= usable[node] for node, used in _memory_per_node(members).items())
    problem = electors[1].step(now, members)["n"].problem
    assert problem is not None and "GiB" in problem


@given(
    st.integers(min_value=0, max_value=10**12),
    st.sets(st.text(alphabet="abcdef", min_size=1, max_size=4), min_size=1, max_size=12),
)
def test_two_holders_never_claim_the_same_epoch(highest: int, holders: set[str]) -> None:
    """Holders whose views differ for a moment may both claim at once: their epochs differ,
    are above every epoch seen, and stay close to it."""
    epochs = {holder: next_epoch(highest, holder, holders) for holder in holders}
    assert len(set(epochs.values())) == len(holders)
    assert all(highest < epoch <= highest + len(holders) for epoch in epochs.values())


def test_a_single_holder_counts_epochs_one_by_one() -> None:
    assert [next_epoch(h, "a", ["a"]) for h in (0, 1, 7)] == [1, 2, 8]
    assert next_epoch(3, "a", []) == 4  # a holder always counts itself
