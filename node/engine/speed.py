"""This machine's speed as the engine shows it, for the planner's cost model.

Generating a token is mostly reading weights, at the thread count and on the devices the engine
will really use; a matrix-multiply benchmark on all cores measures something else (on a 2-core
machine it predicted engines running one thread each 30-108% wrong). So each node runs its own
llama-server once on the embedded default model, times a short generation, and announces the
speed at which the cost model predicts exactly that (`CostModel.gflops_for`). The result is
remembered per engine, thread count and model; nodes starting together measure one at a time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
from pathlib import Path

import httpx

from ...mesh.atomic_file import write_atomic
from ...scheduler.cost_model import CostModel
from ...scheduler.model_profile import ModelProfile
from .health import Health, wait_for_health
from .locate import EngineInfo, free_loopback_port
from .supervisor import popen_tied_to_node, stop_group

_log = logging.getLogger("sharedllm.node.speed")
_TOKENS = 48
_READY_TIMEOUT_S = 120.0
_PROMPT = "Count slowly from one to one hundred, one number per line:"


class EngineSpeedError(Exception):
    """The engine could not be timed (it did not start or did not answer)."""


def engine_gflops(
    engine: EngineInfo,
    model: Path,
    profile: ModelProfile,
    *,
    threads: int,
    gpu_layers: bool,
    cache_dir: Path,
) -> float:
    """The cost model's speed for this node, measured once per engine, threads and model."""
    cache = cache_dir / "engine_speed.json"
    key = f"{engine.llama_server}|{engine.version}|{threads}|{gpu_layers}|{model.stat().st_size}"
    with (cache_dir / ".engine_speed.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read(cache)
        remembered = known.get(key)
        if isinstance(remembered, float):
            return remembered
        tokens_per_s = _measure(engine, model, threads, gpu_layers, cache_dir / "engine_speed.log")
        gflops = CostModel().gflops_for(profile, tokens_per_s)
        _log.info(
            "engine generates %.1f tokens/s on %s with %d threads: speed %.1f",
            tokens_per_s,
            model.name,
            threads,
            gflops,
        )
        write_atomic(cache, json.dumps({**known, key: gflops}).encode(), mode=0o644)
        return gflops


def _read(cache: Path) -> dict[str, object]:
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return known if isinstance(known, dict) else {}


def _measure(engine: EngineInfo, model: Path, threads: int, gpu_layers: bool, log: Path) -> float:
    port = free_loopback_port()
    argv = [
        str(engine.llama_server),
        *("--host", "127.0.0.1", "--port", str(port), "--model", str(model)),
        *("--ctx-size", "512", "--threads", str(threads), "--no-webui"),
        *("--n-gpu-layers", "999" if gpu_layers else "0"),
    ]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        # Tied to the node like every engine it runs: `kill -9` of the node mid-timing leaves
        # no llama-server behind.
        process = popen_tied_to_node(argv, stdout=output)
        try:
            _wait_ready(process, url, log)
            _generate(url)  # the first run pays for warming caches
            return max(_generate(url) for _ in range(3))
        finally:
            stop_group(process, grace_s=10)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    health = wait_for_health(url, _READY_TIMEOUT_S, lambda: process.poll() is not None)
    if health is Health.EXITED:
        raise EngineSpeedError(f"llama-server exited with {process.returncode}; see {log}")
    if health is Health.TIMED_OUT:
        waited = f"{_READY_TIMEOUT_S:.0f} s"
        raise EngineSpeedError(f"llama-server was not ready after {waited}; see {log}")


def _generate(url: str) -> float:
    body = {"prompt": _PROMPT, "n_predict": _TOKENS, "ignore_eos": True, "temperature": 0}
    try:
        answer = httpx.post(url + "/completion", json=body, timeout=120).json()
        speed = float(answer["timings"]["predicted_per_second"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
        raise EngineSpeedError(f"llama-server did not time a generation: {err}") from None
    if not speed > 0:
        raise EngineSpeedError(f"llama-server timed {speed} tokens/s")
    return speed
