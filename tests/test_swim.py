"""SWIM failure detection (sans-I/O): round-robin probing, suspicion then death, refutation by a
newer incarnation, rumor precedence and bounded retransmission, hostile rumors refused."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.swim import Liveness, Rumor, Swim


def _swim(peers: int = 4) -> Swim:
    swim = Swim("me", random.Random(1), suspicion_s=4.0)
    for index in range(peers):
        swim.heard_of(f"p{index}", 10, now=0.0)
    return swim


def test_every_member_is_probed_once_per_pass() -> None:
    swim = _swim(5)
    first_pass = [swim.next_probe() for _ in range(5)]
    second_pass = [swim.next_probe() for _ in range(5)]
    assert sorted(first_pass) == sorted(second_pass) == [f"p{i}" for i in range(5)]  # type: ignore[type-var]


def test_failed_probe_suspects_then_kills_and_new_state_revives() -> None:
    swim = _swim()
    swim.probe_failed("p1", now=1.0)
    assert swim.status("p1") is Liveness.SUSPECT
    assert swim.tick(4.9) == []
    assert swim.tick(5.0) == ["p1"]
    assert swim.status("p1") is Liveness.DEAD
    assert "p1" not in set(swim.live_members())
    swim.heard_of("p1", 9, now=6.0)  # an old state is no sign of life
    assert swim.status("p1") is Liveness.DEAD
    swim.heard_of("p1", 11, now=7.0)  # a restarted node publishes a newer version
    assert swim.status("p1") is Liveness.ALIVE


def test_answered_probe_clears_our_own_suspicion() -> None:
    swim = _swim()
    swim.probe_failed("p2", now=1.0)
    swim.probe_answered("p2", now=2.0)
    assert swim.status("p2") is Liveness.ALIVE
    assert swim.tick(10.0) == []


def test_a_suspected_node_refutes_with_a_higher_incarnation() -> None:
    swim = _swim()
    swim.set_incarnation(20)
    swim.hear(Rumor("me", Liveness.SUSPECT, 19), now=1.0)
    assert not swim.must_refute  # an older suspicion is already refuted
    swim.hear(Rumor("me", Liveness.SUSPECT, 20), now=1.0)
    assert swim.must_refute
    swim.set_incarnation(21)
    assert not swim.must_refute
    assert Rumor("me", Liveness.ALIVE, 21) in swim.rumors_to_send(10)


@pytest.mark.parametrize(
    ("known", "rumor", "wins"),
    [
        ((Liveness.ALIVE, 5), (Liveness.ALIVE, 6), True),
        ((Liveness.ALIVE, 5), (Liveness.ALIVE, 5), False),
        ((Liveness.ALIVE, 5), (Liveness.SUSPECT, 5), True),
        ((Liveness.SUSPECT, 5), (Liveness.ALIVE, 5), False),
        ((Liveness.SUSPECT, 5), (Liveness.ALIVE, 6), True),
        ((Liveness.SUSPECT, 5), (Liveness.SUSPECT, 5), False),
        ((Liveness.SUSPECT, 5), (Liveness.DEAD, 5), True),
        ((Liveness.DEAD, 5), (Liveness.ALIVE, 5), False),
        ((Liveness.DEAD, 5), (Liveness.SUSPECT, 9), False),
        ((Liveness.DEAD, 5), (Liveness.ALIVE, 6), True),
        ((Liveness.LEFT, 5), (Liveness.ALIVE, 5), False),
    ],
)
def test_rumor_precedence(
    known: tuple[Liveness, int], rumor: tuple[Liveness, int], wins: bool
) -> None:
    swim = Swim("me", random.Random(1))
    swim.heard_of("p", known[1], now=0.0)
    if known[0] is not Liveness.ALIVE:
        assert swim.hear(Rumor("p", known[0], known[1]), now=0.0)
    assert swim.hear(Rumor("p", rumor[0], rumor[1]), now=1.0) is wins


def test_rumors_go_out_a_bounded_number_of_times() -> None:
    swim = _swim(7)  # 8 members with us: 3 x log2(8) = 9 sends
    swim.probe_failed("p3", now=0.0)
    sends = 0
    while swim.rumors_to_send(5):
        sends += 1
        assert sends < 100
    assert sends == 9


def test_strangers_are_learned_from_states_not_from_rumors() -> None:
    swim = _swim(0)
    assert not swim.hear(Rumor("stranger", Liveness.SUSPECT, 3), now=0.0)
    assert swim.status("stranger") is Liveness.DEAD  # unknown


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=6), st.lists, max_leaves=6))
def test_hostile_rumors_are_value_errors(data: object) -> None:
    try:
        rumor = Rumor.from_wire(data)
    except ValueError:
        return
    assert Rumor.from_wire(rumor.to_wire()) == rumor
