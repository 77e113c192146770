"""The virtual clock and the discrete-event loop the simulated engines and
learner share. `Clock.now()`/`wall()` read the simulated time, so the
scheduling code that takes a `stream_rl.clock.Clock` runs on it unchanged."""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class SimulationStuck(RuntimeError):
    """Waited forever with nothing left to happen: the schedule deadlocked."""


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t


class EventLoop:
    """Events (time, callback) run in time order; waits advance the clock."""

    def __init__(self):
        self.clock = VirtualClock()
        self._heap: list = []
        self._seq = itertools.count()
        self.events = 0

    @property
    def now(self) -> float:
        return self.clock.t

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.clock.t), next(self._seq), fn))

    def run_until(self, ready: Callable[[], bool], timeout_s: float | None) -> bool:
        """Run events in order until `ready()` or the clock reaches now +
        `timeout_s` (None: no limit). Returns whether `ready()`."""
        deadline = None if timeout_s is None else self.clock.t + timeout_s
        while not ready():
            if not self._heap or (deadline is not None and self._heap[0][0] > deadline):
                if deadline is None:
                    raise SimulationStuck(f"nothing left to happen at t={self.clock.t:.3f} s")
                self.clock.t = max(self.clock.t, deadline)
                return False
            t, _, fn = heapq.heappop(self._heap)
            self.clock.t = max(self.clock.t, t)
            self.events += 1
            fn()
        return True
