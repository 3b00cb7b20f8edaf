"""What a tunnel's connections carried: counted per message on the Python path, and read from
the native relay's counters (live while it runs, added up when it ends)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .native_relay import RPC_COMMANDS, RelayCounters

_TOTALS = ("bytes_out", "bytes_back", "wire_out", "wire_back", "round_trips")


@dataclass
class TunnelStats:
    """Bytes each way (as the services sent them, and as the wire carried them), and round
    trips: how often the traffic turned from out to back."""

    bytes_out: int = 0
    bytes_back: int = 0
    wire_out: int = 0
    wire_back: int = 0
    round_trips: int = 0
    connections: int = 0
    native_connections: int = 0  # of `connections`, those relayed natively or handed over
    handed_connections: int = 0  # of those, the ones an engine seals itself (engine_handoff)
    refused_local: int = 0  # loopback connections from processes other than the engine's
    _last_direction: int = field(default=0, repr=False)
    _live: list[tuple[RelayCounters, bool]] = field(default_factory=list, repr=False)
    _rpc_ended: list[list[int]] = field(
        default_factory=lambda: [[0, 0] for _ in range(RPC_COMMANDS)], repr=False
    )

    def count(self, direction: int, size: int, wire: int) -> None:
        if direction > 0:
            self.bytes_out += size
            self.wire_out += wire
        else:
            self.bytes_back += size
            self.wire_back += wire
            if self._last_direction > 0:
                self.round_trips += 1
        self._last_direction = direction

    def relaying(self, counters: RelayCounters, outward: bool) -> None:
        """A native relay started counting into `counters`; `outward` on the side that opened
        the tunnel (elsewhere the relay's "out", its local side's bytes, are our "back")."""
        self.native_connections += 1
        self._live.append((counters, outward))

    def relayed(self, counters: RelayCounters) -> None:
        """The native relay counting into `counters` ended: its counts join the totals."""
        ended = [entry for entry in self._live if entry[0] is counters]
        self._live = [entry for entry in self._live if entry[0] is not counters]
        for name, value in _oriented(*ended[0]).items():
            setattr(self, name, getattr(self, name) + value)
        for command, entry in enumerate(self._rpc_ended):
            entry[0] += int(counters.rpc_requests[command])
            entry[1] += int(counters.rpc_bytes[command])

    def native_rpc_counts(self) -> dict[int, tuple[int, int]]:
        """llama.cpp RPC requests the native relays counted: command -> (requests, bytes)."""
        found: dict[int, tuple[int, int]] = {}
        for command, (ended_requests, ended_bytes) in enumerate(self._rpc_ended):
            requests = ended_requests + sum(int(c.rpc_requests[command]) for c, _ in self._live)
            size = ended_bytes + sum(int(c.rpc_bytes[command]) for c, _ in self._live)
            if requests:
                found[command] = (requests, size)
        return found

    def as_dict(self) -> dict[str, int]:
        live = dict.fromkeys(_TOTALS, 0)
        for counters, outward in self._live:
            for name, value in _oriented(counters, outward).items():
                live[name] += value
        return {
            **{name: getattr(self, name) + live[name] for name in _TOTALS},
            "connections": self.connections,
            "native_connections": self.native_connections,
            "handed_connections": self.handed_connections,
            "refused_local": self.refused_local,
        }


def _oriented(counters: RelayCounters, outward: bool) -> dict[str, int]:
    """The relay's counts with "out" as the tunnel's opener sent it."""
    found = {name: int(getattr(counters, name)) for name in _TOTALS}
    if not outward:
        found["bytes_out"], found["bytes_back"] = found["bytes_back"], found["bytes_out"]
        found["wire_out"], found["wire_back"] = found["wire_back"], found["wire_out"]
    return found
