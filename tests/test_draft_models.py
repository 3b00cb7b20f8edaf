"""Draft models: which files may draft for a model, how a holder offers one, how the planner
prices and books it on the primary, and how the mesh learns what its drafts yield."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.election import Elector
from sharedllm.mesh.gossip_reader import GossipReader
from sharedllm.mesh.memory_ledger import claim_memory
from sharedllm.node.models.default_model import DEFAULT_MODEL_FILE
from sharedllm.node.models.draft_model import check_draft, draft_for
from sharedllm.node.models.model_file import ModelFileError, inspect_model
from sharedllm.node.serving.jobs import LocalModel
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.cost_model import CostModel
from sharedllm.scheduler.model_profile import ModelProfile, profile_to_dict
from sharedllm.scheduler.placement import ModelRequest, evaluate, memory_used
from sharedllm.scheduler.speculation import DraftRate, SpeculationPolicy

from .test_election import PROFILE, _node

COST = CostModel()
MIB = 1024**2
DRAFT = replace(PROFILE, name="d", layer_weight_bytes=(4 * MIB,) * 2, embedding_bytes=10 * MIB)
GOOD_DRAFTS = {"draft": DraftRate(0.8, 1.0, 1000)}


def _view(primary_cap_mib: int | None = 800) -> ClusterView:
    holder = NodeCapacity("a", 8 * GIB, gflops=50.0, models=frozenset({"m"}))
    cap = None if primary_cap_mib is None else primary_cap_mib * MIB
    nodes = [replace(holder, memory_cap_bytes=cap), NodeCapacity("b", 8 * GIB, gflops=50.0)]
    return ClusterView.build(nodes, [Link("a", "b", 5.0, 1000.0)])


def _request(policy: str, drafts: tuple[tuple[str, ModelProfile], ...]) -> ModelRequest:
    speculation = SpeculationPolicy.named(policy, GOOD_DRAFTS)
    return ModelRequest("m", PROFILE, 1024, True, speculation=speculation, drafts=drafts)


def test_a_primary_with_a_draft_model_drafts_with_it_and_books_its_memory() -> None:
    counts = [("a", 2), ("b", 6)]
    placed = evaluate(_view(), _request("auto", (("a", DRAFT),)), COST, "a", counts)
    assert placed is not None and placed.speculation == "draft"
    plain = evaluate(_view(), _request("off", (("a", DRAFT),)), COST, "a", counts)
    assert plain is not None and plain.speculation == "off"
    booked = COST.draft_model_memory(DRAFT, 1024)
    assert placed.primary_memory_bytes == plain.primary_memory_bytes + booked
    assert memory_used(placed)["b"] == memory_used(plain)["b"]  # the workers never hold it
    per_draft = placed.ms_per_draft / 1000.0
    assert per_draft > COST.draft_model_seconds(DRAFT, _view().node("a"))  # its pass, and a check
    assert placed.ms_per_token == pytest.approx(0.2 * placed.plain_ms_per_token + per_draft * 1000)


def test_no_draft_mode_without_a_draft_on_the_primary_or_room_for_it() -> None:
    counts = [("a", 2), ("b", 6)]
    elsewhere = evaluate(_view(), _request("draft", (("b", DRAFT),)), COST, "a", counts)
    assert elsewhere is not None and elsewhere.speculation == "off"
    huge = replace(DRAFT, embedding_bytes=400 * MIB)
    cramped = evaluate(_view(), _request("auto", (("a", huge),)), COST, "a", counts)
    assert cramped is not None and cramped.speculation != "draft"
    # with room, a big draft is priced: too slow a pass to choose, unless the holder insists
    roomy = evaluate(_view(None), _request("auto", (("a", huge),)), COST, "a", counts)
    assert roomy is not None and roomy.speculation == "ngram"
    forced = evaluate(_view(None), _request("draft", (("a", huge),)), COST, "a", counts)
    assert forced is not None and forced.speculation == "draft"


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["off", "ngram", "draft", "auto"]),
    st.integers(1, 600),
    st.booleans(),
    st.integers(0, 8),
)
def test_the_primary_never_holds_more_than_its_budget(
    policy: str, draft_mib: int, holds_draft: bool, primary_layers: int
) -> None:
    draft = replace(DRAFT, embedding_bytes=draft_mib * MIB)
    request = _request(policy, (("a", draft),) if holds_draft else ())
    counts = [("a", primary_layers), ("b", 8 - primary_layers)]
    placed = evaluate(_view(), request, COST, "a", counts)
    if placed is None:
        return
    view = _view()
    assert (
        memory_used(placed)["a"] <= COST.memory_budget(view.node("a")) + COST.compute_buffer_bytes
    )
    assert placed.speculation != "draft" or holds_draft


def test_a_standing_draft_claim_books_the_draft_on_its_primary() -> None:
    request = _request("auto", (("a", DRAFT),))
    layers = (("a", 0, 1), ("b", 2, 7))
    drafting = claim_memory(request, COST, Claim("m", 1, "a", layers, speculation="draft"))
    plain = claim_memory(request, COST, Claim("m", 1, "a", layers))
    assert drafting["a"] - plain["a"] == COST.draft_model_memory(DRAFT, 1024)
    assert drafting["b"] == plain["b"]


def _members(draft: object) -> dict[str, dict[str, Any]]:
    a = _node("a", 4096, holds=True, links=("b",))
    a["models"][0]["speculation"] = "auto"
    if draft is not None:
        a["models"][0]["draft"] = draft
    a["memory_cap"] = 1200 * MIB  # room for the model and its draft
    b = _node("b", 4096, links=("a",))
    b["drafts"] = {"m": {"draft": [0.8, 1.0, 1000]}}
    return {"a": a, "b": b}


def test_holders_offer_their_drafts_and_hostile_ones_are_dropped() -> None:
    offered = GossipReader().offered_models(_members({"profile": profile_to_dict(DRAFT)}))
    assert offered["m"].drafts == (("a", DRAFT),)
    for hostile in ({"profile": {"layer_count": -1}}, {"profile": "x"}, "draft", [1], {}):
        assert GossipReader().offered_models(_members(hostile))["m"].drafts == ()


def test_the_election_claims_a_draft_where_learned_drafts_pay() -> None:
    members = _members({"profile": profile_to_dict(DRAFT)})
    elector, now = Elector("a", settle_s=1.0), 0.0
    while now <= 3.0:
        elector.step(now, members)
        now += 0.5
    claim = elector.claims["m"]
    assert claim.speculation == "draft" and claim.primary == "a"
    assert Claim.from_wire(claim.to_wire()).speculation == "draft"


def _model(directory: Path, name: str, shape: ModelShape) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_synthetic_model(directory / name, shape)


def test_a_draft_must_share_the_vocabulary_and_be_smaller(tmp_path: Path) -> None:
    big = inspect_model(_model(tmp_path, "big.gguf", ModelShape(blocks=6, vocab_size=600)))
    small = inspect_model(_model(tmp_path, "small.gguf", ModelShape(blocks=1, vocab_size=600)))
    other = inspect_model(_model(tmp_path, "other.gguf", ModelShape(blocks=1, vocab_size=700)))
    assert big.vocabulary == small.vocabulary != other.vocabulary != ""
    assert check_draft(big, small) is None
    assert (
        check_draft(big, other)
        == "its vocabulary (tokens and special tokens) differs from the model's"
    )
    assert check_draft(small, big) == "it is not smaller than the model"
    assert draft_for(big, small.path, tmp_path) == small
    with pytest.raises(ModelFileError, match=r"cannot draft for .*vocabulary"):
        draft_for(big, other.path, tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelFileError, match=r"junk\.gguf"):
        draft_for(big, tmp_path / "junk.gguf", tmp_path)


def test_the_default_model_drafts_on_its_own_only_where_it_fits(tmp_path: Path) -> None:
    big = inspect_model(_model(tmp_path, "big.gguf", ModelShape(blocks=12, vocab_size=600)))
    cache = tmp_path / "cache"
    assert draft_for(big, None, cache) is None  # not in the cache: nothing is fetched for it
    default = _model(cache / "models", DEFAULT_MODEL_FILE, ModelShape(blocks=1, vocab_size=600))
    assert draft_for(big, None, cache) == inspect_model(default)
    near = inspect_model(_model(tmp_path, "near.gguf", ModelShape(blocks=2, vocab_size=600)))
    assert draft_for(near, None, cache) is None  # not much bigger: the draft would not pay
    assert draft_for(inspect_model(default), None, cache) is None  # the model itself


def test_a_holder_gossips_its_draft_where_its_setting_allows_drafts(tmp_path: Path) -> None:
    big = inspect_model(_model(tmp_path, "big.gguf", ModelShape(blocks=6, vocab_size=600)))
    small = inspect_model(_model(tmp_path, "small.gguf", ModelShape(blocks=1, vocab_size=600)))
    model = LocalModel("big", big, 0, draft=small)

    def entry(speculation: str, kind: str = "text") -> dict[str, Any]:
        return replace(model, kind=kind).gossip_entry(
            1024, 1, (1, 1), None, speculation=speculation
        )

    assert entry("auto")["draft"] == {"profile": profile_to_dict(small.profile)}
    assert entry("draft")["draft"] == entry("auto")["draft"]
    assert "draft" not in entry("ngram") and "draft" not in entry("off")
    assert "draft" not in entry("auto", kind="embedding")
