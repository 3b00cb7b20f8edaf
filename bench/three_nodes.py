"""Three `sharedllm-node` processes on loopback whose memory caps split one model in thirds, as
the GPU bench and the load bench run them, and the same members starting again together (as
after a reboot): the warm path, where the workers hold the model file."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sharedllm.node.engine.locate import free_loopback_port
from sharedllm.scheduler.model_profile import ModelProfile

from . import serving_bench
from .serving_bench import _started

# How a bench times a start: (the primary's URL, the model's id, when the processes started)
# to seconds from that start to the first answer.
ReadyAfter = Callable[[str, str, float], float]


@dataclass(frozen=True)
class MeshSetup:
    """What every node of a bench's mesh gets: its environment and context size."""

    env: dict[str, str]
    context: int


def node_command() -> str:
    return shutil.which("sharedllm-node") or str(Path(sys.executable).parent / "sharedllm-node")


def thirds(layer_count: int) -> tuple[int, int, int]:
    """Primary, worker, worker: as even as can be, the primary taking the fewest (it also
    holds the embeddings and the output head)."""
    share, extra = divmod(layer_count, 3)
    return share, share + (1 if extra > 0 else 0), share + (1 if extra > 1 else 0)


def start_mesh(
    stack: ExitStack,
    work: Path,
    model: Path,
    profile: ModelProfile,
    setup: MeshSetup,
    *,
    warm: bool = False,
    restart: tuple[list[int], str] | None = None,
) -> tuple[str, list[int], str]:
    """Three nodes whose caps force a three-way split; with `warm` the workers hold the model
    file too (their rpc-servers' caches are filled from it), else they fetch their layers.
    With `restart` (the ports and token of an earlier start in `work`), the same members
    start again all at once, as after a reboot. Returns the primary's URL, ports and token."""
    command = node_command()
    work.mkdir(parents=True, exist_ok=True)
    primary_layers, *worker_layers = thirds(profile.layer_count)
    ports, token = restart or ([_free_port_pair() for _ in range(3)] + _api_ports(), "")

    def node(index: int, cap: int, *args: str) -> None:
        name = "a" if index == 0 else f"n{index}"
        argv = [command, "up", "--data-dir", str(work / name), "--api-port", str(ports[3 + index])]
        argv += ["--listen", f"/ip4/127.0.0.1/tcp/{ports[index]}"]
        argv += ["--context-size", str(setup.context), "--max-memory", str(cap), *args]
        log = work / f"{name}{'-restart' if restart else ''}.log"
        stack.enter_context(_started(argv, log, setup.env))

    cap = serving_bench.cap_bytes(profile, primary_layers, True, setup.context)
    node(0, cap, "--model", str(model))
    token = token or _invite(command, work / "a")
    for index, layers in enumerate(worker_layers, start=1):
        cap = serving_bench.cap_bytes(profile, layers, False, setup.context)
        node(index, cap, "--join", token, *(("--model", str(model)) if warm else ()))
    return f"http://127.0.0.1:{ports[3]}", ports, token


def warm_mesh_loads(
    work: Path, model: Path, profile: ModelProfile, setup: MeshSetup, ready_after: ReadyAfter
) -> dict[str, float]:
    """Seconds from starting a mesh whose workers hold the file to its first answer: when it
    forms (an invite, each node's one-time engine timing) and when the same members start
    again all at once. Each mesh is stopped before the next starts."""
    model_id = model.name.removesuffix(".gguf")
    with ExitStack() as stack:
        started = time.monotonic()
        url, ports, token = start_mesh(stack, work, model, profile, setup, warm=True)
        forming = ready_after(url, model_id, started)
    with ExitStack() as stack:
        started = time.monotonic()
        began = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        print(f"warm mesh starting again at {began}", file=sys.stderr)
        restart = (ports, token)
        url, _, _ = start_mesh(stack, work, model, profile, setup, warm=True, restart=restart)
        again = ready_after(url, model_id, started)
    return {"mesh_warm_forming": forming, "mesh_warm": again}


def _free_port_pair() -> int:
    """A loopback port whose successor is free too (a node's data plane listens on mesh + 1)."""
    while True:
        port = free_loopback_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port


def _api_ports() -> list[int]:
    return [free_loopback_port() for _ in range(3)]


def _invite(command: str, data_dir: Path) -> str:
    deadline = time.monotonic() + 120
    while True:
        invite = subprocess.run(
            [command, "invite", "--data-dir", str(data_dir), "--uses", "2"],
            capture_output=True,
            text=True,
            check=False,
        )
        if invite.returncode == 0:
            return invite.stdout.strip()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no invite from the founder: {invite.stderr}")
        time.sleep(0.5)
