"""Failover benchmark: time from kill -9 of a worker machine to the first successful completion
on the new placement, with real engines on loopback.

Three `sharedllm-node` processes, two holding Gemma 270M; 500 MiB caps make the model need two
nodes, so the third can take the lost worker's place. Each run kills the current worker (node
and engines), polls a completion through a surviving node until one succeeds, then restarts the
killed node for the next run. Target (issue 8): under 15 s.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from sharedllm.node.config import default_cache_dir
from sharedllm.node.default_model import default_model_path
from sharedllm.node.engine import free_loopback_port

from .node_cli import COMMAND, node_status

RUNS = 3
CAP = "500MiB"


class _Node:
    def __init__(self, work: Path, name: str, *args: str) -> None:
        self.data, self.name, self.args = work / name, name, args
        self.log = work / f"{name}.log"
        self.start()

    def start(self) -> None:
        self.port = free_loopback_port()
        argv = [COMMAND, "up", "--data-dir", str(self.data), "--api-port", str(self.port)]
        argv += ["--listen", "/ip4/127.0.0.1/tcp/0", "--name", self.name, "--max-memory", CAP]
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen([*argv, *self.args], stdout=handle, stderr=handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        return node_status(self.port)

    def kill_machine(self) -> None:
        tree = psutil.Process(self.process.pid)
        for process in [*tree.children(recursive=True), tree]:
            process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill_machine()


def _healthy(node: _Node) -> bool:
    try:
        return httpx.get(node.url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition: Any, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the mesh did not get ready in time")
        time.sleep(0.25)


def _completes(node: _Node, model_id: str) -> bool:
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 4}
    try:
        return httpx.post(node.url + "/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def run() -> dict[str, Any]:
    model = default_model_path(default_cache_dir())
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-failover-"))
    nodes: dict[str, _Node] = {}
    seconds: list[float] = []
    try:
        nodes["a"] = _Node(work, "a", "--model", str(model))
        _wait(lambda: nodes["a"].data.joinpath("running.json").exists())
        invite = subprocess.run(
            [COMMAND, "invite", "--data-dir", str(nodes["a"].data), "--uses", "2"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        nodes["b"] = _Node(work, "b", "--join", invite, "--model", str(model))
        nodes["c"] = _Node(work, "c", "--join", invite, "--no-model")
        _wait(lambda: all(_healthy(n) for n in nodes.values()))
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
            _wait(lambda entry=entry: _completes(entry, model_id), timeout_s=120)
            seconds.append(time.monotonic() - killed_at)
            print(f"  run {run_index + 1}: {seconds[-1]:.1f} s (lost {worker.name})")
            worker.start()
            _wait(lambda: all(_healthy(n) for n in nodes.values()))
    finally:
        for node in nodes.values():
            node.stop()
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median(seconds)
    print(f"  median {median:.1f} s, min {min(seconds):.1f}, max {max(seconds):.1f} (target < 15)")
    return {"failover_s": median, "runs_s": seconds}
