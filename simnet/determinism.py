"""Makes trio's scheduling a function of the seed, so one seed gives one event trace.

Trio breaks two kinds of ties on its own: the order in which tasks woken together run (its
private random source, shuffled unless its deterministic mode is on), and the order of timers
due at the same instant (by the timers' memory addresses, which differ from process to process
with hash randomisation and allocation history). Under the simulator's virtual clock many timers
fall due together, so both must be fixed: the random source is seeded, deterministic mode is on
(as trio does for Hypothesis), and same-instant timers fire in the order they were set.

This is the only module that touches trio internals; everything is restored on exit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from heapq import heappush
from typing import Any

import trio

_run: Any = trio._core._run  # trio's private scheduler module (tested against trio's version)


@contextmanager
def deterministic_trio(seed: int) -> Iterator[None]:
    sequence = itertools.count()

    def add_in_order(self: Any, deadline: float, cancel_scope: Any) -> None:
        heappush(self._heap, (deadline, next(sequence), cancel_scope))
        self._active += 1

    saved_add = _run.Deadlines.add
    saved_mode = _run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_random = _run._r.getstate()
    _run.Deadlines.add = add_in_order
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True
    _run._r.seed(seed)
    try:
        yield
    finally:
        _run.Deadlines.add = saved_add
        _run._ALLOW_DETERMINISTIC_SCHEDULING = saved_mode
        _run._r.setstate(saved_random)
