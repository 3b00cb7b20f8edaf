"""The engine's compute devices (GPUs), as `llama-server --list-devices` reports them.

A CPU-only build lists none. A CUDA or Metal build lists each device with its memory, which the
node gossips so that the planner places layers by VRAM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .locate import EngineProbeError, llama_server_output

_DEVICE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
_MIB = 1024**2
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    total_bytes: int
    free_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "total": self.total_bytes,
            "free": self.free_bytes,
        }


def parse_device_list(output: str) -> list[Device]:
    devices = []
    for line in output.splitlines():
        if found := _DEVICE.match(line):
            name, description, total, free = found.groups()
            devices.append(Device(name, description, int(total) * _MIB, int(free) * _MIB))
    return devices


def gossiped_device_count(state: Mapping[str, Any]) -> int:
    """How many engine devices a node gossiped (0: it computes on its CPU)."""
    devices = state.get("devices")
    return len(devices) if isinstance(devices, list) else 0


def gossiped_device_names(state: Mapping[str, Any]) -> list[str]:
    """The names of the engine devices a node gossiped (`CUDA0`, ...), as llama.cpp knows them."""
    devices = state.get("devices")
    if not isinstance(devices, list):
        return []
    names = [device.get("name") for device in devices if isinstance(device, dict)]
    return [name for name in names if isinstance(name, str)]


def list_devices(llama_server: Path) -> list[Device]:
    """The engine's devices; none if it cannot say (the node then lends RAM only)."""
    try:
        return parse_device_list(llama_server_output(llama_server, "--list-devices", _TIMEOUT_S))
    except EngineProbeError:
        return []
