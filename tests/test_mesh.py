"""A real mesh of `sharedllm-node` processes on 127.0.0.1: invites, convergence, refusals,
revocation and failure detection, all through the authenticated libp2p transport."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .node_process import RunningNode, node_command, start_node

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _view(node: RunningNode) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(node.api_url + "/mesh/peers", timeout=5).json()
    return answer


def _states(node: RunningNode) -> dict[str, str]:
    return {p["peer_id"]: p["state"] for p in _view(node)["peers"]}


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _join_once(data_dir: Path, model: Path, token: str) -> subprocess.CompletedProcess[str]:
    """`up --join TOKEN` that is expected to stop at once with an error."""
    listen = "/ip4/127.0.0.1/tcp/0"
    return _cli(
        "up",
        "--data-dir",
        str(data_dir),
        "--model",
        str(model),
        "--join",
        token,
        "--listen",
        listen,
        "--api-port",
        "0",
    )


def _invite(data_dir: Path, *args: str) -> str:
    done = _cli("invite", "--data-dir", str(data_dir), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("mesh")
    nodes: list[RunningNode] = []
    try:
        founder = start_node(base / "one", "--model", str(tiny_model), "--name", "one")
        nodes.append(founder)
        token = _invite(base / "one" / "data", "--uses", "2")
        for name in ("two", "three"):
            nodes.append(
                start_node(base / name, "--model", str(tiny_model), "--name", name, "--join", token)
            )
        yield {"base": base, "nodes": nodes, "token": token, "model": tiny_model}
    finally:
        for node in nodes:
            node.stop()


def test_three_nodes_converge_with_rtts(mesh: dict[str, Any]) -> None:
    nodes: list[RunningNode] = mesh["nodes"]
    ids = {_view(n)["peer_id"] for n in nodes}
    assert len(ids) == 3

    def converged() -> bool:
        views = [_view(n) for n in nodes]
        return all(
            {p["peer_id"] for p in v["peers"] if p["state"] in ("alive", "self")} == ids
            and all(p["rtt_ms"] is not None for p in v["peers"] if p["state"] == "alive")
            for v in views
        )

    seconds = _wait(converged, 60, "three nodes to see each other alive with RTTs")
    print(f"three nodes converged {seconds:.1f} s after the last start")
    measured = _wait(
        lambda: any(p.get("bandwidth_mbps") for p in _view(nodes[0])["peers"]),
        30,
        "a bandwidth probe over the data plane",
    )
    probed = [p for p in _view(nodes[0])["peers"] if p.get("bandwidth_mbps")]
    rate, data_rtt = probed[0]["bandwidth_mbps"], probed[0]["data_rtt_ms"]
    print(f"first bandwidth measurement after {measured:.1f} s: {rate:.0f} Mbit/s, {data_rtt} ms")
    assert 0 < data_rtt < 1000  # and the data plane's round trip, timed after the bulk
    peer = next(p for p in _view(nodes[0])["peers"] if p["name"] == "three")
    assert peer["rpc_protocol"] == "7.0.0"
    assert peer["models"] and peer["ram_total"] > 0 and peer["gflops"] > 0
    control = _view(nodes[0])["control_traffic"]
    assert control["messages_sent"] > 0 and control["bytes_received"] > 0
    assert _view(nodes[0])["gossiped_states"]["accepted"] >= 2
    hashed = _wait(
        lambda: all(m.get("sha256") for p in _view(nodes[0])["peers"] for m in p.get("models", [])),
        30,
        "the model hashes in gossip",
    )
    print(f"model hashes gossiped {hashed:.1f} s later")
    peers_cli = _cli("peers", "--api-port", nodes[0].api_url.rsplit(":", 1)[1])
    assert peers_cli.returncode == 0
    assert "three" in peers_cli.stdout and "alive" in peers_cli.stdout


def test_reused_single_use_token_is_refused(mesh: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[RunningNode] = mesh["nodes"]
    intruder = start_node(
        tmp_path, "--model", str(mesh["model"]), "--name", "four", "--join", mesh["token"]
    )
    try:
        intruder_id = _view(intruder)["peer_id"]
        _wait(
            lambda: "invite already used up" in nodes[0].log(),
            30,
            "the founder to refuse the reused token",
        )
        time.sleep(3)
        assert [p["peer_id"] for p in _view(intruder)["peers"]] == [intruder_id]  # it saw no gossip
        assert intruder_id not in _states(nodes[0])
    finally:
        intruder.stop()


def test_node_of_another_mesh_is_refused(mesh: dict[str, Any], tmp_path: Path) -> None:
    nodes: list[RunningNode] = mesh["nodes"]
    founder_address = _view(nodes[0])["peers"]
    address = next(p["addrs"][0] for p in founder_address if p["state"] == "self")
    stranger = start_node(tmp_path, "--model", str(mesh["model"]), "--peer", address)
    try:
        _wait(
            lambda: "another mesh" in nodes[0].log() or "another mesh" in stranger.log(),
            30,
            "the stranger to be refused",
        )
        assert _view(stranger)["peer_id"] not in _states(nodes[0])
    finally:
        stranger.stop()


@pytest.mark.parametrize(
    ("token", "message"),
    [("sllm1-AAAA", "bad invite token"), ("hello", "bad invite token")],
)
def test_forged_token_is_a_clear_error(
    tmp_path: Path, token: str, message: str, tiny_model: Path
) -> None:
    done = _join_once(tmp_path, tiny_model, token)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_expired_token_is_refused(mesh: dict[str, Any], tmp_path: Path, tiny_model: Path) -> None:
    token = _invite(mesh["base"] / "one" / "data", "--expires", "1s")
    time.sleep(1.5)
    done = _join_once(tmp_path, tiny_model, token)
    assert done.returncode == 1
    assert "expired" in done.stderr


def test_revoked_node_is_dropped_everywhere(mesh: dict[str, Any]) -> None:
    one, two, three = mesh["nodes"]
    two_id = _view(two)["peer_id"]
    done = _cli(
        "revoke", "--data-dir", str(mesh["base"] / "one" / "data"), two_id, "--reason", "test"
    )
    assert done.returncode == 0, done.stderr
    seconds = _wait(
        lambda: _states(one).get(two_id) == "revoked" and _states(three).get(two_id) == "revoked",
        30,
        "every node to drop the revoked peer",
    )
    print(f"revocation reached every node in {seconds:.1f} s")
    # It keeps trying to come back, is refused, and is told why
    _wait(lambda: "has been revoked" in two.log(), 30, "the revoked node to learn it")
    assert _states(three)[two_id] == "revoked" and _states(one)[two_id] == "revoked"


def test_kill_9_is_detected(mesh: dict[str, Any]) -> None:
    one, _two, three = mesh["nodes"]
    three_id = _view(three)["peer_id"]
    _wait(lambda: _states(one).get(three_id) == "alive", 30, "node three to be alive")
    three.process.kill()
    three.process.wait()
    suspected = _wait(lambda: _states(one).get(three_id) == "suspect", 30, "suspicion")
    dead = _wait(lambda: _states(one).get(three_id) == "dead", 30, "death") + suspected
    print(f"kill -9 detected: suspect after {suspected:.1f} s, dead after {dead:.1f} s")
