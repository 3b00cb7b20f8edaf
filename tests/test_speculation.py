"""Speculation chosen by the planner: the cost of drafts, the mode a placement runs, how a
standing placement keeps its mode, and what the mesh learns and gossips of drafts' yield."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim, claim_for
from sharedllm.mesh.election import Elector
from sharedllm.mesh.gossip_drafts import MAX_RATE_ENTRIES, draft_rate_entries
from sharedllm.mesh.gossip_reader import GossipReader
from sharedllm.node.serving.draft_meter import (
    MAX_METERED_ENGINES,
    MAX_METRICS_BYTES,
    DraftMeter,
    EngineCounters,
    parse_engine_counters,
)
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.cost_model import CostModel
from sharedllm.scheduler.placement import ModelRequest, evaluate
from sharedllm.scheduler.planner import SPECULATION_MARGIN, plan_model
from sharedllm.scheduler.speculation import (
    POLICY_MODES,
    PRIOR_RATES,
    DraftRate,
    SpeculationPolicy,
    choose_mode,
    seconds_per_token,
)

from .test_election import PROFILE, _node

COST = CostModel()
MIB = 1024**2
RATES = st.builds(
    DraftRate,
    st.floats(0.0, 1.0),
    st.floats(0.0, 8.0),
    st.integers(0, 10**6),
)


def _view(rtt_ms: float) -> ClusterView:
    """Two nodes; the holder's memory cap leaves most layers to the other."""
    holder = NodeCapacity("a", 8 * GIB, gflops=50.0, models=frozenset({"m"}))
    nodes = [replace(holder, memory_cap_bytes=500 * MIB), NodeCapacity("b", 8 * GIB, gflops=50.0)]
    return ClusterView.build(nodes, [Link("a", "b", rtt_ms, 1000.0)])


def _request(policy: str, rate: DraftRate | None = None) -> ModelRequest:
    learned = None if rate is None else {"ngram": rate}
    policy_of = SpeculationPolicy.named(policy, learned)
    return ModelRequest("m", PROFILE, 1024, True, speculation=policy_of)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1e-4, 1.0),
    st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    st.tuples(RATES, RATES),
    st.sampled_from(sorted(POLICY_MODES)),
    st.booleans(),
)
def test_the_chosen_mode_is_allowed_priced_and_the_fastest(
    plain_s: float,
    per_draft_s: tuple[float, float],
    rates: tuple[DraftRate, DraftRate],
    policy: str,
    has_draft_model: bool,
) -> None:
    (ngram_s, draft_s), (ngram_rate, draft_rate) = per_draft_s, rates
    allowed = SpeculationPolicy.named(policy, {"ngram": ngram_rate, "draft": draft_rate})
    priced = {"ngram": ngram_s} | ({"draft": draft_s} if has_draft_model else {})
    mode = choose_mode(plain_s, priced, allowed)
    assert mode == "off" or (mode in POLICY_MODES[policy] and mode in priced)
    chosen = seconds_per_token(plain_s, priced.get(mode, 0.0), mode, allowed.rate(mode))
    for other in allowed.modes:
        if other == "off" or other in priced:
            cost = seconds_per_token(plain_s, priced.get(other, 0.0), other, allowed.rate(other))
            assert chosen <= cost


def test_drafts_that_yield_nothing_leave_speculation_off() -> None:
    nothing = SpeculationPolicy.named("auto", {"ngram": DraftRate(0, 0, 100)})
    assert choose_mode(0.02, {"ngram": 0.005}, nothing) == "off"
    everything = SpeculationPolicy.named("off", {"ngram": DraftRate(1, 1, 100)})
    assert choose_mode(0.02, {"ngram": 0.005}, everything) == "off"
    draft_only = SpeculationPolicy.named("draft", {"draft": DraftRate(1, 1, 100)})
    assert choose_mode(0.02, {"ngram": 0.005}, draft_only) == "off"  # no draft model here


