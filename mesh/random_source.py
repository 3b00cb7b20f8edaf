"""The one random-source protocol of the mesh: the part of `random.Random` its cores use.

Injected everywhere (a node passes a `random.SystemRandom`, the simulator a seeded
`random.Random`), so a seed fixes every choice of every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class RandomSource(Protocol):
    def random(self) -> float: ...

    def sample(self, population: Sequence[str], k: int) -> list[str]: ...

    def shuffle(self, x: list[str]) -> None: ...


def jittered(rng: RandomSource, interval_s: float) -> float:
    """`interval_s` ± 20%: periodic rounds of many nodes must not fall into step."""
    return interval_s * (0.8 + 0.4 * rng.random())


def pick(rng: RandomSource, choices: Sequence[str]) -> str:
    """One of `choices` (not empty), uniformly."""
    return choices[int(rng.random() * len(choices))]
