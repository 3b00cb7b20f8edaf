"""What a node must change so its processes match an election step (pure: no trio, no I/O).

From the election's outcome (each model's placements, this node's own claims and those handing
over) and what runs here now (engines, rpc-servers, tunnels), `reconcile` returns the changes:
engines to start and stop, rpc-servers to start, hand over or stop, replaced engines to wind
down, rpc tunnels to fence, API tunnels to close, and which claims now serve. The real node
carries them out with processes (`MeshServing`); the simulator with instant stand-ins, so both
run the very same decisions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ...mesh.claims import Claim
from ...mesh.election import ModelState

Rank = tuple[int, str]  # a claim's (epoch, primary)
# (model, claim rank): unique across a model's replicas (each claim has its own epoch or
# primary), and two of one model run at once during a switch or with replicas
JobKey = tuple[str, Rank]
ApiTunnelKey = tuple[str, int, str]  # (model, epoch, primary)


@dataclass(frozen=True)
class Running:
    """What runs on this node now, by key."""

    primaries: Mapping[JobKey, bool] = field(default_factory=dict)  # engine -> ready & verified
    workers: Collection[JobKey] = ()
    winding: Collection[JobKey] = ()  # replaced engines finishing their requests
    api_tunnels: Collection[ApiTunnelKey] = ()
    worker_streams: Collection[JobKey] = ()  # rpc tunnels primaries opened to us


@dataclass(frozen=True)
class WorkerStart:
    key: JobKey
    claim: Claim
    replaces: JobKey | None  # the rpc-server of a replaced placement, handed over as it is


@dataclass(frozen=True)
class Changes:
    stop_primaries: tuple[JobKey, ...] = ()
    start_primaries: tuple[Claim, ...] = ()
    wind_down: tuple[Claim, ...] = ()  # our replaced (or retired) claims, to finish now
    start_workers: tuple[WorkerStart, ...] = ()
    stop_workers: tuple[JobKey, ...] = ()
    accepting: frozenset[JobKey] = frozenset()  # placements whose rpc tunnels we take now
    fence: tuple[JobKey, ...] = ()  # rpc tunnels of primaries that no longer lead here
    close_api_tunnels: tuple[ApiTunnelKey, ...] = ()
    serving: tuple[tuple[str, int, bool], ...] = ()  # (unit, epoch, ready) of our engines


def reconcile(
    me: str,
    held: Collection[str],
    states: Mapping[str, ModelState],
    *,
    claims: Mapping[str, Claim],
    handing_over: Mapping[str, Claim],
    running: Running,
) -> Changes:
    """`states`, `claims` and `handing_over` are by unit (one replica of a model), the last two
    this node's own (the elector's); `held` the models whose file it holds."""
    own = (*claims.values(), *handing_over.values())
    wanted = {(claim.model_id, claim.rank): claim for claim in own}
    stop_primaries = tuple(key for key in running.primaries if key not in wanted)
    start_primaries = tuple(
        claim
        for key, claim in wanted.items()
        if key not in running.primaries and claim.model_id in held
    )
    wind_down = []
    for unit, old in handing_over.items():
        state = states.get(unit)
        successor = None if state is None else state.current
        key = (old.model_id, old.rank)
        # no successor: a replica that demand no longer asks for, finishing its requests
        if (successor is None or successor.serving) and key not in running.winding:
            wind_down.append(old)
    kept = {key: ready for key, ready in running.primaries.items() if key in wanted}
    serving = tuple(
        (wanted[key].unit, wanted[key].epoch, kept.get(key, False))
        for key in wanted
        if key in kept or wanted[key].model_id in held
    )
    start_workers, stop_workers, accepting, fence = _reconcile_workers(me, states, running)
    return Changes(
        stop_primaries=stop_primaries,
        start_primaries=start_primaries,
        wind_down=tuple(wind_down),
        start_workers=start_workers,
        stop_workers=stop_workers,
        accepting=accepting,
        fence=fence,
        close_api_tunnels=_stale_api_tunnels(states, running.api_tunnels),
        serving=serving,
    )


def _reconcile_workers(
    me: str, states: Mapping[str, ModelState], running: Running
) -> tuple[tuple[WorkerStart, ...], tuple[JobKey, ...], frozenset[JobKey], tuple[JobKey, ...]]:
    """Our rpc-servers: one per placement we are a worker of. Tunnels are taken only for the
    placements that will serve (not those only finishing); an rpc-server of a replaced
    placement is handed to its replacement at once (no process to start, memory freed as it
    goes)."""
    wanted: dict[JobKey, Claim] = {}
    accepting: set[JobKey] = set()
    for state in states.values():
        placements = state.placements()
        serving_soon = len(placements) - len(state.winding_down)  # the others only finish
        for index, claim in enumerate(placements):
            if me in claim.workers:
                wanted[(claim.model_id, claim.rank)] = claim
                if index < serving_soon:
                    accepting.add((claim.model_id, claim.rank))
    workers = set(running.workers)
    starts = []
    for key in sorted(accepting - workers):
        replaced = next((k for k in sorted(workers) if k[0] == key[0] and k not in wanted), None)
        if replaced is not None:
            workers.discard(replaced)
        workers.add(key)
        starts.append(WorkerStart(key, wanted[key], replaced))
    stops = tuple(sorted(key for key in workers if key not in wanted))
    fence = tuple(sorted({key for key in running.worker_streams if key not in wanted}))
    return tuple(starts), stops, frozenset(accepting), fence


def _stale_api_tunnels(
    states: Mapping[str, ModelState], tunnels: Collection[ApiTunnelKey]
) -> tuple[ApiTunnelKey, ...]:
    """Tunnels to primaries that lead nothing now (a replaced placement that still finishes
    requests keeps its tunnel until its primary withdraws it)."""
    leading = {
        (claim.model_id, claim.epoch, claim.primary)
        for state in states.values()
        for claim in state.placements()
    }
    return tuple(key for key in tunnels if key not in leading)
