"""Serving benchmark: one model, one layer split, three ways, in one run on loopback.

- single: one llama-server holding every layer;
- direct: llama-server with `--rpc` straight to two ggml-rpc-servers (plain llama.cpp RPC);
- mesh: three `sharedllm-node` processes whose memory caps force the same split, the rpc traffic
  going through our tunnels over the TLS data plane, each sealed by the engines themselves (the
  nodes hand them the connections); asked at the primary (tunnel cost only) and at a worker node
  (plus API forwarding through the mesh);
- mesh_relayed: the same mesh with `--no-engine-seal`: the nodes' native relays carry the
  tunnels (asked at the primary).

Requests are interleaved round by round so that drift of a shared machine hits every setup
alike. Generation and prompt speeds are the engine's own timings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.health import Health, wait_for_health
from sharedllm.node.engine.locate import EngineInfo, find_engine, free_loopback_port
from sharedllm.node.engine.speed import engine_gflops
from sharedllm.node.models.default_model import default_model_path
from sharedllm.node.models.model_file import inspect_model
from sharedllm.scheduler.cost_model import CostModel
from sharedllm.scheduler.llama_args import split_args
from sharedllm.scheduler.model_profile import ModelProfile
from sharedllm.scheduler.placement import Assignment, Placement

ROUNDS = 9
MAX_TOKENS = 64
CONTEXT = 4096
PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "The story should have a beginning, a middle and an end, and mention the sea, "
    "a storm, a seagull and an old map. Keep the language simple."
)
# Layers of the primary, then of each worker; memory caps computed from the model force them.
SPLITS = ((6, 6, 6), (9, 9))
# Three engine processes share this machine's cores in the split setups: one thread each, in
# both the direct and the mesh setup, so that neither pays for oversubscribed spinning threads.
THREADS = ["--threads", "1"]
# the mesh without speculation: it is compared with plain llama.cpp RPC (see the speculation bench)
_ENV = {**os.environ, "GGML_RPC_NO_RDMA": "1", "SHAREDLLM_SPECULATION": "off"}


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)


# Every process `_started` runs until its block ends: a wait gives up as soon as one has died.
_RUNNING: dict[subprocess.Popen[bytes], Path] = {}


def _wait_http(url: str, timeout_s: float = 240.0) -> None:
    def died() -> bool:
        return any(process.poll() is not None for process in _RUNNING)

    health = wait_for_health(url, timeout_s, died)
    if health is Health.EXITED:
        logs = [str(log) for process, log in _RUNNING.items() if process.poll() is not None]
        raise RuntimeError(f"the process logging to {logs[0]} exited early")
    if health is Health.TIMED_OUT:
        raise RuntimeError(f"{url} not ready after {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def _started(
    argv: list[str], log: Path, env: dict[str, str] = _ENV
) -> Iterator[subprocess.Popen[bytes]]:
    process = _spawn(argv, log, env)
    _RUNNING[process] = log
    try:
        yield process
    finally:
        del _RUNNING[process]
        _stop(process)


def _llama_server(engine: EngineInfo, model: Path, port: int, extra: list[str]) -> list[str]:
    return [
        str(engine.llama_server),
        *("--host", "127.0.0.1", "--port", str(port), "--model", str(model)),
        *("--alias", "gemma", "--ctx-size", str(CONTEXT), "--no-webui"),
        *extra,
    ]


def _direct_split_args(endpoints: list[str], counts: tuple[int, ...]) -> list[str]:
    nodes = ["primary", *(f"w{i}" for i in range(1, len(counts)))]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    assignments = tuple(
        Assignment(node, first, first + count - 1, 0)
        for node, first, count in zip(nodes, starts, counts, strict=True)
    )
    placement = Placement("gemma", "primary", assignments, 0, 0.0, 0.0)
    return split_args(placement, sum(counts)).argv(endpoints)


def cap_bytes(profile: ModelProfile, layers: int, primary: bool, context: int) -> int:
    """A `--max-memory` that lets the planner give a node exactly `layers` layers."""
    cost = CostModel()
    per_layer = cost.layer_memory(profile, context)
    extra = cost.primary_extra_memory(profile) if primary else 0
    budget = extra + layers * per_layer + per_layer // 2 + cost.compute_buffer_bytes
    return math.ceil(budget / (1.0 - cost.memory_headroom_fraction))


def _node(command: str, data: Path, port: int, *args: str) -> list[str]:
    return [
        *(command, "up", "--data-dir", str(data), "--api-port", str(port)),
        *("--listen", "/ip4/127.0.0.1/tcp/0", *args),
    ]


def _complete(
    url: str, model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, **extra: Any
) -> dict[str, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache_prompt": False,
        **extra,
    }
    answer = httpx.post(url + "/v1/completions", json=body, timeout=600).json()
    timings = answer["timings"]
    return {
        "gen_tok_s": timings["predicted_per_second"],
        "prompt_tok_s": timings["prompt_per_second"],
        "generated": timings["predicted_n"],
    }


def _tunnel_totals(url: str, model: str) -> dict[str, dict[str, Any]]:
    view = httpx.get(url + "/mesh/peers", timeout=5).json()
    totals: dict[str, dict[str, Any]] = view["models"][model]["tunnels"]
    return totals


def run() -> dict[str, Any]:
    engine = find_engine(default_cache_dir(), None)
    model = default_model_path(default_cache_dir())
    profile = inspect_model(model).profile
    # Each node times its engine at its first start; done here first, on a quiet machine, the
    # nodes find the figure remembered instead of timing while the other nodes start.
    cache = default_cache_dir()
    engine_gflops(engine, model, profile, threads=1, gpu_layers=False, cache_dir=cache)
    placements = [_run_split(engine, model, profile, counts) for counts in SPLITS]
    errors = [p["predicted_vs_measured_error"] for p in placements]
    print(
        f"serving: predicted vs measured tokens/s over {len(placements)} placements: "
        f"{', '.join(f'{e:.0%}' for e in errors)} off (target within 15%)"
    )
    return {
        "placements": placements,
        "mesh_vs_direct_rpc_tokens_ratio": placements[0]["mesh_vs_direct_rpc_tokens_ratio"],
        "relayed_mesh_vs_direct_rpc_tokens_ratio": placements[0][
            "relayed_mesh_vs_direct_rpc_tokens_ratio"
        ],
        "predicted_vs_measured_error": max(errors),
    }


def _run_split(
    engine: EngineInfo, model: Path, profile: ModelProfile, counts: tuple[int, ...]
) -> dict[str, Any]:
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-bench-"))
    urls: dict[str, str] = {}
    try:
        with ExitStack() as stack:
            port = free_loopback_port()
            stack.enter_context(
                _started(_llama_server(engine, model, port, []), work / "single.log")
            )
            urls["single"] = f"http://127.0.0.1:{port}"
            urls["direct"] = start_direct_split(stack, work, engine, model, counts)
            caps = [cap_bytes(profile, n, index == 0, CONTEXT) for index, n in enumerate(counts)]
            urls.update(_start_mesh(stack, work, caps))
            relayed = _start_mesh(stack, work / "relayed", caps, "--no-engine-seal")
            urls["mesh_relayed"] = relayed["mesh_at_primary"]
            for url in urls.values():
                _wait_http(url)
            return {"split": list(counts), **_measure(urls, model_id, counts)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def start_direct_split(
    stack: ExitStack, work: Path, engine: EngineInfo, model: Path, counts: tuple[int, ...]
) -> str:
    """Plain llama.cpp RPC: one rpc-server per worker's layers, and llama-server driving them
    with the same split; its URL."""
    rpc = [free_loopback_port() for _ in counts[1:]]
    for index, rpc_port in enumerate(rpc):
        argv = [str(engine.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1"]
        stack.enter_context(_started(argv, work / f"rpc{index}.log"))
    time.sleep(0.5)
    port = free_loopback_port()
    split = [*_direct_split_args([f"127.0.0.1:{p}" for p in rpc], counts), *THREADS]
    stack.enter_context(_started(_llama_server(engine, model, port, split), work / "direct.log"))
    return f"http://127.0.0.1:{port}"


def invite_when_running(command: str, founder: Path, uses: int) -> str:
    """An invite from the founder node, once it runs (it can invite only then)."""
    deadline = time.monotonic() + 120
    while True:
        invite = subprocess.run(
            [command, "invite", "--data-dir", str(founder), "--uses", str(uses)],
            capture_output=True,
            text=True,
            check=False,
        )
        if invite.returncode == 0 or time.monotonic() > deadline:
            return invite.stdout.strip()
        time.sleep(0.5)


def _start_mesh(stack: ExitStack, work: Path, caps: list[int], *extra: str) -> dict[str, str]:
    """The founder holds the model and leads; each joiner's cap fixes its share of layers."""
    work.mkdir(exist_ok=True)
    command = str(Path(sys.executable).parent / "sharedllm-node")
    ports = [free_loopback_port() for _ in caps]
    founder = work / "a"
    argv = _node(command, founder, ports[0], "--max-memory", str(caps[0]), *THREADS, *extra)
    stack.enter_context(_started(argv, work / "a.log"))
    token = invite_when_running(command, founder, len(caps) - 1)
    for index in range(1, len(caps)):
        argv = _node(command, work / f"n{index}", ports[index], "--join", token)
        argv += ["--max-memory", str(caps[index]), *THREADS, *extra]
        stack.enter_context(_started(argv, work / f"n{index}.log"))
    return {
        "mesh_at_primary": f"http://127.0.0.1:{ports[0]}",
        "mesh_at_worker": f"http://127.0.0.1:{ports[-1]}",
    }


