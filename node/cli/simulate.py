"""`sharedllm-node simulate`: the simulator's front door (the one place production reaches it)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .common import CommandError
from .render import agreement

if TYPE_CHECKING:
    from ...simnet.scenarios import Report


def cmd_simulate(args: argparse.Namespace) -> int:
    from ...simnet.scenarios import SCENARIOS, simulate

    if args.scenario not in SCENARIOS:
        raise CommandError(f"unknown scenario {args.scenario!r} (known: {', '.join(SCENARIOS)})")
    if not 2 <= args.nodes <= 5000:
        raise CommandError("--nodes must be between 2 and 5000")
    if not 0.0 <= args.loss < 0.5:
        raise CommandError("--loss must be between 0 and 0.5")
    report = simulate(args.scenario, args.nodes, args.seed, loss=args.loss)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    rows = [
        ("scenario", f"{report.scenario}, {report.nodes} nodes, seed {report.seed}"),
        ("converged", "yes" if report.converged else "NO"),
        (
            "convergence",
            f"{seconds(report.convergence_s)} virtual, {report.rounds or 0:.1f} rounds",
        ),
        ("failure detection", seconds(report.failure_detection_s)),
        ("recovery", seconds(report.recovery_s)),
        ("false suspicions", str(report.false_suspicions)),
        (
            "elections",
            f"{report.elections} (epochs with two primaries: {report.election_safety_violations})",
        ),
        ("placements agree", agreement(report)),
        (
            "per node per s",
            f"{report.messages_per_node_per_s:.1f} messages, "
            f"{report.bytes_per_node_per_s / 1024:.1f} KiB",
        ),
        ("time", f"{report.virtual_s:.1f} s virtual in {report.wall_s:.1f} s wall"),
        ("trace digest", report.trace_digest),
    ]
    if report.scenario == "demand":
        rows += _demand_rows(report)
    for label, value in rows:
        print(f"{label:<18} {value}")
    for note in report.notes:
        print(f"note: {note}")
    broken = sum(report.invariant_violations.values())
    return 0 if report.converged and not broken else 1


def _demand_rows(report: Report) -> list[tuple[str, str]]:
    """The demand scenario's figures: invariants, requests, and replicas against demand."""
    violations = ", ".join(f"{k} {v}" for k, v in sorted(report.invariant_violations.items()))
    rows = [
        ("invariants broken", violations),
        ("requests", f"{report.requests_routed} routed, {report.requests_unserved} unserved"),
        ("replica tracking", f"{report.replica_tracking_misses} samples off the demand's count"),
    ]
    for model_id, series in sorted(report.replica_counts.items()):
        counts = "".join(str(int(count)) for _, count, _ in series[::3])
        rows.append((model_id[-18:], f"replicas every 30 s: {counts}"))
    return rows
