"""Failover benchmark: time from kill -9 of a worker machine to the first successful completion
on the new placement, with real engines on loopback.

Three `sharedllm-node` processes, two holding Gemma 270M; 500 MiB caps make the model need two
nodes, so the third can take the lost worker's place. Each run kills the current worker (node
and engines), polls a completion through a surviving node until one succeeds, then restarts the
killed node for the next run. Target (issue 8): under 15 s.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.models.default_model import default_model_path

from .bench_nodes import BenchNode, invite, wait_until

RUNS = 3
CAP = "500MiB"


def _completes(node: BenchNode, model_id: str) -> bool:
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 4}
    try:
        return httpx.post(node.url + "/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def run() -> dict[str, Any]:
    model = default_model_path(default_cache_dir())
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-failover-"))
    nodes: dict[str, BenchNode] = {}
    capped = ("--max-memory", CAP)
    seconds: list[float] = []
    try:
        nodes["a"] = BenchNode(work, "a", "--model", str(model), *capped)
        token = invite(nodes["a"], uses=2)
        nodes["b"] = BenchNode(work, "b", "--join", token, "--model", str(model), *capped)
        nodes["c"] = BenchNode(work, "c", "--join", token, "--no-model", *capped)
        wait_until(lambda: all(n.healthy() for n in nodes.values()), 300, "the mesh to serve")
        by_id = {n.status()["peer_id"]: n for n in nodes.values()}
        print(f"failover: kill -9 of the worker, {RUNS} runs (Gemma 270M, 3 nodes, loopback)")
        for run_index in range(RUNS):
            placement = nodes["c"].status()["models"][model_id]
            used = {placement["primary"], *(a["node"] for a in placement["assignments"])}
            (worker_id,) = used - {placement["primary"]}
            worker = by_id[worker_id]
            entry = next(n for n in nodes.values() if n is not worker)
            killed_at = time.monotonic()
            worker.kill_machine()
            wait_until(functools.partial(_completes, entry, model_id), 120, "a completion")
            seconds.append(time.monotonic() - killed_at)
            print(f"  run {run_index + 1}: {seconds[-1]:.1f} s (lost {worker.name})")
            worker.start()
            wait_until(lambda: all(n.healthy() for n in nodes.values()), 300, "the mesh to heal")
    finally:
        for node in nodes.values():
            node.stop()
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median(seconds)
    print(f"  median {median:.1f} s, min {min(seconds):.1f}, max {max(seconds):.1f} (target < 15)")
    return {"failover_s": median, "runs_s": seconds}
