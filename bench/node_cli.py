"""Driving `sharedllm-node` from benchmarks: the command beside this Python, and `status`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMAND = str(Path(sys.executable).parent / "sharedllm-node")


def node_status(data_dir: Path) -> dict[str, Any]:
    """`sharedllm-node status --json` of the node running with `data_dir`."""
    done = subprocess.run(
        [COMMAND, "status", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
