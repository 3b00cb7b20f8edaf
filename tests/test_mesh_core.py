"""The mesh's policies without I/O: `MeshCore` fed `now` and a world it reads, answering
actions (reconnect choice, anti-entropy spacing, gossip rounds, publish policy, probes and
bandwidth targets). No trio, no sockets."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.mesh_core import (
    FIRST_FIGURES_GATHER_S,
    NEXT_UNMEASURED_S,
    Action,
    Do,
    MeshCore,
    measured_figures,
)
from sharedllm.mesh.swim import Swim
from sharedllm.mesh.timing import MeshTiming

TIMING = MeshTiming()


@dataclass
class World:
    connected: list[str] = field(default_factory=list)
    admitted: set[str] = field(default_factory=set)
    hello: set[str] = field(default_factory=set)
    states: int = 1
    revoked_peers: set[str] = field(default_factory=set)
    differing: set[str] = field(default_factory=set)
    bandwidth: list[tuple[str, bool]] = field(default_factory=list)

    def connected_peers(self) -> Sequence[str]:
        return self.connected

    def admitted_peers(self) -> set[str]:
        return self.admitted

    def saying_hello(self) -> set[str]:
        return self.hello

    def known_states(self) -> int:
        return self.states

    def revoked(self, peer: str) -> bool:
        return peer in self.revoked_peers

    def revocations_differ(self, peer: str) -> bool:
        return peer in self.differing

    def bandwidth_candidates(self) -> Sequence[tuple[str, bool]]:
        return self.bandwidth


def _core(
    live: Sequence[str] = (), bootstrapped: bool = True, bandwidth: bool = False, seed: int = 1
) -> MeshCore:
    rng = random.Random(seed)
    swim = Swim("me", rng)
    for peer in live:
        swim.heard_of(peer, 1, 0.0)
    core = MeshCore("me", TIMING, rng, swim, bootstrapped, measures_bandwidth=bandwidth)
    core.start(0.0)
    return core


def _peers(count: int) -> list[str]:
    return [f"p{n:04d}" for n in range(count)]


def _of(actions: Sequence[Action], do: Do) -> list[str]:
    return [a.peer for a in actions if a.do is do]


# -- reconnect choice ----------------------------------------------------------------------


def test_alone_it_dials_the_bootstrap_addresses_and_nothing_else() -> None:
    core = _core(live=_peers(3))
    assert core.reconnect_round(World()) == [Action(Do.DIAL_BOOTSTRAP)]


def test_until_a_bootstrap_peer_let_it_in_it_keeps_dialing_them_while_connected() -> None:
    core = _core(live=["a"], bootstrapped=False)
    actions = core.reconnect_round(World(connected=["a"], admitted={"a"}))
    assert actions == [Action(Do.DIAL_BOOTSTRAP)]
    core.bootstrapped = True
    assert core.reconnect_round(World(connected=["a"], admitted={"a"})) == []


def test_a_connection_without_a_hello_gets_one_unless_one_is_under_way() -> None:
    core = _core(live=["a", "b"])
    world = World(connected=["a", "b"], admitted={"a"})
    assert _of(core.reconnect_round(world), Do.INTRODUCE) == ["b"]
    world.hello = {"b"}
    assert _of(core.reconnect_round(world), Do.INTRODUCE) == []


def test_a_small_mesh_probes_every_unconnected_member_and_a_big_one_connects_to_a_few() -> None:
    small = _core(live=_peers(10))
    world = World(connected=["p0000"], admitted={"p0000"})
    assert sorted(_of(small.reconnect_round(world), Do.PROBE)) == _peers(10)[1:]
    big = _core(live=_peers(200))
    connects = _of(big.reconnect_round(world), Do.CONNECT)
    assert len(connects) == TIMING.min_connections - 1 and "p0000" not in connects


def test_reconnect_actions_already_running_are_not_started_twice() -> None:
    core = _core(live=_peers(5))
    world = World(connected=["p0000"], admitted={"p0000"})
    first = core.handle_timer(0.0, world)
    probes = _of(first, Do.PROBE)
    assert probes
    again = core.handle_timer(10.0, world)
    assert not set(_of(again, Do.PROBE)) & set(probes)
    for peer in probes:
        core.finished(Action(Do.PROBE, peer))
    assert set(_of(core.handle_timer(20.0, world), Do.PROBE)) == set(probes)


# -- anti-entropy -------------------------------------------------------------------------


def _round_times(core: MeshCore, world: World, until: float, now: float = 0.0) -> list[float]:
    """When gossip rounds ran before `until` (each round has a revocation sync with the one
    differing peer); every action ends at once."""
    times = []
    while now < until:
        actions = core.handle_timer(now, world)
        if _of(actions, Do.SYNC_REVOCATIONS):
            times.append(now)
        for action in actions:
            core.finished(action)
        now = core.next_timer()
    return times


@given(members=st.integers(1, 1000), seed=st.integers(0, 1000))
def test_anti_entropy_rounds_are_spaced_by_the_size_of_the_mesh(members: int, seed: int) -> None:
    """A digest names every member, so rounds are `interval * max(1, members/50)` apart
    (± the 20% jitter): each node's gossip work per second stays bounded as the mesh grows."""
    core = _core(seed=seed)
    world = World(connected=["a"], admitted={"a"}, states=members, differing={"a"})
    times = _round_times(core, world, 400.0)
    spacing = max(1.0, members / 50)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps
    for gap in gaps:
        assert 0.8 * spacing * TIMING.gossip_interval_s - 1e-9 <= gap
        assert gap <= 1.2 * spacing * TIMING.gossip_interval_s + 1e-9


