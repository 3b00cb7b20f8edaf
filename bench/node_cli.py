"""Driving `sharedllm-node` from benchmarks: the command beside this Python, and `status`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMMAND = str(Path(sys.executable).parent / "sharedllm-node")


def node_status(data_dir: Path, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """`sharedllm-node status --json` of the node running with `data_dir`; `prefix` runs it
    elsewhere (`ip netns exec NAME` for a node in a network namespace)."""
    done = subprocess.run(
        [*prefix, COMMAND, "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
