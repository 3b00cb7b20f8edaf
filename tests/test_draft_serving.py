"""Draft-model speculation on real nodes: a holder leads a split of its model, its engine drafts
with the small model on the primary's CPU (never on the workers), the answer is the model's own
greedy answer, and the mesh learns what the drafts yielded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.engine.locate import EngineInfo
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model

from .node_process import RunningNode, invite_token, start_node, wait_until_ready

pytestmark = pytest.mark.integration
VOCABULARY = 600
PROMPT = "one two three four five six seven"


def _entry(node: RunningNode) -> dict[str, Any]:
    entry: dict[str, Any] = httpx.get(node.api_url + "/mesh/peers", timeout=10).json()["models"][
        "big"
    ]
    return entry


def _answer(node: RunningNode) -> str:
    body = {"model": "big", "prompt": PROMPT, "max_tokens": 80, "temperature": 0}
    answer = httpx.post(node.api_url + "/v1/completions", json=body, timeout=120)
    answer.raise_for_status()
    text: str = answer.json()["choices"][0]["text"]
    return text


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("draft-models")
    big = ModelShape(blocks=8, embedding=256, feed_forward=512, vocab_size=VOCABULARY)
    small = ModelShape(blocks=1, embedding=256, feed_forward=512, vocab_size=VOCABULARY)
    return (
        write_synthetic_model(directory / "big.gguf", big, seed=1),
        write_synthetic_model(directory / "small.gguf", small, seed=1),
    )


def _start_split(base: Path, models: tuple[Path, Path], *extra: str) -> list[RunningNode]:
    """Holder `a` (slow by its announced speed) and a fast worker `b`: the planner gives `b`
    the layers and leaves the head, and any draft model, on `a`."""
    big, small = models
    nodes = [
        start_node(
            base / "a",
            *("--name", "a", "--model", str(big), "--model-name", "big"),
            *("--draft-model", str(small), "--threads", "1", *extra),
            env={"SHAREDLLM_COMPUTE_GFLOPS": "5"},
            wait_ready=False,
        )
    ]
    try:
        wait_until_ready(nodes[0], 180, serving=False)
        token = invite_token(base / "a" / "data")
        nodes.append(
            start_node(
                base / "b",
                *("--name", "b", "--join", token, "--threads", "1"),
                env={"SHAREDLLM_COMPUTE_GFLOPS": "500"},
                wait_ready=False,
            )
        )
        _wait_split(nodes[0])
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _wait_split(node: RunningNode, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            entry = _entry(node)
        except (httpx.HTTPError, KeyError):
            entry = {}
        workers = [a["node"] for a in entry.get("assignments", []) if a["node"] != entry["primary"]]
        if entry.get("state") == "ready" and entry.get("serving") and workers:
            return
        time.sleep(0.5)
    raise AssertionError(f"no ready split: {entry}\n{node.log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def plain_answer(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, models: tuple[Path, Path]
) -> str:
    """The split's greedy answer without speculation."""
    nodes = _start_split(tmp_path_factory.mktemp("plain"), models, "--speculation", "off")
    try:
        assert _entry(nodes[0])["speculation"]["mode"] == "off"
        return _answer(nodes[0])
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def drafting(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, models: tuple[Path, Path]
) -> Iterator[list[RunningNode]]:
    nodes = _start_split(tmp_path_factory.mktemp("drafting"), models, "--speculation", "draft")
    yield nodes
    for node in nodes:
        node.stop()


def test_the_primary_drafts_with_its_draft_model_on_its_own_cpu(
    drafting: list[RunningNode], models: tuple[Path, Path]
) -> None:
    entry = _entry(drafting[0])
    assert entry["speculation"]["mode"] == entry["planned"]["speculation"] == "draft"
    assert entry["speculation"]["draft_model_holders"] == [entry["primary"]]
    log = drafting[0].log_path.read_text()
    assert f"--spec-type draft-simple --model-draft {models[1]} --spec-draft-device none" in log


def test_drafting_keeps_the_model_s_own_answer_and_its_yield_is_learned(
    drafting: list[RunningNode], plain_answer: str
) -> None:
    assert _answer(drafting[0]) == plain_answer  # speculation never changes a greedy answer
    deadline = time.monotonic() + 90
    while not (learned := _entry(drafting[0])["speculation"])["learned_tokens"]:
        assert time.monotonic() < deadline, drafting[0].log_path.read_text()[-3000:]
        _answer(drafting[0])
        time.sleep(2)
    assert learned["mode"] == "draft" and learned["drafted_per_token"] > 0
    assert 0 <= learned["accepted_per_token"] <= learned["drafted_per_token"]
