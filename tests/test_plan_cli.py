"""`sharedllm-node plan`: the preview on the real gemma file, its JSON shape, and its errors."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sharedllm.scheduler.cluster_file import ClusterFileError, parse_cluster

from .node_process import node_command

CLUSTER: dict[str, Any] = {
    "nodes": [
        {"id": "a", "memory_gib": 0.45, "gflops": 200.0, "has_model": True},
        {"id": "b", "memory_gib": 0.45, "gflops": 150.0},
        {"id": "c", "memory_gib": 8.0, "vram_gib": 0.0, "gflops": 50.0, "rpc_proto": "7.0.0"},
    ],
    "links": [
        {"from": "a", "to": "b", "rtt_ms": 1.0, "bandwidth_mbps": 1000.0},
        {"from": "a", "to": "c", "rtt_ms": 150.0, "bandwidth_mbps": 20.0},
    ],
    "context": 2048,
}


def _plan(
    tmp_path: Path, model: Path, cluster: Any, *extra: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cluster.json"
    path.write_text(cluster if isinstance(cluster, str) else json.dumps(cluster))
    return subprocess.run(
        [node_command(), "plan", "--model", str(model), "--cluster", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_json_preview_of_gemma(tmp_path: Path, gemma_path: Path) -> None:
    done = _plan(tmp_path, gemma_path, CLUSTER, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["primary"] == "a"
    spans = [(a["first_layer"], a["last_layer"]) for a in result["assignments"]]
    assert spans[0][0] == 0 and spans[-1][1] == 17
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    assert {a["node"] for a in result["assignments"]} == {"a", "b"}  # c is behind a slow link
    assert all(a["memory_bytes"] > 0 for a in result["assignments"])
    assert result["predicted_tokens_per_s"] > 0
    assert result["context"] == 2048
    assert set(result["baselines"]) == {"memory_proportional", "exo", "mesh_llm"}
    for entry in result["baselines"].values():
        assert "predicted_tokens_per_s" in entry


def test_human_preview_shows_table_and_baselines(tmp_path: Path, gemma_path: Path) -> None:
    done = _plan(tmp_path, gemma_path, CLUSTER, "--context", "1024")
    assert done.returncode == 0, done.stderr
    assert "context 1024" in done.stdout
    assert "memory_proportional" in done.stdout and "mesh_llm" in done.stdout
    assert "tokens/s" in done.stdout


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("{not json", "is not valid JSON"),
        ({"nodes": []}, "'nodes' must be a non-empty list"),
        (
            {"nodes": [{"id": "a", "memory_gib": -1, "gflops": 1}]},
            "memory_gib must be zero or more",
        ),
        ({"nodes": [{"id": "a", "memory_gib": 1, "gflops": 0}]}, "gflops must be positive"),
        (
            {
                "nodes": [{"id": "a", "memory_gib": 1, "gflops": 1}],
                "links": [{"from": "a", "to": "z", "rtt_ms": 1, "bandwidth_mbps": 1}],
            },
            "unknown node 'z'",
        ),
        ({"nodes": [{"id": "a", "memory_gib": 0.1, "gflops": 1}]}, "GiB missing"),
    ],
)
def test_errors_exit_2_with_one_line(
    tmp_path: Path, gemma_path: Path, cluster: Any, message: str
) -> None:
    done = _plan(tmp_path, gemma_path, cluster)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"nodes": [{"id": "a", "memory_gib": 1, "gflops": 1}], "extra": 1}, "unknown key 'extra'"),
        ({"nodes": [{"id": "a", "memory_gib": "lots", "gflops": 1}]}, "must be a number"),
        ({"nodes": [{"id": "a", "memory_gib": 1, "gflops": 1}] * 2}, "duplicate node id 'a'"),
        ({"nodes": [{"id": "", "memory_gib": 1, "gflops": 1}]}, "non-empty string"),
        (
            {"nodes": [{"id": "a", "memory_gib": 1, "gflops": 1, "has_model": "yes"}]},
            "true or false",
        ),
        ({"nodes": [{"id": "a", "memory_gib": 1, "gflops": 1}], "context": 1.5}, "whole number"),
    ],
)
def test_parser_rejects(data: Any, message: str) -> None:
    with pytest.raises(ClusterFileError, match=message):
        parse_cluster(data, "m")


def test_one_way_links_hold_both_ways() -> None:
    spec = parse_cluster(CLUSTER, "m")
    assert spec.view.link("b", "a") is not None
    assert spec.view.link("b", "c") is None
    assert spec.view.node("a").models == frozenset({"m"})
