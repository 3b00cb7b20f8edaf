"""The serving reconciler without I/O: from an election's outcome and what runs on a node, the
changes that node makes (engines, rpc-servers, hand-overs, fencing, API tunnels)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.election import ModelState
from sharedllm.node.serving.reconciler import Running, WorkerStart, reconcile
from sharedllm.scheduler.placement import ModelRequest

from .test_election import PROFILE

REQUEST = ModelRequest("m", PROFILE)


def _claim(epoch: int, primary: str, *workers: str, serving: bool = False) -> Claim:
    nodes = (primary, *workers)
    layers = tuple((node, index * 4, index * 4 + 3) for index, node in enumerate(nodes))
    return Claim("m", epoch, primary, layers, serving=serving)


def _state(
    current: Claim | None, previous: Claim | None = None, winding_down: tuple[Claim, ...] = ()
) -> dict[str, ModelState]:
    return {"m": ModelState(REQUEST, current, None, None, previous, winding_down)}


def test_a_new_claim_of_ours_starts_an_engine_that_serves_once_ready() -> None:
    mine = _claim(1, "me", "w")
    first = reconcile(
        "me", {"m"}, _state(mine), claims={"m": mine}, handing_over={}, running=Running()
    )
    assert first.start_primaries == (mine,) and first.serving == (("m", 1, False),)
    key = ("m", mine.rank)
    loading = Running(primaries={key: False})
    again = reconcile(
        "me", {"m"}, _state(mine), claims={"m": mine}, handing_over={}, running=loading
    )
    assert again.start_primaries == () and again.stop_primaries == ()
    ready = reconcile(
        "me",
        {"m"},
        _state(mine),
        claims={"m": mine},
        handing_over={},
        running=Running(primaries={key: True}),
    )
    assert ready.serving == (("m", 1, True),)


def test_a_node_without_the_file_never_starts_an_engine() -> None:
    mine = _claim(1, "me", "w")
    changes = reconcile(
        "me", set(), _state(mine), claims={"m": mine}, handing_over={}, running=Running()
    )
    assert changes.start_primaries == () and changes.serving == ()


def test_a_fenced_claim_stops_its_engine() -> None:
    winner = _claim(2, "other", "me")
    running = Running(primaries={("m", (1, "me")): True})
    changes = reconcile("me", {"m"}, _state(winner), claims={}, handing_over={}, running=running)
    assert changes.stop_primaries == (("m", (1, "me")),)


def test_a_replaced_claim_winds_down_once_its_successor_serves_and_only_once() -> None:
    old = _claim(1, "me", "w", serving=True)
    loading = _claim(2, "other", "w")
    hand = {"m": old}
    running = Running(primaries={("m", old.rank): True})
    waiting = reconcile(
        "me", {"m"}, _state(loading, previous=old), claims={}, handing_over=hand, running=running
    )
    assert waiting.wind_down == () and waiting.stop_primaries == ()
    serving = _claim(2, "other", "w", serving=True)
    states = _state(serving, winding_down=(old,))
    now = reconcile("me", {"m"}, states, claims={}, handing_over=hand, running=running)
    assert now.wind_down == (old,)
    winding = Running(primaries=running.primaries, winding={("m", old.rank)})
    later = reconcile("me", {"m"}, states, claims={}, handing_over=hand, running=winding)
    assert later.wind_down == ()


def test_a_worker_hands_its_rpc_server_to_the_placement_that_replaces_its_own() -> None:
    old, new = _claim(1, "p", "me"), _claim(2, "q", "me")
    running = Running(workers=[("m", old.rank)], worker_streams=[("m", old.rank)])
    changes = reconcile("me", set(), _state(new), claims={}, handing_over={}, running=running)
    assert changes.start_workers == (WorkerStart(("m", new.rank), new, ("m", old.rank)),)
    assert changes.stop_workers == ()
    assert changes.accepting == {("m", new.rank)}
    assert changes.fence == (("m", old.rank),)  # the old primary's tunnels are cut


def test_a_placement_that_only_finishes_keeps_its_rpc_server_but_takes_no_new_tunnels() -> None:
    old, new = _claim(1, "p", "me", serving=True), _claim(2, "q", "me", serving=True)
    states = _state(new, winding_down=(old,))
    running = Running(workers=[("m", old.rank)], worker_streams=[("m", old.rank)])
    changes = reconcile("me", set(), states, claims={}, handing_over={}, running=running)
    assert changes.accepting == {("m", new.rank)}
    assert changes.start_workers == (WorkerStart(("m", new.rank), new, None),)
    assert changes.stop_workers == () and changes.fence == ()


def test_api_tunnels_to_primaries_that_lead_nothing_are_closed() -> None:
    current = _claim(3, "p", "w", serving=True)
    tunnels = [("m", 3, "p"), ("m", 2, "old"), ("gone", 1, "x")]
    changes = reconcile(
        "me",
        set(),
        _state(current),
        claims={},
        handing_over={},
        running=Running(api_tunnels=tunnels),
    )
    assert sorted(changes.close_api_tunnels) == [("gone", 1, "x"), ("m", 2, "old")]


@given(
    epochs=st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True),
    current=st.integers(1, 6),
    workers=st.sets(st.sampled_from(["me", "a", "b"]), max_size=3),
)
def test_after_the_changes_a_worker_runs_exactly_the_placements_it_is_in(
    epochs: list[int], current: int, workers: set[str]
) -> None:
    """Whatever ran before, applying the changes leaves one rpc-server per placement that
    names this node, and none for any other."""
    claim = _claim(current, "p", *sorted(workers - {"p"}))
    running = Running(workers=[("m", (epoch, "p")) for epoch in epochs])
    changes = reconcile("me", set(), _state(claim), claims={}, handing_over={}, running=running)
    after = set(running.workers)
    for start in changes.start_workers:
        if start.replaces is not None:
            after.discard(start.replaces)
        after.add(start.key)
    after -= set(changes.stop_workers)
    assert after == ({("m", claim.rank)} if "me" in claim.workers else set())
