"""The mesh's intervals, timeouts and fan-outs (one value object, the same on every node)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshTiming:
    heartbeat_s: float = 1.0  # how often our state is checked for changes worth publishing
    refresh_s: float = 15.0  # how long measurements (links, free memory) may age, per 25 nodes
    gossip_interval_s: float = 1.0  # anti-entropy; stretched in big meshes (see MeshCore)
    fanout: int = 3
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    indirect_probes: int = 3
    suspicion_s: float = 4.0
    rumors_per_message: int = 12
    bandwidth_probe_interval_s: float = 30.0
    bandwidth_probe_bytes: int = 4 * 1024 * 1024
    reconnect_interval_s: float = 2.0
    min_connections: int = 6
    full_mesh_up_to: int = 32  # a mesh this small keeps a connection to every member
    exchange_timeout_s: float = 5.0
    # Members gone (dead, left, or silent) this long are forgotten; their states are refused
    # from then on. Far above how long any live member goes without republishing.
    forget_gone_after_s: float = 24 * 3600.0
    forget_check_s: float = 60.0
