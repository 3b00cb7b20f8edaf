"""GPU benchmark: one model split three ways on a CUDA machine, side by side in one run.

- single: one llama-server holding every layer on the GPU;
- direct: llama-server with `--rpc` straight to two ggml-rpc-servers on the same GPU (plain
  llama.cpp RPC), split exactly as the mesh split it;
- mesh: three `sharedllm-node` processes on loopback whose memory caps force a three-way split;
  the rpc traffic goes through our tunnels over the TLS data plane. The workers hold no model
  file: they fetch their layers' weights from the primary over the mesh (unpaced here).

Models are synthetic (random weights, real shapes, generated once into the user cache): a
Llama-3-8B-shaped one in Q4_K and a llama of Gemma 3 270M's size in Q8_0. Requests are
interleaved round by round; speeds are the engine's own timings; load time is from starting
the processes to the first answered request. Needs a CUDA build of the engine
(`sharedllm-node engine build` on a machine with nvcc and an NVIDIA GPU).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.devices import list_devices
from sharedllm.node.engine.locate import EngineInfo, find_engine, free_loopback_port
from sharedllm.node.models.model_file import inspect_model
from sharedllm.node.tools.synthetic_model import SHAPES, write_synthetic_model
from sharedllm.scheduler.llama_args import split_args
from sharedllm.scheduler.placement import Assignment, Placement

from . import serving_bench
from .serving_bench import _per_token, _started, _tunnel_totals, _wait_http
from .three_nodes import MeshSetup, start_mesh, warm_mesh_loads

ROUNDS = 5
MAX_TOKENS = 128
CONTEXT = 4096
MODELS = (("llama3-8b", "q4_k"), ("gemma3-270m-size", "q8_0"))
PROMPT = " ".join(["The lighthouse keeper climbed the stairs as the storm rolled in."] * 24)
_ENV = {
    **os.environ,
    "GGML_RPC_NO_RDMA": "1",
    "SHAREDLLM_WEIGHT_SHARE_MBPS": "0",
    "SHAREDLLM_SPECULATION": "off",  # compared with plain llama.cpp RPC
}
MESH = MeshSetup(_ENV, CONTEXT)


def _model(shape: str, weight_type: str) -> Path:
    """The synthetic model, written once into the user cache (it is large and reproducible)."""
    path = default_cache_dir() / "bench-models" / f"{shape}-{weight_type}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_model(path, SHAPES[shape], dtype=weight_type)
    return path


def _llama_server(engine: EngineInfo, model: Path, port: int, extra: list[str]) -> list[str]:
    return [
        str(engine.llama_server),
        *("--host", "127.0.0.1", "--port", str(port), "--model", str(model)),
        *("--alias", "bench", "--ctx-size", str(CONTEXT), "--no-webui"),
        *extra,
    ]


def _complete(url: str, model: str, tokens: int = MAX_TOKENS) -> dict[str, float]:
    # ignore_eos: random weights may pick the end token early; every setup makes all tokens
    return serving_bench._complete(url, model, PROMPT, tokens, ignore_eos=True)


def _ready_after(url: str, model: str, started: float) -> float:
    _wait_http(url, timeout_s=900)
    _complete(url, model)
    return time.monotonic() - started


def _mesh_placement(url: str, model_id: str) -> Placement:
    described = httpx.get(url + "/mesh/peers", timeout=5).json()["models"][model_id]
    assignments = tuple(
        Assignment(a["node"], a["first_layer"], a["last_layer"], 0)
        for a in described["assignments"]
    )
    return Placement(model_id, described["primary"], assignments, 0, 0.0, 0.0)


def _start_direct(
    stack: ExitStack,
    engine: EngineInfo,
    work: Path,
    model: Path,
    placement: Placement,
    *,
    gpus: int,
) -> str:
    """Two ggml-rpc-servers on the GPU and a llama-server splitting as the mesh did."""
    rpc_ports = [free_loopback_port() for _ in placement.workers]
    for index, port in enumerate(rpc_ports):
        argv = [str(engine.rpc_server), "-H", "127.0.0.1", "-p", str(port)]
        stack.enter_context(_started(argv, work / f"rpc{index}.log", _ENV))
    _await_accepting(rpc_ports)
    devices = {node: max(gpus, 1) for node in placement.workers} | {placement.primary: gpus}
    layer_count = sum(a.layer_count for a in placement.assignments)
    split = split_args(placement, layer_count, devices)
    port = free_loopback_port()
    argv = _llama_server(engine, model, port, split.argv([f"127.0.0.1:{p}" for p in rpc_ports]))
    stack.enter_context(_started(argv, work / "direct.log", _ENV))
    return f"http://127.0.0.1:{port}"


def _await_accepting(ports: list[int], timeout_s: float = 60.0) -> None:
    """Until every port takes a connection (an rpc-server on a GPU starts in about a second):
    llama-server would give up on a worker that is not listening yet."""
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no rpc-server listening on port {port}") from None
                time.sleep(0.02)


def _bench_model(engine: EngineInfo, shape: str, weight_type: str, gpus: int) -> dict[str, Any]:
    """All three setups for one model; `gpus` is how many the engine sees (0 checks the
    harness on a CPU)."""
    model = _model(shape, weight_type)
    profile = inspect_model(model).profile
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-gpu-bench-"))
    urls: dict[str, str] = {}
    load_s: dict[str, float] = {}
    try:
        with ExitStack() as stack:
            started = time.monotonic()
            port = free_loopback_port()
            all_layers = ["--n-gpu-layers", str(profile.layer_count + 1 if gpus else 0)]
            argv = _llama_server(engine, model, port, all_layers)
            stack.enter_context(_started(argv, work / "single.log", _ENV))
            urls["single"] = f"http://127.0.0.1:{port}"
            load_s["single"] = _ready_after(urls["single"], "bench", started)
            load_s |= warm_mesh_loads(work / "warm", model, profile, MESH, _ready_after)
            _print_log_tails(work / "warm", lines=40)  # where a warm load spends its time
            started = time.monotonic()
            urls["mesh_at_primary"] = start_mesh(stack, work, model, profile, MESH)[0]
            load_s["mesh"] = _ready_after(urls["mesh_at_primary"], model_id, started)
            placement = _mesh_placement(urls["mesh_at_primary"], model_id)
            started = time.monotonic()
            urls["direct"] = _start_direct(stack, engine, work, model, placement, gpus=gpus)
            load_s["direct"] = _ready_after(urls["direct"], "bench", started)
            measured = _measure(urls, model_id)
    except Exception:
        _print_log_tails(work)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(model, placement, measured, load_s)


def _measure(urls: dict[str, str], model_id: str) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    traffic: list[dict[str, Any]] = []
    for _ in range(ROUNDS):
        for name, url in urls.items():
            asked = model_id if name.startswith("mesh") else "bench"
            if name == "mesh_at_primary":
                sample, generation = _generation_traffic(url, model_id)
                traffic.append(generation)
            else:
                sample = _complete(url, asked)
            samples[name].append(sample)
    return {"samples": samples, "traffic": traffic}


def _generation_traffic(url: str, model_id: str) -> tuple[dict[str, float], dict[str, Any]]:
    """A completion's timings, and what crossed the tunnels per generated token: the traffic of
    the whole completion less that of the same prompt with one token (the prompt's share)."""
    start = _tunnel_totals(url, model_id)
    _complete(url, model_id, tokens=1)
    middle = _tunnel_totals(url, model_id)
    sample = _complete(url, model_id)
    end = _tunnel_totals(url, model_id)
    prompt, whole = _per_token(start, middle, 1), _per_token(middle, end, 1)
    tokens = MAX_TOKENS - 1
    generation: dict[str, Any] = {
        key: (whole[key] - prompt[key]) / tokens for key in ("bytes", "wire_bytes", "round_trips")
    }
    generation["requests"] = {
        command: {
            field: (figures[field] - prompt["requests"].get(command, {}).get(field, 0)) / tokens
            for field in ("requests", "bytes")
        }
        for command, figures in whole["requests"].items()
    }
    return sample, generation


def _report(
    model: Path, placement: Placement, measured: dict[str, Any], load_s: dict[str, float]
) -> dict[str, Any]:
    shape, _, weight_type = model.name.removesuffix(".gguf").rpartition("-")
    samples: dict[str, list[dict[str, float]]] = measured["samples"]
    setups = {name: _medians(runs) for name, runs in samples.items()}
    mesh, direct = setups["mesh_at_primary"], setups["direct"]
    gen_ratio = mesh["gen_tok_s"] / direct["gen_tok_s"]
    prompt_ratio = mesh["prompt_tok_s"] / direct["prompt_tok_s"]
    traffic = measured["traffic"]
    layers = {a.node[-6:]: a.layer_count for a in placement.assignments}
    result = {
        "model_shape": shape,
        "weight_type": weight_type,
        "model_bytes": model.stat().st_size,
        "layers": layers,
        "setups": setups,
        "load_s": load_s,
        "tunnel_bytes_per_token": statistics.median(t["bytes"] for t in traffic),
        "tunnel_wire_bytes_per_token": statistics.median(t["wire_bytes"] for t in traffic),
        "tunnel_round_trips_per_token": statistics.median(t["round_trips"] for t in traffic),
        "tunnel_requests_per_token": traffic[-1]["requests"],
        "mesh_vs_direct_gen_ratio": gen_ratio,
        "mesh_vs_direct_prompt_ratio": prompt_ratio,
        # the members starting again (the daily case) and forming (invite, engine timing)
        "mesh_warm_vs_direct_load_ratio": load_s["mesh_warm"] / load_s["direct"],
        "mesh_forming_vs_direct_load_ratio": load_s["mesh_warm_forming"] / load_s["direct"],
        # The workers' layers over the whole fetch-path load: a lower bound of the fetch's pace
        "fetch_mb_per_s_at_least": _worker_bytes(model, placement) / load_s["mesh"] / 1e6,
    }
    print(
        f"gpu: {shape} ({weight_type}, {model.stat().st_size / 1024**3:.2f} GiB), "
        f"split {'/'.join(str(c) for c in layers.values())} layers, {ROUNDS} rounds"
    )
    print(f"  {'setup':<16} {'gen tok/s':>10} {'prompt tok/s':>13} {'load s':>8}")
    for name, figures in setups.items():
        load = load_s.get(name.removesuffix("_at_primary"), float("nan"))
        print(
            f"  {name:<16} {figures['gen_tok_s']:>10.1f} {figures['prompt_tok_s']:>13.1f} "
            f"{load:>8.1f}"
        )
    print(
        f"  load, workers holding the file: mesh restarting / direct "
        f"{result['mesh_warm_vs_direct_load_ratio']:.2f} (target <= 1.5; "
        f"{load_s['mesh_warm']:.1f} s), forming / direct "
        f"{result['mesh_forming_vs_direct_load_ratio']:.2f} ({load_s['mesh_warm_forming']:.1f} s); "
        f"fetch path at least {result['fetch_mb_per_s_at_least']:.0f} MB/s"
    )
    print(
        f"  mesh / direct: generation {gen_ratio:.3f}, prompt {prompt_ratio:.3f}; through the "
        f"tunnels per token: {result['tunnel_bytes_per_token']:.0f} bytes "
        f"({result['tunnel_wire_bytes_per_token']:.0f} on the wire), "
        f"{result['tunnel_round_trips_per_token']:.2f} round trips"
    )
    for command, figures in sorted(result["tunnel_requests_per_token"].items()):
        requests, size = figures["requests"], figures["bytes"]
        print(f"    {command:<16} {requests:>7.2f} requests {size:>10.0f} bytes per token")
    return result


def _worker_bytes(model: Path, placement: Placement) -> int:
    weights = inspect_model(model).profile.layer_weight_bytes
    return sum(
        sum(weights[a.first_layer : a.last_layer + 1])
        for a in placement.assignments
        if a.node != placement.primary
    )


def _medians(runs: list[dict[str, float]]) -> dict[str, Any]:
    speeds = [s["gen_tok_s"] for s in runs]
    return {
        "gen_tok_s": statistics.median(speeds),
        "gen_tok_s_min_max": [min(speeds), max(speeds)],
        "prompt_tok_s": statistics.median(s["prompt_tok_s"] for s in runs),
    }


def _print_log_tails(work: Path, lines: int = 25) -> None:
    """What each process said last, so that a failed run on a remote GPU machine explains
    itself."""
    for log in sorted(work.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log.name} (last {len(tail)} lines)", *tail, sep="\n", file=sys.stderr)


def run() -> dict[str, Any]:
    engine = find_engine(default_cache_dir(), None)
    devices = list_devices(engine.llama_server)
    if not devices:
        print("gpu: skipped, the engine lists no GPU (build it where CUDA or Metal is present)")
        return {"skipped": "no GPU"}
    results = [
        _bench_model(engine, shape, weight_type, len(devices)) for shape, weight_type in MODELS
    ]
    return {
        "devices": [device.as_dict() for device in devices],
        "driver": _driver(),
        "engine_version": engine.version,
        "models": results,
        "mesh_vs_direct_rpc_tokens_ratio_gpu": results[0]["mesh_vs_direct_gen_ratio"],
        # Issue 26's headlines: the smaller of the two models' figures (the larger for load)
        "gpu_mesh_vs_direct_tokens_ratio": min(r["mesh_vs_direct_gen_ratio"] for r in results),
        "gpu_mesh_vs_direct_prompt_ratio": min(r["mesh_vs_direct_prompt_ratio"] for r in results),
        "gpu_mesh_vs_direct_load_ratio": max(r["mesh_warm_vs_direct_load_ratio"] for r in results),
    }


def _driver() -> str | None:
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None