def test_a_round_that_brought_news_is_followed_by_the_next_one_at_once() -> None:
    core = _core()
    world = World(connected=["a"], admitted={"a"}, states=1000, differing={"a"})
    assert _round_times(core, world, 0.5) == [0.0]
    core.note_news(new_states=8, more=False)  # catching up: a node joining, a mesh forming
    second = _round_times(core, world, 1.3, now=0.5)
    assert len(second) == 1 and second[0] <= 1.2 * TIMING.gossip_interval_s
    core.note_news(new_states=1, more=False)  # a refreshed state alone is no news
    assert _round_times(core, world, 0.8 * 20 * TIMING.gossip_interval_s, now=1.3) == []


def test_a_small_mesh_connects_to_members_it_just_heard_of_at_once() -> None:
    core = _core(live=["a"])
    world = World(connected=["a"], admitted={"a"}, states=2)
    for action in core.handle_timer(0.0, world):
        core.finished(action)
    core.swim.heard_of("b", 1, 0.3)  # an exchange with a brought b's state
    core.heard_of_members(0.3)
    assert core.next_timer() == 0.3
    assert _of(core.handle_timer(0.3, World(connected=["a"], admitted={"a"}, states=3)), Do.PROBE)
    # in a big mesh our few connections are chosen at the reconnect round
    big, due = _big_core_past_its_first_timers()
    big.heard_of_members(0.3)
    assert big.next_timer() == due


def _big_core_past_its_first_timers() -> tuple[MeshCore, float]:
    """A core of a mesh too big to be fully connected, after its timers first ran, and when
    it wants to be asked next."""
    live = _peers(TIMING.full_mesh_up_to + 1)
    big = _core(live=live)
    big.handle_timer(0.0, World(connected=live[:6], admitted=set(live), states=len(live)))
    return big, big.next_timer()


def test_a_gossip_round_exchanges_with_fanout_members_and_cuts_revoked_peers() -> None:
    core = _core()
    peers = _peers(10)
    world = World(connected=[*peers, "bad"], admitted=set(peers), revoked_peers={"bad"})
    actions = core.gossip_round(world)
    exchanges = _of(actions, Do.EXCHANGE)
    assert len(exchanges) == TIMING.fanout and set(exchanges) <= set(peers)
    assert _of(actions, Do.DISCONNECT) == ["bad"]
    assert _of(actions, Do.SYNC_REVOCATIONS) == []


