"""The status warning for placements across relayed links and the choice of relay members,
from gossiped states alone."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.network_paths import relay_members, warn_relayed_links


def _model(primary: str, *workers: str) -> dict[str, Any]:
    nodes = [primary, *workers]
    return {"primary": primary, "assignments": [{"node": n} for n in nodes]}


def test_a_split_whose_worker_the_primary_reaches_through_a_relay_is_flagged() -> None:
    models = {"m": _model("p", "w1", "w2"), "solo": _model("q")}
    states = {"p": {"relayed": ["w2", "elsewhere"]}, "q": {"relayed": ["w1"]}}
    flagged = warn_relayed_links(models, states)
    assert flagged["m"]["relayed_links"] == [["p", "w2"]]
    assert flagged["solo"]["relayed_links"] == []


def test_hostile_or_missing_gossip_flags_nothing() -> None:
    models = {"m": _model("p", "w"), "unplaced": {"primary": None, "assignments": []}}
    for relayed in (None, "w", 7, {"w": 1}):
        flagged = warn_relayed_links(models, {"p": {"relayed": relayed}})
        assert "relayed_links" not in flagged["m"]
    assert "relayed_links" not in warn_relayed_links(models, {})["unplaced"]


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.sampled_from([True, False, 1, "yes"])))
def test_relay_members_are_those_that_say_so_exactly_in_one_order(flags: dict[str, Any]) -> None:
    states = {peer: {"relay": flag} for peer, flag in flags.items()}
    chosen = relay_members(states, me="")
    assert chosen == sorted(p for p, flag in flags.items() if flag is True)
    me = next(iter(flags), "")
    assert me not in relay_members(states, me=me)
