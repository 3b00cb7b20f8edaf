"""Scenarios for the simulated mesh, with the figures `sharedllm-node simulate` prints.

Every scenario runs under the simulator's clock (virtual time jumps, in 1 ms ticks, whenever all
tasks wait) with trio's scheduler tie-breaks seeded too, so one seed gives one event trace.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ..mesh.swim import Liveness
from ..mesh.timing import MeshTiming
from .clock import TickClock
from .demand import run_demand, start_demand_mesh
from .determinism import deterministic_trio
from .network import LinkProfile
from .simulation import SimNode, Simulation

SCENARIOS = ("steady", "churn", "partition", "join-storm", "demand")
_SAMPLE_S = 0.5
_CONVERGE_LIMIT_S = 300.0
_GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's: 700)


def _no_violations() -> dict[str, int]:
    return {"memory_overcommitted": 0, "two_primaries": 0, "routed_to_non_serving": 0}


@dataclass
class Report:
    scenario: str
    nodes: int
    seed: int
    converged: bool = False
    convergence_s: float | None = None
    rounds: float | None = None
    failure_detection_s: float | None = None
    recovery_s: float | None = None
    false_suspicions: int = 0
    false_deaths: int = 0
    elections: int = 0
    election_safety_violations: int = 0
    placements_agree: bool = False
    # From convergence until every live node sees the same elected placements (steady)
    placements_agree_s: float | None = None
    messages_per_node_per_s: float = 0.0
    bytes_per_node_per_s: float = 0.0
    virtual_s: float = 0.0
    wall_s: float = 0.0
    # The formed mesh alone (steady scenario, after convergence): what a virtual minute costs
    steady_wall_s_per_virtual_minute: float | None = None
    events: int = 0
    trace_digest: str = ""
    notes: list[str] = field(default_factory=list)
    # The demand scenario: invariants broken (counted at every step), and each model's
    # serving replicas over time as [seconds since all were served, replicas, demand]
    invariant_violations: dict[str, int] = field(default_factory=_no_violations)
    replica_counts: dict[str, list[list[float]]] = field(default_factory=dict)
    replica_tracking_misses: int = 0
    placements_served_s: float | None = None
    requests_routed: int = 0
    requests_unserved: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(
    scenario: str, nodes: int, seed: int, loss: float = 0.0, steady_s: float = 30.0
) -> Report:
    """Runs one scenario to its end and reports (wall time included)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    if nodes < 2:
        raise ValueError("a scenario needs at least 2 nodes")
    report = Report(scenario, nodes, seed)
    started = time.perf_counter()
    setup = _Setup(scenario, nodes, seed, LinkProfile(loss=loss), steady_s)
    with deterministic_trio(seed), _few_collections():
        trio.run(_run, setup, report, clock=TickClock())
    report.wall_s = time.perf_counter() - started
    return report


