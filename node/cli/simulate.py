"""`sharedllm-node simulate`: the simulator's front door (the one place production reaches it)."""

from __future__ import annotations

import argparse
import json

from .common import CommandError
from .render import agreement


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
    for label, value in rows:
        print(f"{label:<18} {value}")
    for note in report.notes:
        print(f"note: {note}")
    return 0 if report.converged else 1
