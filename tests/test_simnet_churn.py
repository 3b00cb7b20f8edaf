"""Bounded growth over time, on the simulated network: a churn of 10,000 identities through a
mesh leaves every stable node's tables and digest bounded, and a peer's rumours about strangers
add nothing."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import trio
from sharedllm.mesh.swim import Liveness, Rumor, Swim
from sharedllm.mesh.timing import MeshTiming
from sharedllm.simnet.clock import TickClock
from sharedllm.simnet.determinism import deterministic_trio
from sharedllm.simnet.simulation import SimNode, Simulation

IDENTITIES = 10_000
STABLE = 8
JOINS_PER_S = 25
LIFETIME_S = 3.0
# Small so that the run is short; the node's default is 24 h.
TIMING = MeshTiming(refresh_s=0.5, forget_gone_after_s=10.0, forget_check_s=2.0)
# A stable node may hold the live churners, and those gone within the horizon (plus a check
# period and some slack for the news to spread): never the identities of the whole run.
_NOTICED_S = 10.0
BOUND = STABLE + int(
    JOINS_PER_S * (LIFETIME_S + TIMING.forget_gone_after_s + TIMING.forget_check_s + _NOTICED_S)
)


@dataclass
class Peak:
    states: int = 0
    swim_members: int = 0
    links: int = 0
    digest_bytes: int = 0
    samples: list[int] = field(default_factory=list)

    def observe(self, node: SimNode) -> None:
        service = node.service
        self.states = max(self.states, len(service.store.states))
        self.swim_members = max(self.swim_members, len(service.swim.members))
        self.links = max(self.links, len(service.links))
        self.digest_bytes = max(self.digest_bytes, len(service.store.digest().encode()))


async def _churn(sim: Simulation, peak: Peak) -> None:
    rng = random.Random(3)
    stable = [sim.add_node(holds_model=i == 0) for i in range(STABLE)]
    for index, node in enumerate(stable):
        sim.start(node, stable[:index][-1:])
    await trio.sleep(20)
    joined = 0
    dying: list[tuple[float, SimNode]] = []
    while joined < IDENTITIES or dying:
        now = trio.current_time()
        for node in [n for at, n in dying if at <= now]:
            sim.crash(node)
        dying = [(at, n) for at, n in dying if at > now]
        for _ in range(min(JOINS_PER_S, IDENTITIES - joined)):
            churner = sim.add_node(ram_bytes=4 * 2**30)
            sim.start(churner, [rng.choice(stable)])
            dying.append((now + LIFETIME_S, churner))
            joined += 1
        for node in stable:
            peak.observe(node)
            assert len(node.service.store.states) <= BOUND  # at every step, on every node
        peak.samples.append(len(stable[1].service.store.states))
        await trio.sleep(1.0)
    await trio.sleep(TIMING.forget_gone_after_s + 2 * TIMING.forget_check_s + _NOTICED_S)


async def _run(peak: Peak, finals: list[tuple[int, int, int]]) -> None:
    sim = Simulation(11, TIMING)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        await _churn(sim, peak)
        for node in sim.live():
            service = node.service
            finals.append(
                (len(service.store.states), len(service.swim.members), len(service.links))
            )
        nursery.cancel_scope.cancel()


@pytest.mark.slow
def test_a_churn_of_ten_thousand_identities_leaves_every_table_bounded() -> None:
    peak = Peak()
    finals: list[tuple[int, int, int]] = []
    with deterministic_trio(11):
        trio.run(_run, peak, finals, clock=TickClock())
    print(f"peak: {peak.states} states, {peak.swim_members} SWIM members, {peak.links} links, ")
    print(f"{peak.digest_bytes} digest bytes (bound {BOUND}); samples {peak.samples[::50]}")
    assert peak.states <= BOUND and peak.swim_members <= BOUND and peak.links <= BOUND
    assert peak.digest_bytes <= BOUND * 80  # ~60 bytes per member named
    first, last = peak.samples[: len(peak.samples) // 2], peak.samples[len(peak.samples) // 2 :]
    assert max(last) <= max(first) * 1.2  # no growth with the identities churned through
    # once the churn is over and the horizon has passed, only the stable members remain
    assert len(finals) == STABLE
    assert all(f == (STABLE, STABLE - 1, f[2]) and f[2] <= STABLE for f in finals), finals


def test_rumours_about_strangers_add_no_member() -> None:
    """A peer's ALIVE rumours about made-up ids once added each to the table, to be probed."""
    swim = Swim("me", random.Random(1))
    for index in range(1000):
        for status in Liveness:
            swim.hear(Rumor(f"stranger-{index}", status, 1), now=0.0)
    assert swim.members == {}
