"""The indexes that keep a big mesh's per-node work small: the piggyback send queue, the member
states indexed by what the election looks up, and SWIM's members by status. Each must agree
with the plain computation it replaces."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.gossip_reader import current_claims, offered_models
from sharedllm.mesh.member_states import MemberStates
from sharedllm.mesh.send_queue import SendQueue
from sharedllm.mesh.swim import Liveness, Rumor, Swim

_keys = st.sampled_from([f"k{i}" for i in range(6)])


@given(st.lists(st.tuples(_keys, st.integers(0, 5)), max_size=12), st.integers(1, 4))
def test_every_queued_item_goes_out_as_many_times_as_asked(
    puts: list[tuple[str, int]], per_message: int
) -> None:
    queue: SendQueue[str] = SendQueue()
    wanted: dict[str, int] = {}
    for key, sends in puts:
        queue.put(key, key, sends)
        wanted[key] = sends  # a new put replaces the old one
    sent: dict[str, int] = {}
    previous_left = None
    while len(queue):
        left_now = max(left for _, left in queue._items.values())
        taken = queue.take(per_message)
        assert 0 < len(taken) <= per_message
        assert len(set(taken)) == len(taken)  # never twice in one message
        assert previous_left is None or left_now <= previous_left  # the newest news first
        previous_left = left_now
        for key in taken:
            sent[key] = sent.get(key, 0) + 1
    assert sent == {k: n for k, n in wanted.items() if n > 0}


@given(st.lists(st.tuples(_keys, st.integers(1, 5)), max_size=30))
def test_a_full_queue_drops_the_oldest_news(puts: list[tuple[str, int]]) -> None:
    queue: SendQueue[str] = SendQueue(capacity=3)
    for key, sends in puts:
        queue.put(key, key, sends)
        assert len(queue) <= 3
        assert key in queue.take(3)  # the newest put always survives (it has sends left)
        queue.put(key, key, sends)


def _content(index: int, flags: int) -> dict[str, Any]:
    content: dict[str, Any] = {"name": f"n{index}"}
    if flags & 1:
        content["claims"] = [{"model": "m", "epoch": index}]
    if flags & 2:
        content["models"] = [{"id": "m"}]
    if flags & 4:
        content["problems"] = {"m": "short of memory"}
    return content


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.booleans()), max_size=30))
def test_member_states_index_matches_a_scan(ops: list[tuple[int, int, bool]]) -> None:
    states = MemberStates()
    plain: dict[str, dict[str, Any]] = {}
    for index, flags, drop in ops:
        origin = f"p{index}"
        if drop:
            states.drop(origin)
            plain.pop(origin, None)
        else:
            states.put(origin, _content(index, flags))
            plain[origin] = _content(index, flags)
    assert dict(states) == plain
    for key in ("claims", "models", "problems"):
        scanned = sorted(o for o, c in plain.items() if c.get(key))
        assert [o for o, _ in states.having(key)] == scanned
    assert current_claims(states) == current_claims(plain)
    assert offered_models(states) == offered_models(plain)


_statuses = st.sampled_from(list(Liveness))


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 5), _statuses, st.integers(0, 4), st.booleans()), max_size=40)
)
def test_swim_status_index_and_flips_match_the_members(
    events: list[tuple[int, Liveness, int, bool]],
) -> None:
    swim = Swim("me", random.Random(1))
    live_before: set[str] = set()
    flipped: set[str] = set()
    for index, status, incarnation, probe in events:
        peer = f"p{index}"
        if probe:
            swim.probe_answered(peer, now=1.0)
        else:
            swim.hear(Rumor(peer, status, incarnation), now=1.0)
        flipped.update(swim.take_flipped())
        live_now = {
            p for p, m in swim.members.items() if m.status in (Liveness.ALIVE, Liveness.SUSPECT)
        }
        assert set(swim.live_members()) == live_now
        for each in Liveness:
            assert set(swim.with_status(each)) == {
                p for p, m in swim.members.items() if m.status is each
            }
        assert live_now ^ live_before <= flipped  # every change of liveness was reported
        live_before = live_now
