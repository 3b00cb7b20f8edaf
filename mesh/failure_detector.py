"""Failure detection from gossip heartbeats (sans-I/O).

Every live node republishes its state each heartbeat interval, so each origin's version keeps
growing. An observer notes, on its own clock, when it last saw an origin's version change: past
`suspect_after_s` the origin is suspect, past `dead_after_s` dead. A suspected node refutes the
suspicion simply by being alive: its next heartbeat reaches the observer through any path, so a
slow link or a lost message does not kill it. A node that announces it is leaving is marked left
at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Liveness(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass
class FailureDetector:
    suspect_after_s: float = 4.0
    dead_after_s: float = 10.0
    _last_change: dict[str, float] = field(default_factory=dict)
    _versions: dict[str, int] = field(default_factory=dict)
    _left: set[str] = field(default_factory=set)

    def observe(self, origin: str, version: int, now: float, leaving: bool = False) -> None:
        """A state of `origin` with `version` arrived at local time `now`."""
        if version > self._versions.get(origin, -1):
            self._versions[origin] = version
            self._last_change[origin] = now
            if leaving:
                self._left.add(origin)
            else:
                self._left.discard(origin)

    def status(self, origin: str, now: float) -> Liveness:
        if origin in self._left:
            return Liveness.LEFT
        last = self._last_change.get(origin)
        if last is None:
            return Liveness.DEAD
        silent = now - last
        if silent >= self.dead_after_s:
            return Liveness.DEAD
        if silent >= self.suspect_after_s:
            return Liveness.SUSPECT
        return Liveness.ALIVE

    def silent_for(self, origin: str, now: float) -> float | None:
        last = self._last_change.get(origin)
        return None if last is None else now - last

    def forget(self, origin: str) -> None:
        self._last_change.pop(origin, None)
        self._versions.pop(origin, None)
        self._left.discard(origin)
