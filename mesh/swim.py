"""SWIM-style failure detection and membership rumors (sans-I/O).

Each probe period a node probes one member (round-robin over a shuffled list, so everyone is
probed within a period or two); a member that answers neither the probe nor indirect probes
through a few others becomes *suspect*, and *dead* once suspected for `suspicion_s`. Facts about
members travel as rumors piggybacked on probes, each sent `retransmit_mult x log2(N)` times. A
node that hears itself suspected refutes it with a higher incarnation. The cost per node is a
constant number of messages per period, whatever the size of the mesh (the old design of
heartbeats through gossip cost every node work for every other node, every second).

Precedence (for one member): alive(i) beats suspect(j) and alive(j) when i > j; suspect(i)
beats alive(j) when i >= j and suspect(j) when i > j; dead and left beat both when i >= j.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .random_source import RandomSource
from .send_queue import SendQueue


class Liveness(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_RANK = {Liveness.ALIVE: 0, Liveness.SUSPECT: 1, Liveness.DEAD: 2, Liveness.LEFT: 2}


@dataclass(frozen=True)
class Rumor:
    """A fact about one member: its status at an incarnation."""

    peer_id: str
    status: Liveness
    incarnation: int

    def to_wire(self) -> list[object]:
        return [self.peer_id, self.status.value, self.incarnation]

    @staticmethod
    def from_wire(data: object) -> Rumor:
        """Raises ValueError on malformed input (rumors come from peers)."""
        if not (isinstance(data, list) and len(data) == 3):
            raise ValueError("a rumor is [peer, status, incarnation]")
        peer, status, incarnation = data
        if not isinstance(peer, str) or not isinstance(status, str):
            raise ValueError("a rumor names a peer and a status")
        if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
            raise ValueError("a rumor's incarnation is a non-negative integer")
        return Rumor(peer, Liveness(status), incarnation)


@dataclass
class _Member:
    status: Liveness
    incarnation: int
    since: float


@dataclass
class Swim:
    me: str
    rng: RandomSource
    suspicion_s: float = 4.0
    retransmit_mult: int = 3
    incarnation: int = 0
    must_refute: bool = False
    members: dict[str, _Member] = field(default_factory=dict)
    _queue: SendQueue[Rumor] = field(default_factory=SendQueue)
    _order: list[str] = field(default_factory=list)
    # Members by status (insertion-ordered), so that asking for the suspects or the live
    # members costs what they number, not what the mesh numbers.
    _by_status: dict[Liveness, dict[str, None]] = field(
        default_factory=lambda: {status: {} for status in Liveness}
    )
    _flipped: dict[str, None] = field(default_factory=dict)  # live <-> not live since asked

    # -- what we hear ----------------------------------------------------------------------

    def heard_of(self, peer: str, version: int, now: float) -> None:
        """A state of `peer` at `version` arrived. State versions only grow (they follow the
        wall clock), so a newer one is proof of life that beats older suspicions, and a node
        restarted after being declared dead comes back with it."""
        if peer == self.me:
            return
        if peer not in self.members:
            self._set(peer, _Member(Liveness.ALIVE, version, now))  # a member's first state
            return
        self.hear(Rumor(peer, Liveness.ALIVE, version), now, spread=False)

    def hear(self, rumor: Rumor, now: float, spread: bool = True) -> bool:
        """Applies a rumor; True if it changed what we believe (then we pass it on)."""
        if rumor.peer_id == self.me:
            if rumor.status in (Liveness.SUSPECT, Liveness.DEAD) and (
                rumor.incarnation >= self.incarnation
            ):
                self.must_refute = True  # the service republishes with a higher version
            return False
        known = self.members.get(rumor.peer_id)
        if known is not None and not _overrides(rumor, known):
            return False
        if known is None:
            # No news about strangers, not even that they live: we learn of members only from
            # their signed states, so a peer's rumours cannot fill our table with made-up ids.
            return False
        self._set(rumor.peer_id, _Member(rumor.status, rumor.incarnation, now))
        if spread:
            self._spread(rumor)
        return True

    def set_incarnation(self, version: int) -> None:
        """Our state was republished at `version`: that is our new incarnation, and the news
        that we are alive."""
        self.incarnation = version
        self.must_refute = False
        self._spread(Rumor(self.me, Liveness.ALIVE, version))

    def probe_answered(self, peer: str, now: float) -> None:
        """A probe got its answer: a suspect we probed ourselves is back (locally) alive."""
        known = self.members.get(peer)
        if known is not None and known.status is Liveness.SUSPECT:
            self._set(peer, _Member(Liveness.ALIVE, known.incarnation, now))

    def probe_failed(self, peer: str, now: float) -> None:
        """Neither the probe nor the indirect probes were answered."""
        known = self.members.get(peer)
        if known is not None and known.status is Liveness.ALIVE:
            self.hear(Rumor(peer, Liveness.SUSPECT, known.incarnation), now)

    def leaving(self) -> None:
        self._spread(Rumor(self.me, Liveness.LEFT, self.incarnation))

    def gone_since(self, before: float) -> list[str]:
        """Members dead or gone since before `before`, for the caller to forget."""
        return [
            peer
            for status in (Liveness.DEAD, Liveness.LEFT)
            for peer in self._by_status[status]
            if self.members[peer].since < before
        ]

    def forget(self, peer: str) -> None:
        known = self.members.pop(peer, None)
        if known is not None:
            del self._by_status[known.status][peer]
            self._flipped[peer] = None
        self._queue.discard(peer)

    def _set(self, peer: str, member: _Member) -> None:
        known = self.members.get(peer)
        if known is not None:
            del self._by_status[known.status][peer]
        self.members[peer] = member
        self._by_status[member.status][peer] = None
        if known is None or _is_live(known.status) != _is_live(member.status):
            self._flipped[peer] = None

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[str]:
        """Suspects past their time become dead; returns them."""
        expired = [
            peer
            for peer in sorted(self._by_status[Liveness.SUSPECT])
            if now - self.members[peer].since >= self.suspicion_s
        ]
        for peer in expired:
            self.hear(Rumor(peer, Liveness.DEAD, self.members[peer].incarnation), now)
        return expired

    def next_probe(self, among: Collection[str] | None = None) -> str | None:
        """The next live member to probe (of `among`, when given: a node's neighbours): a
        shuffled round-robin, reshuffled each pass."""
        while self._order:
            peer = self._order.pop()
            if self.is_live(peer) and (among is None or peer in among):
                return peer
        pool = self.live_members() if among is None else among
        candidates = sorted(p for p in pool if self.is_live(p))
        if not candidates:
            return None
        self.rng.shuffle(candidates)
        self._order = candidates
        return self._order.pop()

    # -- what we say -------------------------------------------------------------------------

    def rumors_to_send(self, limit: int) -> list[Rumor]:
        """Up to `limit` rumors, the least-sent first; each goes out a bounded number of times."""
        return self._queue.take(limit)

    def status(self, peer: str) -> Liveness:
        member = self.members.get(peer)
        return Liveness.DEAD if member is None else member.status

    def is_live(self, peer: str) -> bool:
        """Alive or suspect (still a member for every purpose but probing)."""
        member = self.members.get(peer)
        return member is not None and _is_live(member.status)

    def status_since(self, peer: str) -> float | None:
        member = self.members.get(peer)
        return None if member is None else member.since

    def live_members(self) -> list[str]:
        """Members alive or suspect."""
        return [*self._by_status[Liveness.ALIVE], *self._by_status[Liveness.SUSPECT]]

    def with_status(self, status: Liveness) -> Iterable[str]:
        return self._by_status[status].keys()

    def take_flipped(self) -> list[str]:
        """Members that became live or stopped being live (or were forgotten) since the last
        call: whoever keeps a view of the live members updates just these."""
        flipped = list(self._flipped)
        self._flipped.clear()
        return flipped

    def _spread(self, rumor: Rumor) -> None:
        size = max(len(self.members), 1) + 1
        sends = self.retransmit_mult * max(1, math.ceil(math.log2(size)))
        self._queue.put(rumor.peer_id, rumor, sends)


def _is_live(status: Liveness) -> bool:
    return status is Liveness.ALIVE or status is Liveness.SUSPECT


def _overrides(rumor: Rumor, known: _Member) -> bool:
    if known.status is Liveness.LEFT and rumor.incarnation <= known.incarnation:
        return False
    if rumor.status is Liveness.ALIVE:
        return rumor.incarnation > known.incarnation
    if rumor.status is Liveness.SUSPECT:
        if known.status is Liveness.ALIVE:
            return rumor.incarnation >= known.incarnation
        return known.status is Liveness.SUSPECT and rumor.incarnation > known.incarnation
    # dead or left
    if _RANK[known.status] >= _RANK[rumor.status]:
        return rumor.incarnation > known.incarnation
    return rumor.incarnation >= known.incarnation
