"""What a node measures of its links and counts of its control traffic (plain data)."""

from __future__ import annotations

from dataclasses import dataclass

PROBE_BLOCK_BYTES = 256 * 1024  # a bulk probe is sent in blocks of this size
PROBE_TARGET_S = 1.0  # how long a bulk probe should take


def next_probe_bytes(bandwidth_mbps: float, largest: int) -> int:
    """The size of a bulk probe that takes about `PROBE_TARGET_S` on a link of this bandwidth
    (whole blocks, at least one, at most `largest`): long enough to time, and short enough
    that a slow link is not flooded by the probes meant to measure it."""
    wanted = int(bandwidth_mbps * 1e6 / 8 * PROBE_TARGET_S) // PROBE_BLOCK_BYTES
    return max(PROBE_BLOCK_BYTES, min(largest, wanted * PROBE_BLOCK_BYTES))


def bandwidth_at_most(size: int, seconds: float) -> float:
    """What a probe of `size` bytes that did not finish in `seconds` says of the link (Mbit/s):
    the planner prices it so, rather than as unmeasured (and it is not probed again at once)."""
    return size * 8 / seconds / 1e6


@dataclass
class PeerLink:
    """What this node measured of its link to one peer."""

    rtt_ms: float | None = None  # control plane (libp2p), from probes
    jitter_ms: float = 0.0
    bandwidth_mbps: float | None = None  # data plane, from bulk probes
    data_rtt_ms: float | None = None  # data plane, after each bulk probe: what tunnels pay
    address: str | None = None  # the control-plane address that reached it last, when we dialed
    probe_bytes: int = PROBE_BLOCK_BYTES  # the next bulk probe's size (`next_probe_bytes`)

    def probe_size(self, largest: int) -> int:
        return min(self.probe_bytes, largest)

    def probed(self, size: int, seconds: float, largest: int) -> bool:
        """Takes in a bulk probe of `size` bytes that took `seconds`; returns whether to probe
        again at once: while a probe ends in under a quarter of `PROBE_TARGET_S` it was too
        short to time well, and a bigger one (sized by what it measured) follows."""
        self.bandwidth_mbps = size * 8 / max(seconds, 1e-9) / 1e6
        self.probe_bytes = next_probe_bytes(self.bandwidth_mbps, largest)
        return seconds < PROBE_TARGET_S / 4 and size < largest

    def probe_timed_out(self, size: int, limit_s: float) -> None:
        """A probe that did not finish within `limit_s` prices the link at most so, and the
        next one starts small again."""
        self.bandwidth_mbps = bandwidth_at_most(size, limit_s)
        self.probe_bytes = PROBE_BLOCK_BYTES

    def observe(self, sample_ms: float) -> None:
        if self.rtt_ms is None:
            self.rtt_ms = sample_ms
            return
        self.jitter_ms = 0.75 * self.jitter_ms + 0.25 * abs(sample_ms - self.rtt_ms)
        self.rtt_ms = 0.8 * self.rtt_ms + 0.2 * sample_ms


@dataclass
class ControlTraffic:
    """Control-plane messages (hello, gossip, probes) this node sent and received."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    faults: int = 0  # exchanges that failed: malformed or oversized messages, timeouts, resets
    refused_streams: int = 0  # streams from peers that had not proved membership
    refused_hellos: int = 0  # hellos whose membership proof did not hold
    limited_hellos: int = 0  # hellos closed unread: their address failed too often lately

    def sent(self, size: int) -> None:
        self.messages_sent += 1
        self.bytes_sent += size

    def received(self, size: int) -> None:
        self.messages_received += 1
        self.bytes_received += size
