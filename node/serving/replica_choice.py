"""Which replica of a model a request goes to, and the requests in flight to each (pure).

The rule, in order:
1. Only replicas that serve now are candidates; one that failed to take a request in the last
   `FAILED_FOR_S` is left out while another is there (the request goes to another instead).
2. A conversation returns to its replica: requests with the same affinity key (the client's
   `user`, else the opening of the conversation) prefer the same replica, by rendezvous hashing
   over the serving ones, so a replica joining or leaving moves only its share. The preferred
   replica is taken while it has a free slot (requests in flight below its slots), because
   its KV cache may still hold the conversation's prefix.
3. Otherwise the least loaded: fewest requests in flight per slot, then the nearest primary
   (measured round trip from this node), then the lowest key.

Load is what this node has in flight, not the mesh's: each node balances its own clients, and
with every node doing so the replicas' loads even out without any coordination.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .demand_meter import DemandMeter

ReplicaKey = tuple[str, int, str]  # (model, epoch, primary) of a placement
FAILED_FOR_S = 5.0
MAX_IN_FLIGHT = 4096  # requests tracked at once; beyond, the oldest are forgotten
IN_FLIGHT_MAX_AGE_S = 900.0  # a request not ended by then is forgotten (its answer hung)


@dataclass(frozen=True)
class ReplicaLoad:
    key: ReplicaKey
    slots: int
    in_flight: int
    rtt_ms: float

    @property
    def load(self) -> float:
        return self.in_flight / max(1, self.slots)


def choose_replica(
    replicas: Sequence[ReplicaLoad], affinity: str | None, failed: frozenset[ReplicaKey]
) -> ReplicaLoad:
    """The replica for one request; `replicas` must not be empty."""
    if not replicas:
        raise ValueError("no replica to choose from")
    healthy = [r for r in replicas if r.key not in failed] or list(replicas)
    if affinity is not None:
        preferred = max(healthy, key=lambda r: _rendezvous(affinity, r.key))
        if preferred.in_flight < preferred.slots:
            return preferred
    return min(healthy, key=lambda r: (r.load, r.rtt_ms, r.key))


def _rendezvous(affinity: str, key: ReplicaKey) -> bytes:
    text = f"{affinity}\x00{key[0]}\x00{key[2]}"  # not the epoch: a re-plan keeps the share
    return hashlib.sha256(text.encode("utf-8", "replace")).digest()


@dataclass
class InFlight:
    """Requests this node has sent to each replica and not seen end, and replicas that
    recently failed to take one; bounded in count and age."""

    _started: OrderedDict[int, tuple[ReplicaKey, float]] = field(default_factory=OrderedDict)
    _failed: dict[ReplicaKey, float] = field(default_factory=dict)
    routed: dict[ReplicaKey, int] = field(default_factory=dict)  # requests sent, ever
    demand: DemandMeter = field(default_factory=DemandMeter)  # of every model, from here
    _next: int = 0

    def start(self, key: ReplicaKey, now: float) -> int:
        self.routed[key] = self.routed.get(key, 0) + 1
        if len(self.routed) > MAX_IN_FLIGHT:
            self.routed.pop(next(iter(self.routed)))
        self._next += 1
        self._started[self._next] = (key, now)
        self.demand.change(key[0], now, +1)
        while len(self._started) > MAX_IN_FLIGHT:
            _, (forgotten, _) = self._started.popitem(last=False)
            self.demand.change(forgotten[0], now, -1)
        return self._next

    def end(self, token: int, now: float) -> None:
        ended = self._started.pop(token, None)
        if ended is not None:
            self.demand.change(ended[0][0], now, -1)

    def count(self, key: ReplicaKey, now: float) -> int:
        self._forget_old(now)
        return sum(1 for started_key, _ in self._started.values() if started_key == key)

    def fail(self, key: ReplicaKey, now: float) -> None:
        self._failed[key] = now
        if len(self._failed) > MAX_IN_FLIGHT:
            self._failed.pop(next(iter(self._failed)))

    def failed(self, now: float) -> frozenset[ReplicaKey]:
        self._failed = {k: at for k, at in self._failed.items() if now - at < FAILED_FOR_S}
        return frozenset(self._failed)

    def _forget_old(self, now: float) -> None:
        while self._started:
            token, (_, started) = next(iter(self._started.items()))
            if now - started < IN_FLIGHT_MAX_AGE_S:
                return
            key, _ = self._started.pop(token)
            self.demand.change(key[0], now, -1)


def affinity_of(payload: dict[str, object]) -> str | None:
    """What keeps a conversation on one replica: the client's user or session field, else the
    opening of its messages or prompt (the part every later turn repeats)."""
    for name in ("user", "session_id"):
        value = payload.get(name)
        if isinstance(value, str) and value:
            return f"{name}:{value[:256]}"
    metadata = payload.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        return f"user:{metadata['user_id'][:256]}"
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        return "messages:" + repr(messages[:2])[:1024]
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        return "prompt:" + prompt[:256]
    return None
