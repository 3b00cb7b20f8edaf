"""This node's own gossiped state: what goes in it, and signing and spreading a new version."""

from __future__ import annotations

import logging
from typing import Any

import trio

from .gossip import SignedState, StateTooLargeError, next_version
from .revocation_sync import summary_of
from .shell import MeshShell

# Links to this many peers (the nearest) go into our state: the planner pairs a primary with
# nearby workers, and a state listing every member would grow with the mesh.
GOSSIPED_LINKS = 32
_log = logging.getLogger("sharedllm.mesh")


class OwnState(MeshShell):
    _version: int
    _summary_of_revocations: tuple[int, str]

    def _payload(self) -> dict[str, Any]:
        return {**self._facts(), "links": self._nearest_links()}

    def _facts(self) -> dict[str, Any]:
        """Our state without the link measurements."""
        return {
            **self.describe_self(),
            "name": self.name,
            "proof": self.proof.encode(),
            "addrs": list(self.transport.listen_addrs()),
            "data_addrs": None if self.data_plane is None else self.data_plane.advertised,
            "revoked": self._revocation_summary(),
            "leaving": self._leaving,
        }

    def _nearest_links(self) -> dict[str, dict[str, float | None]]:
        measured = sorted(
            (link.rtt_ms, peer)
            for peer, link in self.links.items()
            if link.rtt_ms is not None and self.swim.is_live(peer)
        )
        return {
            peer: {
                "rtt_ms": rtt,
                "jitter_ms": self.links[peer].jitter_ms,
                "bandwidth_mbps": self.links[peer].bandwidth_mbps,
                "data_rtt_ms": self.links[peer].data_rtt_ms,
            }
            for rtt, peer in measured[:GOSSIPED_LINKS]
        }

    def _revocation_summary(self) -> str:
        """The set only grows, so its size names the summary already computed."""
        count = len(self.membership.revocations)
        if self._summary_of_revocations[0] != count:
            self._summary_of_revocations = (count, summary_of(self.membership.revocations))
        return self._summary_of_revocations[1]

    def _publish(self) -> None:
        """Signs and spreads a new version of our state. A state over the size every peer
        enforces is published without its link measurements; if even that is too large, the
        last state stays and the error is logged (the node keeps running)."""
        payload = self._payload()
        version = next_version(self._version, self.wall_clock())
        try:
            state = SignedState.publish(self.identity, version, payload)
        except StateTooLargeError:
            payload = {**payload, "links": {}}
            try:
                state = SignedState.publish(self.identity, version, payload)
            except StateTooLargeError as err:
                self.faults.log.emit("state-too-large", "not publishing our state: %s", err)
                return
        self._version = version
        self.store.merge([state])
        self._remember(state, payload)
        self.core.published(payload, trio.current_time())
        self.swim.set_incarnation(self._version)
        self._queue_state(state)
