"""What this node offers the mesh: memory, measured compute speed, engine versions, models."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ..mesh.atomic_file import write_atomic
from .engine.devices import Device
from .engine.locate import EngineInfo

_BENCH_SIZE = 384
_BENCH_SECONDS = 0.3


def measured_gflops(cache_dir: Path) -> float:
    """float32 matrix-multiply speed of this machine, measured once and remembered."""
    cache = cache_dir / "compute_speed.json"
    key = f"{os.cpu_count()}-{_BENCH_SIZE}"
    try:
        known = json.loads(cache.read_text())
        if isinstance(known, dict) and isinstance(known.get(key), float):
            return float(known[key])
    except (OSError, ValueError, RecursionError):
        pass
    rng = np.random.default_rng(0)
    a = rng.standard_normal((_BENCH_SIZE, _BENCH_SIZE), dtype=np.float32)
    b = rng.standard_normal((_BENCH_SIZE, _BENCH_SIZE), dtype=np.float32)
    runs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < _BENCH_SECONDS:
        a @ b
        runs += 1
    gflops = 2 * _BENCH_SIZE**3 * runs / (time.perf_counter() - start) / 1e9
    write_atomic(cache, json.dumps({key: gflops}).encode(), mode=0o644)
    return gflops


def describe(
    engine: EngineInfo,
    gflops: float,
    api_port: int,
    memory_cap_bytes: int | None = None,
    devices: Sequence[Device] = (),
) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "ram_total": memory.total,
        "ram_free": memory.available,
        "vram_total": sum(device.total_bytes for device in devices),
        "devices": [device.as_dict() for device in devices],
        "memory_cap": memory_cap_bytes,
        "gflops": round(gflops, 1),
        "engine_version": engine.version,
        "rpc_protocol": engine.rpc_protocol,
        "api_port": api_port,
        "load": round(os.getloadavg()[0], 2),
    }
