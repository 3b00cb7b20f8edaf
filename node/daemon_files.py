"""The file a running node leaves in its data directory so that local commands can find it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..mesh.atomic_file import write_atomic
from .config import NodeConfig

RUNNING_FILE = "running.json"
_MAX_RUNNING_FILE_BYTES = 4096


def record_running(data_dir: Path, api_url: str) -> None:
    body = {"api_url": api_url, "pid": os.getpid()}
    write_atomic(data_dir / RUNNING_FILE, json.dumps(body).encode(), mode=0o644)


def clear_running(data_dir: Path) -> None:
    (data_dir / RUNNING_FILE).unlink(missing_ok=True)


def running_api_url(config: NodeConfig) -> str:
    """The API of the node running on `config.data_dir`, else the configured port."""
    try:
        with (config.data_dir / RUNNING_FILE).open("rb") as file:
            recorded = json.loads(file.read(_MAX_RUNNING_FILE_BYTES))
        url = recorded["api_url"]
        if isinstance(url, str) and url.startswith("http://"):
            return url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # no node recorded here, or a damaged record: try the configured port
    return f"http://127.0.0.1:{config.api_port}"
