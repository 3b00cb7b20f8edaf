"""The container image and the three-node compose stack, built and run for real: the image
is built from a base made of Debian's packages (no registry here) with the engine this test run
built (`engine pack`), three containers on their own network form a mesh, split the default
model by their memory caps and answer at a worker; a killed container is planned around; the
stack is torn down. Prints the image size, cold and cached build times and the time from
`up` to the first answer.

Needs root, docker with a running daemon, docker-compose and debootstrap (.ci/run installs and
starts them where it can); elsewhere it skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.archive import pack_engine
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
BASE = "sharedllm-base:bookworm"
KEY = "container-test-key-0123456789"
GEMMA_ID = "gemma-3-270m-q4_k_m"


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("docker", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    return None if info.returncode == 0 else "the docker daemon is not running"


def _run(*argv: str, env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=ROOT
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


class Stack:
    def __init__(self, project: str) -> None:
        self.project = project
        self.ports = {name: free_loopback_port() for name in "abc"}
        self.env = {
            **os.environ,
            "SHAREDLLM_API_KEY": KEY,
            "SHAREDLLM_BASE_IMAGE": BASE,
            "SHAREDLLM_ENGINE_ARCHIVE": "docker/engine.tar.gz",
            **{f"SHAREDLLM_PORT_{n.upper()}": str(p) for n, p in self.ports.items()},
        }

    def compose(self, *args: str, timeout: float = 1800) -> str:
        command = ("docker-compose", "-f", str(COMPOSE), "-p", self.project, *args)
        return _run(*command, env=self.env, timeout=timeout)

    def status(self, node: str) -> dict[str, Any]:
        done = subprocess.run(
            ["docker", "exec", f"{self.project}_{node}_1", "sharedllm-node", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def complete(self, node: str) -> int:
        body = {"model": GEMMA_ID, "prompt": "Hello", "max_tokens": 4}
        try:
            answer = httpx.post(
                f"http://127.0.0.1:{self.ports[node]}/v1/completions",
                json=body,
                headers={"authorization": f"Bearer {KEY}"},
                timeout=60,
            )
        except httpx.HTTPError:
            return 0
        return answer.status_code


@pytest.fixture
def stack(engine: EngineInfo) -> Iterator[Stack]:
    why_not = _unavailable()
    if why_not is not None:
        pytest.skip(f"container test skipped: {why_not}")
    _run(str(ROOT / "docker" / "make-base-image.sh"), BASE)
    pack_engine(default_cache_dir(), "cpu", ROOT / "docker" / "engine.tar.gz")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")  # a proxy's CA, where one re-signs TLS
    if bundle.exists():
        shutil.copy(bundle, ROOT / "docker" / "ca-certificates" / "host.crt")
    running = Stack(f"slltest{os.getpid()}")
    try:
        yield running
    finally:
        subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "-p", running.project, "down", "-v", "-t", "5"],
            capture_output=True,
            env=running.env,
            timeout=300,
            check=False,
            cwd=ROOT,
        )


def _health(container: str) -> str:
    return _run("docker", "inspect", "-f", "{{.State.Health.Status}}", container).strip()


def _wait(what: str, check: Any, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(2)
    return time.monotonic() - started


def test_the_compose_stack_splits_the_model_serves_and_survives_a_killed_container(
    stack: Stack,
) -> None:
    started = time.monotonic()
    stack.compose("build", "a")
    first_build = time.monotonic() - started
    started = time.monotonic()
    stack.compose("build", "a")
    cached_build = time.monotonic() - started
    size = int(_run("docker", "image", "inspect", "-f", "{{.Size}}", "sharedllm-node:latest"))
    started = time.monotonic()
    stack.compose("up", "-d")
    _wait("an answer at worker b", lambda: stack.complete("b") == 200, 600)
    first_answer = time.monotonic() - started
    model = stack.status("a")["models"][GEMMA_ID]
    nodes = {a["node"] for a in model["assignments"]}
    assert len(nodes) >= 2, model  # split across containers
    names = {stack.status(n).get("peer_id"): n for n in "bc"}
    worker = next(names[n] for n in nodes if n in names)
    _run("docker", "kill", f"{stack.project}_{worker}_1")
    survivor = "b" if worker == "c" else "c"
    replanned = _wait(
        "the re-plan without the killed container",
        lambda: (
            stack.complete(survivor) == 200
            and worker
            not in {
                names.get(a["node"]) for a in stack.status("a")["models"][GEMMA_ID]["assignments"]
            }
        ),
        300,
    )
    container = f"{stack.project}_a_1"
    _wait("a healthy health check", lambda: _health(container) == "healthy", 120)
    print(
        f"\nimage {size / 1e6:.0f} MB; build {first_build:.0f} s first in this run, "
        f"{cached_build:.1f} s cached; up to the first answer at a worker {first_answer:.0f} s; "
        f"answered again {replanned:.0f} s after killing {worker}"
    )
