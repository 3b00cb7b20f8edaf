"""The simulator's virtual clock: time stands still while tasks run and jumps when they all wait.

trio asks its clock how long to sleep only when no task is runnable. Then this clock moves
virtual time straight to the next timer and answers "not at all", so a simulated minute costs
only the CPU time of what happens in it (as `trio.testing.MockClock(autojump_threshold=0)`
does, in one pass of trio's loop instead of two).

Time moves in whole ticks: the jump lands on the first tick at or after the timer, so every
timer that falls due within one tick wakes in the same pass. A thousand nodes' jittered timers
and message deliveries otherwise each cost a pass of their own. A tick of a millisecond is
well below anything the mesh measures or decides on (its rounds and timeouts are hundreds of
milliseconds and more), and it is the simulator's resolution: a message is delivered on the
tick after its latency has passed.
"""

from __future__ import annotations

import math

import trio

_IDLE_WAIT_S = 86_400.0  # nothing scheduled at all: wait for I/O or an interrupt


class TickClock(trio.abc.Clock):
    def __init__(self, tick_s: float = 0.001) -> None:
        if not tick_s > 0:
            raise ValueError("a tick must be longer than zero")
        self.tick_s = tick_s
        self._ticks = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._ticks * self.tick_s

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline == math.inf:
            return _IDLE_WAIT_S
        while self._ticks * self.tick_s < deadline:
            self._ticks = max(self._ticks + 1, math.ceil(deadline / self.tick_s))
        return 0.0
