"""Where the scheduling code reads time: a clock passed in.

`Clock` is the real one (production: `time.perf_counter` for intervals and
deadlines, `time.time` for the wall time written to the metrics). The
simulator (`benchmarks/simulate/`) passes a virtual clock with the same two
methods, so `RolloutController`, `Job`, `run_sync` and `run_stream` run
unchanged on simulated engines and learner."""

from __future__ import annotations

import time


class Clock:
    """Real time."""

    def now(self) -> float:
        """Seconds on a monotonic clock: intervals and deadlines."""
        return time.perf_counter()

    def wall(self) -> float:
        """Seconds since the epoch: the wall time of the metrics."""
        return time.time()


REAL = Clock()
