"""Driving `sharedllm-node` from benchmarks: the command beside this Python, and its view."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

COMMAND = str(Path(sys.executable).parent / "sharedllm-node")


@dataclass(frozen=True)
class Place:
    """Where a node runs: this machine's loopback, or a network namespace of ours."""

    address: str = "127.0.0.1"
    namespace: str | None = None

    def command(self, *argv: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        return [*prefix, *argv]

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            self.command(*argv), capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout


# Runs inside a network namespace: the standard library only, so it starts in milliseconds.
_FETCH = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())"
)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def node_status(api_port: int, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """The mesh view of the node whose API is at `api_port` (what `status --json` shows).

    Asked over HTTP rather than by starting `sharedllm-node status`: benchmarks poll while a
    load runs, and a Python CLI started twice a second takes half a core from the engine being
    timed. `prefix` asks from elsewhere (`ip netns exec NAME` for a node in a namespace)."""
    url = f"http://127.0.0.1:{api_port}/mesh/peers"
    if not prefix:
        answer = httpx.get(url, timeout=30)
        answer.raise_for_status()
        view: dict[str, Any] = answer.json()
        return view
    done = subprocess.run(
        [*prefix, sys.executable, "-S", "-c", _FETCH, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: dict[str, Any] = json.loads(done.stdout)
    return found
