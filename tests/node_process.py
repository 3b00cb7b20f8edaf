"""Starting real `sharedllm-node` processes for integration tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from sharedllm.node.engine.health import Health, wait_for_health
from sharedllm.node.engine.locate import free_loopback_port


def node_command() -> str:
    """The installed console script, next to the running interpreter."""
    beside = Path(sys.executable).parent / "sharedllm-node"
    found = str(beside) if beside.exists() else shutil.which("sharedllm-node")
    assert found, "sharedllm-node is not installed (pip install -e .)"
    return found


@dataclass
class RunningNode:
    process: subprocess.Popen[bytes]
    api_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pids(self) -> list[int]:
        """PIDs of llama.cpp processes started by this node."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if "llama" in c.name() or "rpc" in c.name()]

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process is still there after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_node(
    tmp: Path,
    *args: str,
    wait_ready: bool = True,
    timeout_s: float = 180.0,
    env: Mapping[str, str] | None = None,
) -> RunningNode:
    port = free_loopback_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "node.log"
    command = [node_command(), "up", "--data-dir", str(tmp / "data"), "--api-port", str(port)]
    if "--listen" not in args:  # tests stay on loopback, each node on its own port
        command += ["--listen", "/ip4/127.0.0.1/tcp/0"]
    command += args
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    node = RunningNode(process, f"http://127.0.0.1:{port}", log_path)
    if wait_ready:
        wait_until_ready(node, timeout_s)
    return node


def up_that_stops(
    data_dir: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`up --no-model` on loopback that is expected to stop at once with an error."""
    command = [node_command(), "up", "--data-dir", str(data_dir), "--no-model"]
    command += ["--listen", "/ip4/127.0.0.1/tcp/0", *args]
    return subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def wait_until_ready(node: RunningNode, timeout_s: float, *, serving: bool = True) -> None:
    """Waits until the node's API answers /health: with 200 (every model served), or with any
    answer when `serving` is False (the node runs, its models may still wait for peers)."""

    def exited() -> bool:
        return node.process.poll() is not None

    health = wait_for_health(node.api_url, timeout_s, exited, any_answer=not serving)
    if health is Health.EXITED:
        raise AssertionError(f"node exited with {node.process.returncode}:\n{node.log()}")
    if health is Health.READY:
        return
    node.stop()
    raise AssertionError(f"node not ready after {timeout_s} s:\n{node.log()}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    """Waits for the processes to end; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not gone(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if not gone(pid)]


def invite_token(data_dir: Path) -> str:
    """A one-use invite from the running node whose data directory is `data_dir`."""
    done = subprocess.run(
        [node_command(), "invite", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def status_json(data_dir: Path) -> dict[str, Any]:
    """`sharedllm-node status --json` of the running node whose data directory is `data_dir`."""
    done = subprocess.run(
        [node_command(), "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed
