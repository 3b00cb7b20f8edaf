"""Hosts in network namespaces of our own, for tests of real nodes on real (virtual) networks:
veth pairs, a bridge as the LAN's switch, addresses only inside these namespaces.

Needs root; `namespaces_unavailable` says why not, for the tests to skip with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedllm.node.engine.locate import free_loopback_port

from .node_process import node_command, stop_process

GEMMA_ID = "gemma-3-270m-q4_k_m"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip and tc commands are missing (iproute2)"
    probe = f"sllprobe{os.getpid()}"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"no privilege for network namespaces: {made.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    namespace: str
    device: str
    address: str
    base: Path
    api_port: int
    process: subprocess.Popen[bytes] | None = None

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.namespace, *argv, check=check)

    def start(self, *args: str, listen: str | None = None) -> None:
        """Starts a node here, on this host's address (port 0) unless `listen` is given."""
        command = ["ip", "netns", "exec", self.namespace, node_command(), "up"]
        command += ["--data-dir", str(self.base / "data"), "--api-port", str(self.api_port)]
        command += ["--listen", listen or f"/ip4/{self.address}/tcp/0"]
        command += ["--context-size", "512", *args]
        with (self.base / "node.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_running(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.base / "data" / "running.json").exists():
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.5)

    def invite(self, *args: str) -> str:
        done = self.run(node_command(), "invite", "--data-dir", str(self.base / "data"), *args)
        return done.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def status(self) -> dict[str, Any]:
        done = self.run(
            node_command(), "status", "--json", "--data-dir", str(self.base / "data"), check=False
        )
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def get(self, path: str) -> Any:
        script = (
            "import httpx, json\n"
            f"print(json.dumps(httpx.get('http://127.0.0.1:{self.api_port}{path}', timeout=10)"
            ".json()))\n"
        )
        return json.loads(self.run(sys.executable, "-c", script).stdout)

    def complete(
        self, timeout_s: float = 90, user: str = "", max_tokens: int = 4
    ) -> tuple[int, float]:
        """(HTTP status, seconds) of one completion of `max_tokens` asked at this host's API
        (0: no answer), as `user` if given (the field that keeps a conversation on one
        replica)."""
        script = (
            "import httpx, sys, time\n"
            "started = time.monotonic()\n"
            "try:\n"
            f"    r = httpx.post('http://127.0.0.1:{self.api_port}/v1/completions', json="
            f"{{'model': '{GEMMA_ID}', 'prompt': 'Hello', 'max_tokens': {max_tokens},"
            f" 'user': {user!r}}},"
            f" timeout={timeout_s})\n"
            "    code = r.status_code\n"
            "except httpx.HTTPError:\n"
            "    code = 0\n"
            "print(code, time.monotonic() - started)\n"
        )
        done = self.run(sys.executable, "-c", script, check=False)
        code, seconds = done.stdout.split()
        return int(code), float(seconds)

    def log(self) -> str:
        return (self.base / "node.log").read_text(errors="replace")


def tag() -> str:
    return str(os.getpid())[-6:]


@contextmanager
def lan(base: Path, count: int, subnet: str) -> Iterator[list[Host]]:
    """`count` hosts on one bridge (in a switch namespace of its own): host i is `subnet`.i
    on its device; everything is removed afterwards."""
    switch = f"sllsw{tag()}"
    hosts = [
        Host(f"sllh{i}{tag()}", f"e{i}{tag()}", f"{subnet}.{i}", base / f"h{i}", port)
        for i, port in ((i, free_loopback_port()) for i in range(1, count + 1))
    ]
    try:
        run("ip", "netns", "add", switch)
        run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", switch, "link", "set", "br0", "up")
        for index, host in enumerate(hosts, 1):
            host.base.mkdir(parents=True)
            run("ip", "netns", "add", host.namespace)
            host.run("ip", "link", "set", "lo", "up")
            port = f"p{index}{tag()}"
            run("ip", "link", "add", host.device, "type", "veth", "peer", "name", port)
            run("ip", "link", "set", host.device, "netns", host.namespace)
            run("ip", "link", "set", port, "netns", switch)
            run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", host.device)
            host.run("ip", "link", "set", host.device, "up")
        yield hosts
    finally:
        for host in hosts:
            host.stop()
            run("ip", "netns", "del", host.namespace, check=False)
        run("ip", "netns", "del", switch, check=False)
