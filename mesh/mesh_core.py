"""The mesh's policies, sans I/O: when to publish, gossip, probe, reconnect and measure links,
and with whom.

`MeshCore` is fed `now` and what its shell observed (through `MeshWorld`: the connected and
admitted peers, what gossip holds) and answers with `Action`s; `next_timer()` says when it wants
to be asked again, and the shell reports back how each action ended. It holds no sockets and
imports no trio, so each policy is tested by calling it. `MeshService` is the shell that runs
the actions over the Transport seam.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .random_source import RandomSource, jittered, pick
from .swim import Swim
from .timing import MeshTiming

# An exchange that brought this many new states means we are behind (a node joining, or the
# whole mesh forming): the next round comes soon instead of after the big-mesh spacing.
CATCHING_UP_STATES = 8
# Parts of our state that are measurements: they change all the time, so they alone do not
# make us publish; they are refreshed every `refresh_s`.
MEASUREMENTS = frozenset({"links", "ram_free", "load", "devices"})
# After a link's first figure, how long the heartbeat waits for others measured with it.
FIRST_FIGURES_GATHER_S = 0.1
# The next bulk probe, after one that measured a link first while others are unmeasured.
NEXT_UNMEASURED_S = 0.2


def measured_figures(links: object) -> frozenset[tuple[str, str]]:
    """(target, figure) for each figure of each gossiped link that has a value."""
    if not isinstance(links, Mapping):
        return frozenset()
    return frozenset(
        (str(target), str(name))
        for target, figures in links.items()
        if isinstance(figures, Mapping)
        for name, value in figures.items()
        if value is not None
    )


class Do(enum.Enum):
    HEARTBEAT = "heartbeat"  # check our state (publish if due), tick SWIM, forget the long gone
    EXCHANGE = "gossip"  # an anti-entropy exchange with a connected member
    EXCHANGE_AFAR = "gossip-afar"  # dial an unconnected member, then exchange
    SYNC_REVOCATIONS = "revocations"
    PROBE = "ping"  # SWIM's probe: direct (dialing if need be), then indirect
    CONNECT = "connect"  # dial a member by its gossiped addresses and say hello
    INTRODUCE = "hello"  # say hello over a connection that has none that went through
    DISCONNECT = "disconnect"
    DIAL_BOOTSTRAP = "bootstrap"
    MEASURE_BANDWIDTH = "bandwidth"


@dataclass(frozen=True)
class Action:
    do: Do
    peer: str = ""


class MeshWorld(Protocol):
    """What the core reads of the node's state when it decides (all reads, no I/O)."""

    def connected_peers(self) -> Sequence[str]: ...

    def admitted_peers(self) -> set[str]: ...

    def saying_hello(self) -> set[str]:
        """Peers whose hello exchange is under way (either side)."""
        ...

    def known_states(self) -> int: ...

    def revoked(self, peer: str) -> bool: ...

    def revocations_differ(self, peer: str) -> bool: ...

    def bandwidth_candidates(self) -> Sequence[tuple[str, bool]]:
        """(peer, measured already) for each admitted member with a data-plane address."""
        ...


class _Timer(enum.Enum):
    HEARTBEAT = 0
    GOSSIP = 1
    PROBE = 2
    RECONNECT = 3
    BANDWIDTH = 4


