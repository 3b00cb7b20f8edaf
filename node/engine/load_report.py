"""What llama-server's log says about where a model's layers landed (pure).

llama-server prints, while loading, how many layers it offloaded and the size of the weight
buffer on each device; an RPC device is named after its endpoint (`RPC0[127.0.0.1:PORT]`), which
on the primary is the tunnel listener of one worker. Comparing those sizes with the planned
layers' bytes tells whether the engine did what the planner meant. A draft model loads after
the model and prints the same lines: the report keeps the first of each, the model's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_MODEL_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_RPC_DEVICE = re.compile(r"^RPC\d*\[(.+)\]$")
_MIB = 1024**2
# Buffers round each tensor up to an alignment and add a few small tensors (norms): allow that.
_TOLERANCE_FRACTION = 0.03
_TOLERANCE_BYTES = 2 * _MIB


@dataclass
class LoadReport:
    offloaded: int | None = None
    buffers: dict[str, int] = field(default_factory=dict)  # device -> bytes
    loads_seen: int = 0  # models whose load was reported: the model's, then its draft's

    def restart(self) -> None:
        """The engine starts again: its log tells everything anew."""
        self.offloaded, self.buffers, self.loads_seen = None, {}, 0

    def feed(self, line: str) -> None:
        """One line of the log; a model's buffer sizes follow its count of offloaded layers."""
        if found := _OFFLOADED.search(line):
            self.loads_seen += 1
            if self.loads_seen == 1:
                self.offloaded = int(found.group(1))
        elif (found := _MODEL_BUFFER.search(line)) and self.loads_seen <= 1:
            self.buffers[found.group(1)] = int(float(found.group(2)) * _MIB)

    def rpc_buffers(self) -> dict[str, int]:
        """Weight bytes per RPC endpoint."""
        found: dict[str, int] = {}
        for device, size in self.buffers.items():
            if match := _RPC_DEVICE.match(device):
                found[match.group(1)] = found.get(match.group(1), 0) + size
        return found

    def problem(self, n_gpu_layers: int, planned_bytes: Mapping[str, int]) -> str | None:
        """Why the load differs from the plan (`planned_bytes`: weights per RPC endpoint), or
        None when it matches."""
        if not planned_bytes:
            return None  # everything local: nothing to cross-check
        if self.offloaded is None:
            return "llama-server did not report how many layers it offloaded"
        if self.offloaded != n_gpu_layers:
            return f"llama-server offloaded {self.offloaded} layers, the plan says {n_gpu_layers}"
        loaded = self.rpc_buffers()
        for endpoint, planned in planned_bytes.items():
            got = loaded.get(endpoint)
            if got is None:
                return f"llama-server put no weights on {endpoint}"
            if abs(got - planned) > planned * _TOLERANCE_FRACTION + _TOLERANCE_BYTES:
                return (
                    f"llama-server put {got / _MIB:.1f} MiB on {endpoint}, "
                    f"the plan says {planned / _MIB:.1f} MiB"
                )
        return None