@contextmanager
def _few_collections() -> Iterator[None]:
    """A thousand nodes in one process are millions of objects, which Python's cycle collector
    would walk again and again (a fifth of a 1000-node run at its default thresholds). The
    garbage the simulation makes is nearly all freed by reference counting anyway, so the
    collector runs about seventy times less often while a scenario runs."""
    saved = gc.get_threshold()
    gc.set_threshold(_GC_THRESHOLD, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@dataclass(frozen=True)
class _Setup:
    scenario: str
    nodes: int
    seed: int
    link: LinkProfile
    steady_s: float


async def _run(setup: _Setup, report: Report) -> None:
    sim = Simulation(setup.seed, MeshTiming(), setup.link)
    count = setup.nodes
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        await _BODIES[setup.scenario](sim, count, setup.steady_s, report)
        report.elections = sim.elections
        report.election_safety_violations = len(sim.election_safety_violations())
        report.placements_agree = sim.placements_agree()
        elapsed = trio.current_time() - began
        report.virtual_s = elapsed
        traffic = sim.network.traffic.values()
        report.messages_per_node_per_s = sum(t.messages_sent for t in traffic) / count / elapsed
        report.bytes_per_node_per_s = sum(t.bytes_sent for t in traffic) / count / elapsed
        report.events = sim.network.events
        report.trace_digest = sim.network.trace_digest()
        nursery.cancel_scope.cancel()


def _start_all(sim: Simulation, count: int, rng: random.Random, storm: bool) -> None:
    first = sim.add_node(holds_model=True)
    sim.start(first, [])
    for _ in range(count - 1):
        node = sim.add_node(holds_model=len(sim.nodes) == 2)  # a second holder, for elections
        earlier = sim.nodes[:-1]
        sim.start(node, [first] if storm else [rng.choice(earlier)])


async def _wait_for(condition: Callable[[], bool], limit_s: float) -> float | None:
    began = trio.current_time()
    while trio.current_time() - began < limit_s:
        if condition():
            return trio.current_time() - began
        await trio.sleep(_SAMPLE_S)
    return None


async def _converge(sim: Simulation, report: Report) -> bool:
    seconds = await _wait_for(sim.converged, _CONVERGE_LIMIT_S)
    report.converged = seconds is not None
    if seconds is not None and report.convergence_s is None:
        report.convergence_s = seconds
        report.rounds = seconds / sim.timing.gossip_interval_s
    return seconds is not None


async def _watch_false_suspicions(sim: Simulation, seconds: float, report: Report) -> None:
    """Counts, every sample, each live node that another live node thinks suspect (or dead)."""
    began = trio.current_time()
    while trio.current_time() - began < seconds:
        live = {node.peer_id for node in sim.live()}
        for observer in sim.live():
            swim = observer.service.swim
            suspected = live.intersection(swim.with_status(Liveness.SUSPECT))
            dead = live.intersection(swim.with_status(Liveness.DEAD))
            report.false_suspicions += len(suspected) + len(dead)
            report.false_deaths += len(dead)
        await trio.sleep(_SAMPLE_S)


async def _steady(sim: Simulation, count: int, steady_s: float, report: Report) -> None:
    _start_all(sim, count, random.Random(sim.seed), storm=False)
    if await _converge(sim, report):
        report.placements_agree_s = await _wait_for(
            lambda: sim.elections > 0 and sim.placements_agree(), _CONVERGE_LIMIT_S
        )
        started = time.perf_counter()
        await _watch_false_suspicions(sim, steady_s, report)
        if steady_s > 0:
            wall_s = time.perf_counter() - started
            report.steady_wall_s_per_virtual_minute = wall_s / steady_s * 60


async def _join_storm(sim: Simulation, count: int, steady_s: float, report: Report) -> None:
    _start_all(sim, count, random.Random(sim.seed), storm=True)
    await _converge(sim, report)


async def _churn(sim: Simulation, count: int, steady_s: float, report: Report) -> None:
    rng = random.Random(sim.seed)
    _start_all(sim, count, rng, storm=False)
    if not await _converge(sim, report):
        return
    victims = rng.sample(sim.nodes[1:], max(1, count // 10))
    for victim in victims:
        sim.crash(victim)
    report.failure_detection_s = await _wait_for(sim.converged, _CONVERGE_LIMIT_S)
    survivors = sim.live()
    for victim in victims:
        sim.restart(victim, [rng.choice(survivors)], keep_state=rng.random() < 0.5)
    report.recovery_s = await _wait_for(sim.converged, _CONVERGE_LIMIT_S)
    report.converged = report.recovery_s is not None


async def _partition(sim: Simulation, count: int, steady_s: float, report: Report) -> None:
    _start_all(sim, count, random.Random(sim.seed), storm=False)
    if not await _converge(sim, report):
        return
    ids = [n.peer_id for n in sim.nodes]
    half_a, half_b = ids[: count // 2], ids[count // 2 :]
    sim.network.partition(half_a, half_b)
    split = await _wait_for(
        lambda: _each_side_sees_itself(sim, set(half_a), set(half_b)), _CONVERGE_LIMIT_S
    )
    report.failure_detection_s = split
    if split is None:
        report.notes.append("the halves never saw each other as gone")
    sim.network.heal()
    report.recovery_s = await _wait_for(sim.converged, _CONVERGE_LIMIT_S)
    report.converged = report.recovery_s is not None


def _each_side_sees_itself(sim: Simulation, side_a: set[str], side_b: set[str]) -> bool:
    for node in sim.live():
        side = side_a if node.peer_id in side_a else side_b
        if sim.members_seen(node) != side:
            return False
    return True


async def _demand(sim: Simulation, count: int, steady_s: float, report: Report) -> None:
    run = start_demand_mesh(sim, count, report)
    if await _converge(sim, report):
        await run_demand(sim, run, _CONVERGE_LIMIT_S)


_Body = Callable[[Simulation, int, float, Report], Awaitable[None]]
_BODIES: dict[str, _Body] = {
    "steady": _steady,
    "churn": _churn,
    "partition": _partition,
    "join-storm": _join_storm,
    "demand": _demand,
}

__all__ = ["SCENARIOS", "Report", "SimNode", "simulate"]
