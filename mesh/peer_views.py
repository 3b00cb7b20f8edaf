"""The rows of `sharedllm-node peers` and the status page: every member this node knows of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .gossip import SignedState
from .link_stats import PeerLink
from .membership import Revocation
from .records import RecordError
from .swim import Swim


def peer_rows(
    states: Mapping[str, SignedState],
    *,
    me: str,
    swim: Swim,
    links: Mapping[str, PeerLink],
    connected: set[str],
    revocations: Mapping[str, Revocation],
    now: float,
) -> list[dict[str, Any]]:
    rows = []
    for origin, state in sorted(states.items()):
        try:
            content = state.content()
        except RecordError:
            continue
        content.pop("proof", None)
        mine = origin == me
        since = swim.status_since(origin)
        link = links.get(origin)
        rows.append(
            {
                "peer_id": origin,
                "state": "self" if mine else swim.status(origin).value,
                "rtt_ms": None if link is None else link.rtt_ms,
                "bandwidth_mbps": None if link is None else link.bandwidth_mbps,
                "data_rtt_ms": None if link is None else link.data_rtt_ms,
                "status_for_s": None if mine or since is None else now - since,
                "connected": origin in connected,
                **content,
            }
        )
    for peer_id, revocation in sorted(revocations.items()):
        rows.append({"peer_id": peer_id, "state": "revoked", "reason": revocation.reason})
    return rows