def test_a_copy_speculates_on_a_split_and_free_text_on_a_cpu_does_not() -> None:
    view, counts = _view(rtt_ms=5.0), [("a", 2), ("b", 6)]
    copy = evaluate(view, _request("auto", DraftRate(0.95, 0.97, 1000)), COST, "a", counts)
    assert copy is not None and copy.speculation == "ngram"
    plain, per_draft = copy.plain_ms_per_token, copy.ms_per_draft
    assert copy.ms_per_token == pytest.approx(0.05 * plain + 0.97 * per_draft)
    assert copy.as_dict()["speculation"] == "ngram"
    # few drafts accepted, many checked: each costs a share of the compute on a CPU
    chat = evaluate(view, _request("auto", DraftRate(0.05, 1.5, 1000)), COST, "a", counts)
    assert chat is not None and chat.speculation == "off"
    assert chat.ms_per_token == pytest.approx(chat.plain_ms_per_token)


def test_a_holder_that_forces_a_mode_gets_it() -> None:
    view, counts = _view(rtt_ms=5.0), [("a", 2), ("b", 6)]
    forced = evaluate(view, _request("ngram", DraftRate(0.0, 2.0, 1000)), COST, "a", counts)
    assert forced is not None and forced.speculation == "ngram"
    assert forced.ms_per_token > forced.plain_ms_per_token


def test_a_standing_mode_is_kept_unless_the_other_wins_by_the_margin() -> None:
    view = _view(rtt_ms=5.0)
    with_drafts = plan_model(view, _request("auto", DraftRate(0.9, 0.95, 1000)), COST)
    assert with_drafts.speculation == "ngram"
    # the yield drops until off is better, but not by the margin: the engine keeps running
    nearly = _rate_where_off_wins_by(view, SPECULATION_MARGIN / 2)
    assert plan_model(view, _request("auto", nearly), COST, with_drafts).speculation == "ngram"
    clearly = _rate_where_off_wins_by(view, SPECULATION_MARGIN * 2)
    assert plan_model(view, _request("auto", clearly), COST, with_drafts).speculation == "off"
    # a holder that no longer allows the standing mode gets a new plan at once
    assert plan_model(view, _request("off", nearly), COST, with_drafts).speculation == "off"


def _rate_where_off_wins_by(view: ClusterView, fraction: float) -> DraftRate:
    """A draft rate (no draft accepted) under which speculating is `fraction` slower."""
    placement = plan_model(view, _request("off"), COST)
    drafted = fraction / (1 - fraction) * placement.plain_ms_per_token / placement.ms_per_draft
    return DraftRate(0.0, drafted, 1000)


def test_the_prior_tries_speculation_on_a_split() -> None:
    placement = plan_model(_view(rtt_ms=2.0), _request("auto"), COST)
    assert placement.speculation == "ngram" and placement.workers == ("b",)
    assert PRIOR_RATES["ngram"].tokens == PRIOR_RATES["draft"].tokens == 0


@pytest.mark.parametrize(
    ("accepted", "drafted", "tokens"),
    [(2, 1, 10), (11, 20, 10), (1, 10**9, 10), (-1, 1, 10), (1, 1, 0), (float("nan"), 1, 1)],
)
def test_impossible_counts_are_no_rate(accepted: float, drafted: float, tokens: int) -> None:
    assert DraftRate.of(accepted, drafted, tokens) is None


def test_a_claim_carries_its_mode_on_the_wire() -> None:
    placement = plan_model(_view(rtt_ms=2.0), _request("auto"), COST)
    claim = claim_for(placement, 3)
    assert claim.speculation == "ngram" and claim.same_split(placement)
    assert Claim.from_wire(claim.to_wire()) == claim
    off = Claim("m", 1, "a", (("a", 0, 7),))
    assert "speculation" not in off.to_wire()  # as before speculation was planned
    for hostile in ("eagle", 1, ["ngram"], None):
        with pytest.raises(ValueError, match="speculation"):
            Claim.from_wire({**claim.to_wire(), "speculation": hostile})


