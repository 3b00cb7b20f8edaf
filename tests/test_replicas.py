"""Replicas: a model served by several placements on disjoint nodes, elected like one, with
memory booked once across them; and the routing rule that spreads requests over them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.election import Elector, replica_requests
from sharedllm.mesh.gossip_reader import current_claims, offered_models
from sharedllm.node.serving.replica_choice import (
    FAILED_FOR_S,
    IN_FLIGHT_MAX_AGE_S,
    MAX_IN_FLIGHT,
    InFlight,
    ReplicaLoad,
    affinity_of,
    choose_replica,
)
from sharedllm.scheduler.placement import MAX_REPLICAS, unit_key

from .test_election import _mesh


def _with_replicas(members: dict[str, dict[str, Any]], replicas: object) -> None:
    """As a new gossiped state does: new entries (readers remember parsed ones by identity)."""
    for content in members.values():
        content["models"] = [
            {**entry, "min_replicas": replicas, "max_replicas": replicas}
            for entry in content["models"]
        ]


def _elect(members: dict[str, dict[str, Any]], until: float) -> list[Elector]:
    electors = [Elector(peer) for peer in sorted(members)]
    now = 0.0
    while now < until:
        for elector in electors:
            elector.step(now, members)
            members[elector.me]["claims"] = elector.gossiped_claims()
        now += 0.5
    return electors


def test_two_replicas_take_disjoint_nodes_with_their_own_primaries() -> None:
    members = _mesh({p: 2048 for p in "abcd"}, holders=set("abcd"))
    _with_replicas(members, 2)
    _elect(members, 15.0)
    claims = current_claims(members)
    assert set(claims) == {"m", unit_key("m", 1)}
    first, second = claims["m"], claims[unit_key("m", 1)]
    assert (first.replica, second.replica) == (0, 1)
    assert not {first.primary, *first.nodes} & {second.primary, *second.nodes}


def test_a_replica_without_free_nodes_waits_and_the_first_serves() -> None:
    members = _mesh({"a": 2048}, holders={"a"})
    _with_replicas(members, 3)
    electors = _elect(members, 10.0)
    assert set(current_claims(members)) == {"m"}
    states = electors[0].step(10.0, members)
    assert states[unit_key("m", 1)].problem == "no nodes free for replica 2"
    assert "m" not in electors[0].problems  # the model itself is served: nothing to report


def test_fewer_replicas_withdraw_the_extra_claim() -> None:
    members = _mesh({p: 2048 for p in "ab"}, holders=set("ab"))
    _with_replicas(members, 2)
    electors = _elect(members, 15.0)
    assert len(current_claims(members)) == 2
    _with_replicas(members, 1)
    for elector in electors:
        elector.step(16.0, members)
        members[elector.me]["claims"] = elector.gossiped_claims()
    assert set(current_claims(members)) == {"m"}


@pytest.mark.parametrize(("gossiped", "read"), [(2, 2), (0, 1), (MAX_REPLICAS + 1, 1), ("2", 1)])
def test_a_gossiped_replica_count_is_read_within_bounds(gossiped: object, read: int) -> None:
    members = _mesh({"a": 2048}, holders={"a"})
    _with_replicas(members, gossiped)
    assert offered_models(members)["m"].replicas == read


def test_replicas_are_planned_first_replicas_first() -> None:
    members = _mesh({"a": 2048}, holders={"a"})
    members["a"]["models"].append({**members["a"]["models"][0], "id": "n"})
    _with_replicas(members, 2)
    order = [(r.model_id, r.replica) for r in replica_requests(offered_models(members), {}, {})]
    assert order == [("m", 0), ("n", 0), ("m", 1), ("n", 1)]


@pytest.mark.parametrize("replica", [-1, MAX_REPLICAS, True, "1", None])
def test_a_hostile_replica_in_a_claim_is_refused(replica: object) -> None:
    wire = {**Claim("m", 1, "a", (("a", 0, 7),)).to_wire(), "replica": replica}
    with pytest.raises(ValueError, match="replica"):
        Claim.from_wire(wire)


def test_a_model_id_that_could_pass_for_a_replica_is_ignored() -> None:
    members = _mesh({"a": 2048}, holders={"a"})
    members["a"]["models"][0]["id"] = unit_key("m", 1)
    assert offered_models(members) == {}
    with pytest.raises(ValueError, match="model id"):
        Claim.from_wire(Claim(unit_key("m", 1), 1, "a", (("a", 0, 7),)).to_wire())


# -- routing -----------------------------------------------------------------------------------

loads = st.lists(
    st.builds(
        ReplicaLoad,
        key=st.tuples(st.just("m"), st.integers(1, 9), st.sampled_from("pqrstu")),
        slots=st.integers(1, 8),
        in_flight=st.integers(0, 20),
        rtt_ms=st.floats(0, 200),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda r: r.key,
)


@settings(max_examples=200)
@given(loads, st.none() | st.text(max_size=20), st.data())
def test_a_request_goes_to_a_serving_replica_and_avoids_failed_ones(
    replicas: list[ReplicaLoad], affinity: str | None, data: st.DataObject
) -> None:
    failed = frozenset(data.draw(st.sets(st.sampled_from([r.key for r in replicas]))))
    chosen = choose_replica(replicas, affinity, failed)
    assert chosen in replicas
    if len(failed) < len(replicas):
        assert chosen.key not in failed
    if affinity is None:
        assert chosen.load == min(
            r.load for r in replicas if r.key not in failed or not (len(failed) < len(replicas))
        )


@given(loads, st.text(min_size=1, max_size=20))
def test_a_conversation_keeps_its_replica_while_that_has_a_free_slot(
    replicas: list[ReplicaLoad], affinity: str
) -> None:
    idle = [ReplicaLoad(r.key, r.slots, 0, r.rtt_ms) for r in replicas]
    home = choose_replica(idle, affinity, frozenset())
    busier = [
        ReplicaLoad(r.key, r.slots, r.slots - 1 if r.key == home.key else 0, r.rtt_ms) for r in idle
    ]
    assert choose_replica(busier, affinity, frozenset()).key == home.key
    # a replica leaving moves only its own conversations
    others = [r for r in idle if r.key != home.key]
    if others:
        gone = next(r for r in idle if r.key != home.key)
        remaining = [r for r in idle if r.key != gone.key]
        assert choose_replica(remaining, affinity, frozenset()).key == home.key


def test_a_full_home_replica_sends_the_conversation_to_the_least_loaded() -> None:
    a, b = ("m", 1, "a"), ("m", 1, "b")
    affinity = next(
        f"user{i}"
        for i in range(100)
        if choose_replica(
            [ReplicaLoad(a, 2, 0, 1.0), ReplicaLoad(b, 2, 0, 1.0)], f"user{i}", frozenset()
        ).key
        == a
    )
    full = [ReplicaLoad(a, 2, 2, 1.0), ReplicaLoad(b, 2, 1, 1.0)]
    assert choose_replica(full, affinity, frozenset()).key == b


def test_in_flight_counts_end_fail_and_stay_bounded() -> None:
    tracker, key = InFlight(), ("m", 1, "a")
    tokens = [tracker.start(key, 0.0) for _ in range(3)]
    tracker.end(tokens[0], 0.5)
    assert tracker.count(key, 1.0) == 2 and tracker.routed[key] == 3
    assert tracker.count(key, IN_FLIGHT_MAX_AGE_S + 1) == 0  # hung answers are forgotten
    for index in range(MAX_IN_FLIGHT + 10):
        tracker.start(("m", index, "x"), 0.0)
    assert tracker.count(("m", 5, "x"), 1.0) == 0 and len(tracker.routed) <= MAX_IN_FLIGHT
    tracker.fail(key, 10.0)
    assert key in tracker.failed(10.0 + FAILED_FOR_S / 2)
    assert key not in tracker.failed(10.0 + FAILED_FOR_S)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"user": "ann", "messages": [{"role": "user", "content": "hi"}]}, "user:ann"),
        ({"metadata": {"user_id": "bob"}}, "user:bob"),
        ({"prompt": "Once"}, "prompt:Once"),
        ({"prompt": ["not", "text"]}, None),
        ({}, None),
    ],
)
def test_affinity_comes_from_the_user_else_the_conversation_opening(
    payload: dict[str, object], expected: str | None
) -> None:
    assert affinity_of(payload) == expected


def test_later_turns_of_a_conversation_share_its_affinity() -> None:
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    later = [*opening, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    assert affinity_of({"messages": opening}) == affinity_of({"messages": later})


def test_an_affinity_that_is_not_valid_utf8_still_routes() -> None:
    replicas = [ReplicaLoad(("m", 1, p), 2, 0, 1.0) for p in "ab"]
    lone_surrogate = affinity_of({"user": "\ud800x" * 1000})  # JSON allows it; UTF-8 does not
    assert lone_surrogate is not None and len(lone_surrogate) <= 261
    assert choose_replica(replicas, lone_surrogate, frozenset()) in replicas
