"""Simulator benchmark: wall-clock seconds per simulated minute, and gossip traffic per node.

Runs the steady scenario (join, converge, then a quiet minute) at each size, same seed, and
prints the cost of a virtual minute over the whole run (joining included) and of the formed
mesh alone. Target (issue 7): 1000 nodes simulate a virtual minute in under a minute of wall
time on 2 cores.
"""

from __future__ import annotations

import os
from typing import Any

from sharedllm.simnet.scenarios import simulate

SIZES = tuple(int(n) for n in os.environ.get("SHAREDLLM_BENCH_SIM_SIZES", "100,1000").split(","))


def run() -> dict[str, Any]:
    print(f"simnet: steady scenario, seed 1, sizes {', '.join(map(str, SIZES))}")
    print(
        f"  {'nodes':>6} {'converge s':>11} {'wall s/virtual min':>19} {'(formed mesh)':>14} "
        f"{'KiB/node/s':>11} {'msgs/node/s':>12}"
    )
    results: dict[str, Any] = {}
    for nodes in SIZES:
        report = simulate("steady", nodes, seed=1, steady_s=60.0)
        per_minute = report.wall_s / report.virtual_s * 60.0  # joining included
        formed = report.steady_wall_s_per_virtual_minute or float("nan")
        results[str(nodes)] = {
            "convergence_s": report.convergence_s,
            "wall_s_per_virtual_minute": per_minute,
            "formed_mesh_wall_s_per_virtual_minute": report.steady_wall_s_per_virtual_minute,
            "bytes_per_node_per_s": report.bytes_per_node_per_s,
            "messages_per_node_per_s": report.messages_per_node_per_s,
            "false_suspicions": report.false_suspicions,
            "virtual_s": report.virtual_s,
            "wall_s": report.wall_s,
        }
        print(
            f"  {nodes:>6} {report.convergence_s or float('nan'):>11.1f} {per_minute:>19.1f} "
            f"{formed:>14.1f} "
            f"{report.bytes_per_node_per_s / 1024:>11.1f} {report.messages_per_node_per_s:>12.1f}"
        )
    return results