def _measure(urls: dict[str, str], model_id: str, counts: tuple[int, ...]) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    traffic: list[dict[str, float]] = []
    for name, url in urls.items():  # warm-up: first requests pay one-time costs
        _complete(url, "gemma" if not name.startswith("mesh") else model_id)
    for _ in range(ROUNDS):
        for name, url in urls.items():
            if name == "mesh_at_primary":
                before = _tunnel_totals(url, model_id)
                sample = _complete(url, model_id)
                after = _tunnel_totals(url, model_id)
                traffic.append(_per_token(before, after, sample["generated"]))
            else:
                sample = _complete(url, model_id if name.startswith("mesh") else "gemma")
            samples[name].append(sample)
    planned = httpx.get(urls["mesh_at_primary"] + "/mesh/peers", timeout=5).json()
    predicted = planned["models"][model_id]["planned"]["predicted_tokens_per_s"]
    return _report(samples, traffic, float(predicted), counts)


def _per_token(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], tokens: float
) -> dict[str, Any]:
    moved = sum(
        after[w]["bytes_out"] + after[w]["bytes_back"] - b["bytes_out"] - b["bytes_back"]
        for w, b in before.items()
    )
    wire = sum(
        after[w]["wire_out"] + after[w]["wire_back"] - b["wire_out"] - b["wire_back"]
        for w, b in before.items()
    )
    trips = sum(after[w]["round_trips"] - b["round_trips"] for w, b in before.items())
    handed = sum(after[w].get("handed_connections", 0) for w in after)
    requests: dict[str, dict[str, float]] = {}
    for worker, was in before.items():
        for command, now in after[worker].get("requests", {}).items():
            old = was.get("requests", {}).get(command, {"requests": 0, "bytes": 0})
            entry = requests.setdefault(command, {"requests": 0.0, "bytes": 0.0})
            entry["requests"] += (now["requests"] - old["requests"]) / tokens
            entry["bytes"] += (now["bytes"] - old["bytes"]) / tokens
    return {
        "bytes": moved / tokens,
        "wire_bytes": wire / tokens,
        "round_trips": trips / tokens,
        "handed_connections": handed,
        "requests": {name: entry for name, entry in requests.items() if entry["requests"]},
    }


