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
    native_connections: int = 0  # of `connections`, those relayed natively
    refused_local: int = 0  # loopback connections from processes other than the engine's
    _last_direction: int = field(default=0, repr=False)
    _live: list[RelayCounters] = field(default_factory=list, repr=False)
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

    def relaying(self, counters: RelayCounters) -> None:
        """A native relay started counting into `counters`."""
        self.native_connections += 1
        self._live.append(counters)

    def relayed(self, counters: RelayCounters) -> None:
        """The native relay counting into `counters` ended: its counts join the totals."""
        self._live = [c for c in self._live if c is not counters]
        for name in _TOTALS:
            setattr(self, name, getattr(self, name) + int(getattr(counters, name)))
        for command, entry in enumerate(self._rpc_ended):
            entry[0] += int(counters.rpc_requests[command])
            entry[1] += int(counters.rpc_bytes[command])

    def native_rpc_counts(self) -> dict[int, tuple[int, int]]:
        """llama.cpp RPC requests the native relays counted: command -> (requests, bytes)."""
        found: dict[int, tuple[int, int]] = {}
        for command, (ended_requests, ended_bytes) in enumerate(self._rpc_ended):
            requests = ended_requests + sum(int(c.rpc_requests[command]) for c in self._live)
            size = ended_bytes + sum(int(c.rpc_bytes[command]) for c in self._live)
            if requests:
                found[command] = (requests, size)
        return found

    def as_dict(self) -> dict[str, int]:
        live = {name: sum(int(getattr(c, name)) for c in self._live) for name in _TOTALS}
        return {
            **{name: getattr(self, name) + live[name] for name in _TOTALS},
            "connections": self.connections,
            "native_connections": self.native_connections,
            "refused_local": self.refused_local,
        }
