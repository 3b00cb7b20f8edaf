"""`python -m bench`: runs the benchmarks side by side and writes JSON to bench/results/."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import psutil
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import EngineNotFoundError, EngineProbeError, find_engine

from . import (
    chaos_bench,
    failover_bench,
    fuzz_bench,
    gpu_bench,
    hello_flood_bench,
    load_bench,
    planner_bench,
    scale_bench,
    serving_bench,
    simnet_bench,
    speculation_bench,
    split_bench,
    transport_bench,
    warm_load_bench,
)

RESULTS = Path(__file__).parent / "results"
SUITES = {
    "chaos": chaos_bench.run,
    "failover": failover_bench.run,
    "fuzz": fuzz_bench.run,
    "gpu": gpu_bench.run,
    "hello_flood": hello_flood_bench.run,
    "load": load_bench.run,
    "planner": planner_bench.run,
    "scale": scale_bench.run,
    "serving": serving_bench.run,
    "simnet": simnet_bench.run,
    "speculation": speculation_bench.run,
    "split": split_bench.run,
    "transport": transport_bench.run,
    "warm_load": warm_load_bench.run,
}
# The headline figures, copied to the top level of the JSON from the suite that measures them.
HEADLINE = (
    "mesh_vs_direct_rpc_tokens_ratio",
    "warm_load_bytes_ratio",
    "warm_vs_cold_load_speedup",
    "predicted_vs_measured_error",
    "failover_s",
    "hello_flood_rss_growth_mib",
    "chaos_worker_recovery_s",
    "chaos_primary_recovery_s",
    "parallel_slots_tokens_ratio",
    "two_replicas_tokens_ratio",
    "speculative_vs_direct_tokens_ratio",
    "speculative_free_chat_ratio",
    "speculative_predicted_vs_measured_error",
    "tunnel_vs_tls_round_trip_ratio",
    "gpu_mesh_vs_direct_tokens_ratio",
    "gpu_mesh_vs_direct_prompt_ratio",
    "gpu_mesh_vs_direct_load_ratio",
    "mesh_restart_vs_direct_load_ratio_cpu",
    "planner_vs_memory_proportional_measured",
)


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
        "engine": _engine(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _engine() -> dict[str, str] | str:
    """The engine the benchmarks run: versions, and our build's changes to it if it is ours."""
    try:
        return find_engine(default_cache_dir(), None).as_dict()
    except (EngineNotFoundError, EngineProbeError) as err:
        return f"none ({err})"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(SUITES), action="append", help="run only these")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON result")
    args = parser.parse_args()
    chosen = args.only or sorted(SUITES)
    results: dict[str, Any] = {"machine": machine()}
    for name in chosen:
        results[name] = SUITES[name]()
        for key in HEADLINE:
            if key in results[name]:
                results[key] = results[name][key]
        print()
    for key in HEADLINE:
        results.setdefault(key, None)  # not measured in this run (see --only)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
