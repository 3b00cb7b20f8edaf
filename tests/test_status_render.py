"""The status command's placement lines: each worker's layers, memory and tunnel, with how the
tunnel is carried (sealed by the engines, relayed in C, or in Python)."""

from __future__ import annotations

from typing import Any

import pytest
from sharedllm.node.cli.render import print_placement

PRIMARY, WORKER = "12D3KooWprimaryprimary01", "12D3KooWworkerworker0002"


def _entry(traffic: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": "serving",
        "primary": PRIMARY,
        "epoch": 3,
        "assignments": [
            {"node": PRIMARY, "first_layer": 0, "last_layer": 8},
            {"node": WORKER, "first_layer": 9, "last_layer": 17},
        ],
        "tunnels": {WORKER: traffic},
    }


@pytest.mark.parametrize(
    ("counts", "said"),
    [
        (
            {"connections": 2, "native_connections": 2, "handed_connections": 2},
            "sealed by the engines",
        ),
        ({"connections": 2, "native_connections": 2, "handed_connections": 0}, "relayed natively"),
        ({"connections": 1, "native_connections": 0}, "relayed in Python"),
    ],
)
def test_a_workers_line_says_how_its_tunnel_is_carried(
    capsys: pytest.CaptureFixture[str], counts: dict[str, int], said: str
) -> None:
    traffic = {"bytes_out": 2_000_000, "bytes_back": 500_000, "round_trips": 40, **counts}
    print_placement("gemma", _entry(traffic), {PRIMARY: "mac", WORKER: "pc"})
    worker_line = next(line for line in capsys.readouterr().out.splitlines() if "pc " in line)
    assert "layers 9-17" in worker_line and "2.0 MB out / 0.5 MB back" in worker_line
    assert worker_line.endswith(f"40 round trips, {said}")
