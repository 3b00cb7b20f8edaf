"""Real `sharedllm-node` processes on loopback for the benchmarks that kill and restart them."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from sharedllm.node.engine.locate import free_loopback_port

from .node_cli import COMMAND, node_status


class BenchNode:
    """One node, started at once; it keeps its API and mesh ports across restarts."""

    def __init__(self, work: Path, name: str, *args: str) -> None:
        self.data, self.name, self.args = work / name, name, args
        self.log = work / f"{name}.log"
        self.port = free_loopback_port()
        self.listen = f"/ip4/127.0.0.1/tcp/{free_loopback_port()}"
        self.start()

    def start(self) -> None:
        argv = [COMMAND, "up", "--data-dir", str(self.data), "--api-port", str(self.port)]
        argv += ["--listen", self.listen, "--name", self.name, *self.args]
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(argv, stdout=handle, stderr=handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        return node_status(self.port)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """kill -9 of the node alone: its engines must die with it."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def kill_machine(self) -> None:
        """The machine dies: the node and its engines at the same moment."""
        tree = psutil.Process(self.process.pid)
        for process in [*tree.children(recursive=True), tree]:
            process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill_machine()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


def invite(node: BenchNode, uses: int) -> str:
    """A token from the running `node` for `uses` joiners."""
    wait_until(lambda: node.data.joinpath("running.json").exists(), 120, f"node {node.name}")
    done = subprocess.run(
        [COMMAND, "invite", "--data-dir", str(node.data), "--uses", str(uses)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()