def test_far_exchanges_thin_out_while_they_find_nobody_new() -> None:
    core = _core(live=_peers(100))
    world = World()
    rounds_with_far = []
    for index in range(40):
        if _of(core.gossip_round(world), Do.EXCHANGE_AFAR):
            rounds_with_far.append(index)
            core.far_exchange_done(found_members=False)
    gaps = [b - a for a, b in itertools.pairwise(rounds_with_far)]
    assert gaps and gaps[-1] == 8 and gaps == sorted(gaps)
    core.far_exchange_done(found_members=True)  # back to one every round
    assert all(_of(core.gossip_round(world), Do.EXCHANGE_AFAR) for _ in range(3))


# -- publish policy --------------------------------------------------------------------------


def test_measurements_alone_wait_for_the_refresh_and_facts_publish_at_once() -> None:
    core = _core()
    core.published({"models": ["a"], "links": {"x": 1}}, now=0.0)
    assert not core.should_publish({"models": ["a"], "links": {"x": 2}}, 1.0, known_states=1)
    assert core.should_publish({"models": ["b"], "links": {"x": 1}}, 1.0, known_states=1)
    assert core.should_publish({"models": ["a"]}, TIMING.refresh_s, known_states=1)
    # A big mesh lets measurements age longer (each new state travels to every node)...
    assert not core.should_publish({"models": ["a"]}, TIMING.refresh_s, known_states=250)
    assert core.should_publish({"models": ["a"]}, 10 * TIMING.refresh_s, known_states=250)
    # ...but never past a quarter of the horizon after which silent members are forgotten.
    horizon = TIMING.forget_gone_after_s / 4
    assert core.should_publish({"models": ["a"]}, horizon, known_states=10**9)
    core.swim.must_refute = True
    assert core.should_publish({"models": ["a"], "links": {"x": 1}}, 1.0, known_states=1)


def test_a_link_measured_for_the_first_time_publishes_at_once_in_a_small_mesh() -> None:
    core = _core()
    core.published({"models": ["a"], "links": {"x": {"rtt_ms": 1.0, "bandwidth_mbps": None}}}, 0.0)
    new_value = {"x": {"rtt_ms": 2.0, "bandwidth_mbps": None}}
    assert not core.should_publish({"models": ["a"], "links": new_value}, 1.0, known_states=3)
    new_figure = {"x": {"rtt_ms": 1.0, "bandwidth_mbps": 900.0}}
    assert core.should_publish({"models": ["a"], "links": new_figure}, 1.0, known_states=3)
    new_link = {"x": {"rtt_ms": 1.0}, "y": {"rtt_ms": 3.0}}
    assert core.should_publish({"models": ["a"], "links": new_link}, 1.0, known_states=3)
    assert not core.should_publish({"models": ["a"], "links": {}}, 1.0, known_states=3)
    # a big mesh: every new state travels to every node, so new links wait for the refresh
    big = TIMING.full_mesh_up_to + 1
    assert not core.should_publish({"models": ["a"], "links": new_link}, 1.0, known_states=big)


def test_a_first_figure_is_looked_at_soon_in_a_small_mesh_and_not_in_a_big_one() -> None:
    # A mesh starting again plans on its links: each member's first figures should not wait
    # for the next heartbeat to be published.
    core = _core(live=_peers(3))
    world = World(connected=_peers(3), admitted=set(_peers(3)), states=4)
    for action in core.handle_timer(0.0, world):  # every timer ran: the next ones are later
        core.finished(action)
    core.measured_first(0.3)
    core.measured_first(0.35)  # measured with it: still one look, gathered
    assert core.next_timer() == 0.3 + FIRST_FIGURES_GATHER_S
    assert _of(core.handle_timer(core.next_timer(), world), Do.HEARTBEAT) == [""]
    big, due = _big_core_past_its_first_timers()
    big.measured_first(0.3)
    assert big.next_timer() == due


@given(
    st.dictionaries(
        st.text(max_size=3),
        st.one_of(
            st.none(),
            st.integers(),
            st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.floats(allow_nan=False))),
        ),
    )
)
def test_measured_figures_takes_any_gossiped_shape(links: dict[str, object]) -> None:
    figures = measured_figures(links)
    assert all(target in links for target, _ in figures)


def test_long_gone_members_are_looked_for_at_most_every_check_interval() -> None:
    core = _core()
    assert core.forget_due(0.0)
    assert not core.forget_due(TIMING.forget_check_s - 1)
    assert core.forget_due(TIMING.forget_check_s)


# -- probes and bandwidth ----------------------------------------------------------------------


def test_probes_go_round_the_neighbours() -> None:
    core = _core(live=["a", "b", "c"])
    for peer in ("a", "b", "c"):
        core.met(peer)
    seen = set()
    now = 0.0
    for _ in range(6):
        for action in core.handle_timer(now, World(connected=["a", "b", "c"])):
            if action.do is Do.PROBE:
                seen.add(action.peer)
                core.finished(action)
        now = core.next_timer()
    assert seen == {"a", "b", "c"}
    core.dropped("c")
    assert "c" not in core.neighbours


def test_bandwidth_is_measured_first_where_it_never_was_then_once_an_interval() -> None:
    core = _core(bandwidth=True)
    world = World(bandwidth=[("a", True), ("b", False)])
    actions = core.handle_timer(0.0, world)
    assert _of(actions, Do.MEASURE_BANDWIDTH) == ["b"]
    assert not _of(core.handle_timer(50.0, world), Do.MEASURE_BANDWIDTH)  # one at a time
    core.finished(Action(Do.MEASURE_BANDWIDTH, "b"))
    core.bandwidth_done(50.0, probed=True, all_measured=False)
    soon = core.next_timer()
    world.bandwidth = [("a", True), ("b", True)]
    assert _of(
        core.handle_timer(50.0 + 1.2 * TIMING.reconnect_interval_s, world), Do.MEASURE_BANDWIDTH
    )
    assert soon <= 50.0 + 1.2 * TIMING.reconnect_interval_s
    core.bandwidth_done(60.0, probed=True, all_measured=True)
    assert not _of(
        core.handle_timer(60.0 + 0.7 * TIMING.bandwidth_probe_interval_s, world),
        Do.MEASURE_BANDWIDTH,
    )


def test_after_a_first_bandwidth_figure_the_next_unmeasured_link_is_probed_soon() -> None:
    core = _core(bandwidth=True)
    world = World(bandwidth=[("a", False), ("b", False)])
    core.handle_timer(0.0, world)
    core.finished(Action(Do.MEASURE_BANDWIDTH, "a"))
    core.bandwidth_done(1.0, probed=True, all_measured=False, first_figure=True)
    world.bandwidth = [("a", True), ("b", False)]
    assert _of(core.handle_timer(1.0 + 1.2 * NEXT_UNMEASURED_S, world), Do.MEASURE_BANDWIDTH)
    core.finished(Action(Do.MEASURE_BANDWIDTH, "b"))
    # a probe that measured nothing (a failing data plane) waits the usual interval
    core.bandwidth_done(2.0, probed=True, all_measured=False, first_figure=False)
    later = 2.0 + 0.7 * TIMING.reconnect_interval_s
    assert not _of(core.handle_timer(later, world), Do.MEASURE_BANDWIDTH)


def test_without_a_data_plane_nothing_is_measured() -> None:
    core = _core(bandwidth=False)
    world = World(bandwidth=[("a", False)])
    assert not _of(core.handle_timer(0.0, world), Do.MEASURE_BANDWIDTH)
    assert math.isfinite(core.next_timer())