def _report(
    samples: dict[str, list[dict[str, float]]],
    traffic: list[dict[str, float]],
    predicted_tok_s: float,
    counts: tuple[int, ...],
) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {
        name: {
            "gen_tok_s": statistics.median(s["gen_tok_s"] for s in runs),
            "prompt_tok_s": statistics.median(s["prompt_tok_s"] for s in runs),
            "gen_tok_s_runs": [round(s["gen_tok_s"], 2) for s in runs],
        }
        for name, runs in samples.items()
    }
    direct = medians["direct"]
    split = "/".join(str(n) for n in counts)
    print(f"serving: gemma 270M, split {split} layers, {ROUNDS} interleaved rounds, loopback")
    print(f"  {'setup':<16} {'gen tok/s':>10} {'prompt tok/s':>13} {'gen vs direct':>14}")
    for name, figures in medians.items():
        ratio = figures["gen_tok_s"] / direct["gen_tok_s"]
        figures["gen_ratio_vs_direct"] = ratio
        figures["prompt_ratio_vs_direct"] = figures["prompt_tok_s"] / direct["prompt_tok_s"]
        print(
            f"  {name:<16} {figures['gen_tok_s']:>10.1f} {figures['prompt_tok_s']:>13.1f} "
            f"{ratio:>14.3f}"
        )
    per_token = {
        "bytes": statistics.median(t["bytes"] for t in traffic),
        "wire_bytes": statistics.median(t["wire_bytes"] for t in traffic),
        "round_trips": statistics.median(t["round_trips"] for t in traffic),
        "handed_connections": max(t["handed_connections"] for t in traffic),
    }
    print(
        f"  through the tunnels, per generated token (the prompt's share included): "
        f"{per_token['bytes']:.0f} bytes ({per_token['wire_bytes']:.0f} compressed on the "
        f"wire), {per_token['round_trips']:.2f} round trips; "
        f"{per_token['handed_connections']:.0f} connections sealed by the engines themselves"
    )
    measured = medians["mesh_at_primary"]["gen_tok_s"]
    error = abs(predicted_tok_s - measured) / measured
    print(
        f"  the planner predicted {predicted_tok_s:.1f} tok/s for the mesh's placement; "
        f"measured {measured:.1f} ({error:.0%} off; target within 15%)"
    )
    return {
        "setups": medians,
        "predicted_tok_s": predicted_tok_s,
        "predicted_vs_measured_error": error,
        "tunnel_per_token": per_token,
        "mesh_vs_direct_rpc_tokens_ratio": medians["mesh_at_primary"]["gen_ratio_vs_direct"],
        "relayed_mesh_vs_direct_rpc_tokens_ratio": medians["mesh_relayed"]["gen_ratio_vs_direct"],
        "rounds": ROUNDS,
        "max_tokens": MAX_TOKENS,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