@dataclass
class MeshCore:
    me: str
    timing: MeshTiming
    rng: RandomSource
    swim: Swim
    bootstrapped: bool  # a bootstrap peer let us in (or we founded the mesh)
    measures_bandwidth: bool
    in_flight: set[Action] = field(default_factory=set)
    # The peers we probe: those we connected with (either way), until they die. Each node
    # keeps a few connections and is a neighbour of those who keep one to it, so each is
    # probed about once a period without anyone holding a connection to every member.
    neighbours: dict[str, None] = field(default_factory=dict)
    _due: dict[_Timer, float] = field(default_factory=dict)
    _catching_up: bool = False
    _gossip_checking: bool = False  # the round has run; its interval is not over yet
    _gossip_interval: float = 0.0
    _far_spacing: int = 1  # gossip rounds between exchanges with an unconnected member
    _rounds_to_far: int = 0
    _published: Mapping[str, Any] | None = None
    _published_at: float = -math.inf
    _checked_gone_at: float = -math.inf

    def start(self, now: float) -> None:
        for timer in _Timer:
            self._due[timer] = now
        if not self.measures_bandwidth:
            self._due[_Timer.BANDWIDTH] = math.inf

    def next_timer(self) -> float:
        return min(self._due.values(), default=math.inf)

    # -- the shell reports ----------------------------------------------------------------

    def begin(self, action: Action) -> bool:
        """Registers an action the shell starts itself; False while the same one runs."""
        if action in self.in_flight:
            return False
        self.in_flight.add(action)
        return True

    def finished(self, action: Action) -> None:
        self.in_flight.discard(action)

    def met(self, peer: str) -> None:
        """A peer passed the hello: from now on we probe it."""
        self.neighbours[peer] = None

    def dropped(self, peer: str) -> None:
        self.neighbours.pop(peer, None)

    def note_news(self, new_states: int, more: bool, new_members: int = 0) -> None:
        """An exchange that brought many states, had to leave some out or taught us of a
        member we did not know means we are behind (or the mesh is forming): the next round
        comes soon. Refreshed states of known members alone do not."""
        if more or new_states >= CATCHING_UP_STATES or new_members > 0:
            self._catching_up = True

    def heard_of_members(self, now: float) -> None:
        """Gossip (an exchange, or a probe's news) brought a member we did not know. In a
        small mesh it is connected to at once rather than at the next reconnect round: a mesh
        starting again plans only once its members have measured their links."""
        if self._fully_connected():
            self._due[_Timer.RECONNECT] = min(self._due.get(_Timer.RECONNECT, now), now)

    def _fully_connected(self) -> bool:
        """Whether the live members are few enough for each to keep a connection to all."""
        return len(self.swim.live_members()) <= self.timing.full_mesh_up_to

    def far_exchange_done(self, found_members: bool) -> None:
        """Once far exchanges stop finding members we did not know, they thin out (every
        second round, fourth..., up to every eighth); one that finds some brings them back."""
        self._far_spacing = 1 if found_members else min(8, 2 * self._far_spacing)
        self._rounds_to_far = self._far_spacing

    def bandwidth_done(
        self, now: float, probed: bool, all_measured: bool, first_figure: bool = False
    ) -> None:
        """One probe per interval (so serving traffic keeps the links), sooner while some
        member's link has not been measured yet, and at once after a probe that measured a
        link for the first time (a forming mesh plans with the figures; a failing one waits)."""
        if probed and all_measured:
            quiet = self.timing.bandwidth_probe_interval_s
        elif first_figure:
            quiet = NEXT_UNMEASURED_S
        else:
            quiet = self.timing.reconnect_interval_s
        self._due[_Timer.BANDWIDTH] = now + jittered(self.rng, quiet)

    def measured_first(self, now: float) -> None:
        """A link, or a figure of one, was measured for the first time. In a small mesh our
        state is looked at soon rather than at the next heartbeat: the others plan with it
        (a mesh starting again waits on it). Figures measured together publish once."""
        if self._fully_connected():
            soon = now + FIRST_FIGURES_GATHER_S
            self._due[_Timer.HEARTBEAT] = min(self._due.get(_Timer.HEARTBEAT, soon), soon)

    # -- publish policy -------------------------------------------------------------------

    def published(self, payload: Mapping[str, Any], now: float) -> None:
        self._published, self._published_at = payload, now

    def should_publish(self, facts: Mapping[str, Any], now: float, known_states: int) -> bool:
        """When something that matters changed, when measurements have aged past
        `refresh_s`, or to refute a suspicion; otherwise our state (and everyone's work on
        it) stays as it is. Every new state travels to every node: in a big mesh measurements
        age longer, so that each node's share of that traffic stays bounded, but never longer
        than a quarter of the horizon after which silent members are forgotten. In a mesh
        small enough to be fully connected, a link (or a figure of one) measured for the first
        time publishes at once: planning waits on it when the mesh forms or starts again."""
        previous = self._published or {}
        changed = any(
            facts.get(key) != previous.get(key)
            for key in set(facts) | set(previous)
            if key not in MEASUREMENTS
        )
        refresh_s = min(
            self.timing.refresh_s * max(1.0, known_states / 25),
            self.timing.forget_gone_after_s / 4,
        )
        stale = now - self._published_at >= refresh_s
        first_measured = known_states <= self.timing.full_mesh_up_to and bool(
            measured_figures(facts.get("links")) - measured_figures(previous.get("links"))
        )
        return changed or stale or first_measured or self.swim.must_refute

    def forget_due(self, now: float) -> bool:
        """Whether to look for long-gone members now (at most every `forget_check_s`)."""
        if now - self._checked_gone_at < self.timing.forget_check_s:
            return False
        self._checked_gone_at = now
        return True

    # -- timers ---------------------------------------------------------------------------

    def handle_timer(self, now: float, world: MeshWorld) -> list[Action]:
        actions: list[Action] = []
        for timer in _Timer:
            if self._due.get(timer, math.inf) > now:
                continue
            if timer is _Timer.HEARTBEAT:
                actions.append(Action(Do.HEARTBEAT))
                self._due[timer] = now + jittered(self.rng, self.timing.heartbeat_s)
            elif timer is _Timer.GOSSIP:
                actions += self._gossip_timer(now, world)
            elif timer is _Timer.PROBE:
                actions += self._probe_round()
                self._due[timer] = now + jittered(self.rng, self.timing.probe_interval_s)
            elif timer is _Timer.RECONNECT:
                actions += self.reconnect_round(world)
                self._due[timer] = now + jittered(self.rng, self.timing.reconnect_interval_s)
            else:
                actions += self._bandwidth_round(now, world)
        # Each comes back registered as running (see `begin`), but for one-shot decisions.
        return [a for a in actions if a.do in _UNTRACKED or self.begin(a)]

    def _gossip_timer(self, now: float, world: MeshWorld) -> list[Action]:
        """Anti-entropy: full digest exchanges that repair whatever the rumors missed. A
        digest names every member, so in a big mesh the rounds are spaced out to keep each
        node's work per second bounded (rumors carry the news quickly in between). While
        exchanges bring many states (a node joining, a mesh forming), rounds follow each
        other quickly."""
        if self._gossip_checking:
            self._gossip_checking = False
            if not self._catching_up:
                spacing = max(1.0, world.known_states() / 50)
                self._due[_Timer.GOSSIP] = now + self._gossip_interval * (spacing - 1.0)
                if spacing > 1.0:
                    return []
        self._catching_up = False
        self._gossip_interval = jittered(self.rng, self.timing.gossip_interval_s)
        self._gossip_checking = True
        self._due[_Timer.GOSSIP] = now + self._gossip_interval  # this round's exchanges end
        return self.gossip_round(world)

    def gossip_round(self, world: MeshWorld) -> list[Action]:
        """Exchanges with `fanout` random peers (a frozen one holds up neither the others nor
        the next round), one with a member afar now and then, one revocation sync with a
        member whose set differs, and revoked peers cut."""
        admitted = world.admitted_peers()
        connected = world.connected_peers()
        peers = [
            p for p in connected if p in admitted and Action(Do.EXCHANGE, p) not in self.in_flight
        ]
        chosen = self.rng.sample(peers, min(self.timing.fanout, len(peers)))
        actions = [Action(Do.EXCHANGE, peer) for peer in chosen]
        actions += self._exchange_afar(set(peers))
        differing = [
            p
            for p in peers
            if world.revocations_differ(p) and Action(Do.SYNC_REVOCATIONS, p) not in self.in_flight
        ]
        if differing:
            actions.append(Action(Do.SYNC_REVOCATIONS, pick(self.rng, differing)))
        actions += [Action(Do.DISCONNECT, p) for p in connected if world.revoked(p)]
        return actions

    def _exchange_afar(self, connected: set[str]) -> list[Action]:
        """In a big mesh, one exchange a round with a random member we are not connected to:
        nodes that joined together may otherwise keep talking only among themselves, each
        knowing just the others of its group."""
        live = self.swim.live_members()
        self._rounds_to_far -= 1
        if len(live) <= self.timing.full_mesh_up_to or self._rounds_to_far > 0:
            return []
        far = pick(self.rng, live)
        return [] if far in connected else [Action(Do.EXCHANGE_AFAR, far)]

    def _probe_round(self) -> list[Action]:
        target = self.swim.next_probe(self.neighbours)
        return [] if target is None else [Action(Do.PROBE, target)]

    def reconnect_round(self, world: MeshWorld) -> list[Action]:
        """Back to the bootstrap addresses when alone (or until one let us in); otherwise a
        hello over any connection without one, and connections to every member of a small
        mesh, to a few in a big one (the probes and link measurements cover the peers
        connected either way)."""
        connected = set(world.connected_peers())
        actions = []
        if not connected or not self.bootstrapped:
            actions.append(Action(Do.DIAL_BOOTSTRAP))
            if not connected:
                return actions
        pending = world.saying_hello()
        # Connected without a hello that went through (it failed or timed out on one side):
        # without one, neither side gossips with the other.
        unintroduced = connected - world.admitted_peers() - pending
        actions += [Action(Do.INTRODUCE, peer) for peer in sorted(unintroduced)]
        live = self.swim.live_members()
        small = len(live) <= self.timing.full_mesh_up_to
        missing = (len(live) if small else self.timing.min_connections) - len(connected)
        if missing > 0:
            unconnected = sorted(set(live) - connected)
            for peer in self.rng.sample(unconnected, min(missing, len(unconnected))):
                # In a small mesh, a probe: it connects first, and a member nobody here reaches
                # becomes suspect (a member known only through gossip would otherwise stay
                # alive for as long as a partition cuts us off from all its neighbours). In a
                # big one our few connections are chosen at random: one failing proves little.
                actions.append(Action(Do.PROBE if small else Do.CONNECT, peer))
        return actions

    def _bandwidth_round(self, now: float, world: MeshWorld) -> list[Action]:
        """A bulk probe to one random member, first among those not measured yet; the next
        one is timed when this one ends (`bandwidth_done`)."""
        candidates = list(world.bandwidth_candidates())
        unmeasured = [peer for peer, measured in candidates if not measured]
        choices = unmeasured or [peer for peer, _ in candidates]
        if not choices:
            self.bandwidth_done(now, probed=False, all_measured=False)
            return []
        self._due[_Timer.BANDWIDTH] = math.inf
        return [Action(Do.MEASURE_BANDWIDTH, pick(self.rng, choices))]


# Not deduplicated: one-shot decisions with no task behind them.
_UNTRACKED = frozenset({Do.HEARTBEAT, Do.DISCONNECT})
