"""The planner's view from gossip: built again when capacities change, when a link is first
measured or gone (at once), and when link measurements alone change (within a few seconds)."""

from __future__ import annotations

from typing import Any

from sharedllm.mesh.gossip_reader import LINK_REFRESH_S, GossipReader

from .test_election import _node


def _members(links: dict[str, float]) -> dict[str, dict[str, Any]]:
    members = {peer: _node(peer, 4096) for peer in ("a", "b", "c")}
    members["a"]["links"] = {
        target: {"rtt_ms": rtt, "bandwidth_mbps": 1000.0} for target, rtt in links.items()
    }
    return members


def test_a_link_measured_for_the_first_time_is_in_the_view_at_once() -> None:
    reader = GossipReader()
    first = reader.cluster_view(_members({"b": 1.0}), now=0.0)
    assert first.link("a", "c") is None
    later = reader.cluster_view(_members({"b": 1.0, "c": 1.0}), now=0.5)
    link = later.link("a", "c")
    assert link is not None and link.rtt_ms == 1.0


def test_a_new_measurement_of_a_known_link_waits_for_the_refresh() -> None:
    reader = GossipReader()
    first = reader.cluster_view(_members({"b": 1.0}), now=0.0)
    assert reader.cluster_view(_members({"b": 3.0}), now=1.0) is first
    refreshed = reader.cluster_view(_members({"b": 3.0}), now=LINK_REFRESH_S + 0.1)
    link = refreshed.link("a", "b")
    assert link is not None and link.rtt_ms == 3.0
    gone = reader.cluster_view(_members({}), now=LINK_REFRESH_S + 0.2)
    assert gone.link("a", "b") is None  # a link gone is taken in at once too
