"""Load benchmark (CPU): from starting the processes to the first answer of a model split in
three, where every machine holds the model file (the warm path), side by side in one run:

- direct: two ggml-rpc-servers and a llama-server with `--rpc` to them, split as the mesh split
  (plain llama.cpp RPC, started as fast as it can be: the server as soon as both workers
  listen);
- mesh forming: three `sharedllm-node` processes, the founder, an invite and two joins;
- mesh starting again: the same three members started together, as after a reboot.

The model is a llama of Gemma 3 270M's size (Q8_0, synthetic); the first answer is a few tokens,
so that the figures are the start-up path rather than this CPU's compute. The GPU bench times
the same paths on a GPU with a longer answer (`gpu_mesh_vs_direct_load_ratio`).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.health import Health, wait_for_health
from sharedllm.node.engine.locate import find_engine
from sharedllm.node.models.model_file import inspect_model
from sharedllm.scheduler.placement import Assignment, Placement

from . import serving_bench
from .gpu_bench import MESH, _model, _print_log_tails, _start_direct
from .three_nodes import thirds, warm_mesh_loads

ROUNDS = 2
ANSWER_TOKENS = 4


def _ready_after(url: str, model: str, started: float) -> float:
    """Seconds from `started` to a short answer (health polled every 50 ms)."""
    if wait_for_health(url, 600, interval_s=0.05) is not Health.READY:
        raise RuntimeError(f"{url} not ready after 600 s")
    serving_bench._complete(url, model, "Hello", ANSWER_TOKENS, ignore_eos=True)
    return time.monotonic() - started


def _thirds_placement(model_id: str, layer_count: int) -> Placement:
    """The split the mesh makes of this model on a CPU (its caps force thirds): the primary's
    layers first, then each worker's."""
    counts, first, assignments = thirds(layer_count), 0, []
    for node, count in zip(("primary", "worker-1", "worker-2"), counts, strict=True):
        assignments.append(Assignment(node, first, first + count - 1, 0))
        first += count
    return Placement(model_id, "primary", tuple(assignments), 0, 0.0, 0.0)


def _round(work: Path, model: Path) -> dict[str, float]:
    profile = inspect_model(model).profile
    model_id = model.name.removesuffix(".gguf")
    loads = warm_mesh_loads(work / "warm", model, profile, MESH, _ready_after)
    engine = find_engine(default_cache_dir(), None)
    placement = _thirds_placement(model_id, profile.layer_count)
    with ExitStack() as stack:
        started = time.monotonic()
        url = _start_direct(stack, engine, work / "direct", model, placement, gpus=0)
        loads["direct"] = _ready_after(url, "bench", started)
    return loads


def run() -> dict[str, Any]:
    model = _model("gemma3-270m-size", "q8_0")
    runs = []
    for index in range(ROUNDS):
        work = Path(tempfile.mkdtemp(prefix="sharedllm-load-bench-"))
        (work / "direct").mkdir()
        try:
            runs.append(_round(work, model))
        except Exception:
            _print_log_tails(work / "warm")
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        figures = ", ".join(f"{key} {seconds:.1f} s" for key, seconds in runs[-1].items())
        print(f"load: round {index + 1}: {figures}")
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    restart = median["mesh_warm"] / median["direct"]
    forming = median["mesh_warm_forming"] / median["direct"]
    print(
        f"load (CPU, {model.name}, {ROUNDS} rounds, medians): direct {median['direct']:.1f} s, "
        f"mesh starting again {median['mesh_warm']:.1f} s ({restart:.2f}x), mesh forming "
        f"{median['mesh_warm_forming']:.1f} s ({forming:.2f}x)",
        file=sys.stdout,
    )
    return {
        "model": model.name,
        "rounds": runs,
        "load_s": median,
        "mesh_restart_vs_direct_load_ratio_cpu": restart,
        "mesh_forming_vs_direct_load_ratio_cpu": forming,
    }
