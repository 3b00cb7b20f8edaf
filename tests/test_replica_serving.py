"""Two real nodes each holding Gemma, asked for two replicas: each leads one, requests through
either node are spread over both and a conversation returns to its replica, and when one
node is killed the requests it would have taken are answered by the other."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.engine.locate import EngineInfo
from sharedllm.node.serving.replica_choice import ReplicaLoad, affinity_of, choose_replica

from .node_process import RunningNode, invite_token, start_node, status_json, wait_until_ready

pytestmark = pytest.mark.integration
GEMMA_ID = "gemma-3-270m-q4_k_m"
ARGS = (
    "--min-replicas",
    "2",
    "--max-replicas",
    "2",
    "--threads",
    "1",
    "--parallel-slots",
    "2",
    "--context-size",
    "1024",
)


def _status(node: RunningNode) -> dict[str, Any]:
    return status_json(node.log_path.parent / "data")


def _replicas(node: RunningNode) -> list[dict[str, Any]]:
    replicas: list[dict[str, Any]] = _status(node)["models"][GEMMA_ID]["replicas"]
    return replicas


def _both_ready(node: RunningNode, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = _replicas(node)
        if len(replicas) == 2 and all(r["state"] == "ready" for r in replicas):
            return replicas
        time.sleep(0.5)
    raise AssertionError(f"two ready replicas: {replicas}")


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, gemma_path: Path
) -> Iterator[list[RunningNode]]:
    base = tmp_path_factory.mktemp("replicas")
    nodes: list[RunningNode] = []
    try:
        nodes.append(start_node(base / "a", "--name", "a", *ARGS))
        token = invite_token(base / "a" / "data")
        nodes.append(
            start_node(
                base / "b",
                "--name",
                "b",
                "--join",
                token,
                "--model",
                str(gemma_path),
                *ARGS,
                wait_ready=False,
            )
        )
        wait_until_ready(nodes[1], 180)
        _both_ready(nodes[0])
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _user_for(replicas: list[dict[str, Any]], index: int) -> str:
    """A user name whose conversations the routing rule sends to replica `index` when idle."""
    loads = [ReplicaLoad((GEMMA_ID, r["epoch"], r["primary"]), 2, 0, 0.0) for r in replicas]
    for attempt in range(1000):
        user = f"user-{attempt}"
        affinity = affinity_of({"user": user})
        if choose_replica(loads, affinity, frozenset()).key[2] == replicas[index]["primary"]:
            return user
    raise AssertionError("no user maps to that replica")


def _ask(node: RunningNode, user: str) -> int:
    body = {"model": GEMMA_ID, "prompt": "Hello", "max_tokens": 4, "user": user}
    return httpx.post(node.api_url + "/v1/completions", json=body, timeout=120).status_code


def _routed(node: RunningNode) -> dict[str, int]:
    return {r["primary"]: r["routed"] for r in _replicas(node)}


def test_each_node_leads_one_replica(pair: list[RunningNode]) -> None:
    replicas = _both_ready(pair[0])
    primaries = {r["primary"] for r in replicas}
    assert primaries == {_status(node)["peer_id"] for node in pair}
    assert not set(replicas[0]["nodes"]) & set(replicas[1]["nodes"])
    assert (
        _both_ready(pair[1]) == replicas or {r["primary"] for r in _replicas(pair[1])} == primaries
    )


def test_conversations_spread_over_replicas_and_return_to_theirs(pair: list[RunningNode]) -> None:
    replicas = _both_ready(pair[0])
    before = _routed(pair[0])
    for index in (0, 1):
        user = _user_for(replicas, index)
        assert all(_ask(pair[0], user) == 200 for _ in range(3))
    after = _routed(pair[0])
    assert {primary: after[primary] - before[primary] for primary in after} == {
        r["primary"]: 3 for r in replicas
    }


def test_a_killed_replica_node_s_requests_are_answered_by_the_other(
    pair: list[RunningNode],
) -> None:
    replicas = _both_ready(pair[0])
    b_id = _status(pair[1])["peer_id"]
    user = _user_for(replicas, next(i for i, r in enumerate(replicas) if r["primary"] == b_id))
    pair[1].process.send_signal(signal.SIGKILL)  # its engines die with it (PDEATHSIG)
    pair[1].process.wait()
    assert _ask(pair[0], user) == 200  # before or after the mesh notices, it is answered
    assert _ask(pair[0], user) == 200