def test_gossiped_rates_are_checked_bounded_and_weighted_by_tokens() -> None:
    assert draft_rate_entries({"m": [0.5, 0.8, 100], "n": [0.9, 0.1, 100]}) == (
        ("m", "ngram", DraftRate(0.5, 0.8, 100)),
    )  # more accepted than drafted is no engine's; a bare list is an n-gram rate
    for hostile in ([1, 2], "x", [0.1, 0.2, -5], [0.1, 0.2, True], [float("inf"), 1, 1], None):
        assert draft_rate_entries({"m": hostile}) == ()
        assert draft_rate_entries({"m": {"draft": hostile}}) == ()
    assert draft_rate_entries({"a\x1fb": [0.1, 0.2, 10]}) == ()
    assert draft_rate_entries({"m": {"eagle": [0.1, 0.2, 10], "off": [0.1, 0.2, 10]}}) == ()
    assert draft_rate_entries({"m": {"draft": [0.6, 1.2, 10], "ngram": [0.1, 0.2, 10]}}) == (
        ("m", "ngram", DraftRate(0.1, 0.2, 10)),
        ("m", "draft", DraftRate(0.6, 1.2, 10)),
    )
    many = {f"m{i}": [0.1, 0.2, 10] for i in range(3 * MAX_RATE_ENTRIES)}
    assert len(draft_rate_entries(many)) == MAX_RATE_ENTRIES
    members = {
        "a": {"drafts": {"m": [1.0, 1.0, 300]}},
        "b": {"drafts": {"m": [0.0, 1.0, 100]}},
        "c": {"drafts": {"m": [0.5, 1.0, 10**30]}},  # a boast is capped, not believed whole
    }
    merged = GossipReader().draft_rates(members)["m"]["ngram"]
    assert 0.5 <= merged.accepted_per_token < 0.51 and merged.drafted_per_token == 1.0


def _members(policy: str, drafts: dict[str, list[Any]] | None) -> dict[str, dict[str, Any]]:
    a = _node("a", 4096, holds=True, links=("b",))
    a["models"][0]["speculation"] = policy
    a["memory_cap"] = 500 * MIB  # the model needs both nodes
    members = {"a": a, "b": _node("b", 4096, links=("a",))}
    if drafts is not None:
        members["b"]["drafts"] = drafts
    return members


def _claim_after(members: dict[str, dict[str, Any]], until: float) -> Claim:
    elector, now = Elector("a", settle_s=1.0), 0.0
    while now <= until:
        elector.step(now, members)
        now += 0.5
    return elector.claims["m"]


def test_the_election_claims_the_mode_learned_drafts_call_for() -> None:
    assert _claim_after(_members("auto", None), 3.0).speculation == "ngram"  # the prior
    assert _claim_after(_members("auto", {"m": [0.0, 3.0, 1000]}), 3.0).speculation == "off"
    assert _claim_after(_members("off", {"m": [0.9, 0.9, 1000]}), 3.0).speculation == "off"
    assert _claim_after(_members("nonsense", None), 3.0).speculation == "off"
    assert _claim_after(_members("auto", None), 3.0).workers == ("b",)


METRICS = """# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total {tokens}
llamacpp:n_decode_total 40
llamacpp:spec_decode_num_draft_tokens_total {drafted}
llamacpp:spec_decode_num_accepted_tokens_total {accepted}
"""


def _counters(tokens: float, drafted: float, accepted: float) -> EngineCounters:
    text = METRICS.format(tokens=tokens, drafted=drafted, accepted=accepted)
    counters = parse_engine_counters(text)
    assert counters is not None
    return counters


def test_engine_counters_are_read_from_the_metrics_text() -> None:
    assert _counters(100, 60, 40) == EngineCounters(100.0, 60.0, 40.0)
    for hostile in ("", "llamacpp:tokens_predicted_total x", METRICS.replace("40\n", "nan\n")):
        assert parse_engine_counters(hostile) is None
    assert parse_engine_counters(METRICS.format(tokens=-1, drafted=1, accepted=1)) is None
    huge = METRICS.format(tokens=1, drafted=1, accepted=1) + "#" * MAX_METRICS_BYTES
    assert parse_engine_counters(huge) is None


def test_the_meter_learns_from_a_speculating_engine_only() -> None:
    meter = DraftMeter()
    meter.observe(("m", 1), _counters(1000, 900, 800), "ngram", 0.0)  # a baseline, no rate yet
    assert meter.rates(0.0) == {}
    meter.observe(("m", 1), _counters(1100, 1000, 890), "ngram", 10.0)
    assert meter.rates(10.0)["m"] == {"ngram": DraftRate(0.9, 1.0, 100)}
    meter.observe(("m", 2), _counters(0, 0, 0), "off", 11.0)
    meter.observe(("m", 2), _counters(500, 0, 0), "off", 21.0)  # off: teaches nothing
    assert meter.rates(21.0)["m"] == {"ngram": DraftRate(0.9, 1.0, 100)}
    meter.observe(("m", 3), _counters(0, 0, 0), "draft", 22.0)  # a draft model: its own rate
    meter.observe(("m", 3), _counters(200, 300, 120), "draft", 23.0)
    assert meter.rates(23.0)["m"]["draft"] == DraftRate(0.6, 1.5, 200)
    assert meter.gossip(23.0) == {"m": {"draft": [0.6, 1.5, 200], "ngram": [0.9, 1.0, 100]}}
    assert draft_rate_entries(meter.gossip(23.0)) == (
        ("m", "ngram", DraftRate(0.9, 1.0, 100)),
        ("m", "draft", DraftRate(0.6, 1.5, 200)),
    )  # what one node gossips, the others read
    assert meter.rates(23.0 + meter.forget_after_s + 1) == {}  # quiet too long: forgotten


def test_a_restarted_engine_counts_from_zero_and_the_window_is_bounded() -> None:
    meter = DraftMeter(window_tokens=1000)
    meter.observe(("m", 1), _counters(5000, 100, 100), "ngram", 0.0)
    meter.observe(("m", 1), _counters(100, 100, 10), "ngram", 1.0)  # went down: a new engine
    assert meter.rates(1.0) == {"m": {"ngram": DraftRate(0.1, 1.0, 100)}}
    tokens = 100
    for step in range(2, 40):
        tokens += 100
        meter.observe(("m", 1), _counters(tokens, 100, 10), "ngram", float(step))
    rate = meter.rates(40.0)["m"]["ngram"]
    assert rate.tokens == 1000 and rate.accepted_per_token < 0.01  # the recent workload


def test_the_meter_holds_a_bounded_number_of_engines() -> None:
    meter = DraftMeter()
    for i in range(3 * MAX_METERED_ENGINES):
        meter.observe((f"m{i}", 1), _counters(0, 0, 0), "ngram", 0.0)
        meter.observe((f"m{i}", 1), _counters(100, 100, 50), "ngram", 1.0)
    assert len(meter.rates(1.0)) == MAX_METERED_ENGINES
    meter.forget(("m0", 1))
    meter.observe(("new", 1), _counters(0, 0, 0), "ngram", 2.0)  # room again for a baseline


def test_a_holder_may_ask_for_the_memory_split_and_nonsense_means_the_planner() -> None:
    def parsed(split: object) -> str:
        entry = _members("auto", None)["a"]["models"][0]
        request = GossipReader().request_of("m", {**entry, "split": split})
        assert request is not None
        return request.split

    assert parsed("memory") == "memory"
    for hostile in ("planner", "even", ["memory"], None, 7):
        assert parsed(hostile) == "planner"
