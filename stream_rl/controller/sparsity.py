"""The sparsity schedule (ALGORITHMS.md §6; docs/sparse-rollouts.md): the
attention window the engines run with, moved after every update so that
the mismatch monitor's lower-tail quantile (`mismatch/q05` or `/q01`, in
nats) stays at `sparsity.target`.

It steers log(window) by the tail's log-ratio to the target: a tail
beyond the target (more mismatch than wanted) widens the window, one short
of it narrows it, by `gain` times that log-ratio (clipped to ±2). One
step's tail is noisy: even at a constant window it scatters by a factor of
a few from step to step, multiplicatively (docs/sparse-rollouts.md). In log
space a tail twice the target and one half of it pull equally, so the
window settles where the tail's geometric mean is the target; the window
integrates the errors, so a small gain averages the noise over more steps
(and keeps the loop stable when the tail answers a step or two late: the
tokens trained were generated before the last change).
Pure logic: the controller applies what it returns (`GeneratorPool.set_window`).
"""

from __future__ import annotations

import math

from stream_rl.config import SparsityConfig

DENSE = 0
MAX_ERROR = 2.0
# A tail at or above zero (no token less likely under the sampler): its
# size counts as this fraction of the target's, which narrows the window.
FLOOR = 1e-3


class SparsitySchedule:
    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg
        self.updates = 0  # updates observed
        self.log_window = math.log(cfg.window)
        self.window = DENSE if cfg.mode == "off" or (cfg.mode == "schedule" and cfg.warmup_steps) else cfg.window

    def _from_log(self) -> int:
        w = int(round(math.exp(self.log_window)))
        return DENSE if w >= self.cfg.max_window else max(w, self.cfg.min_window)

    def observe(self, stats: dict) -> int | None:
        """After an update with metrics `stats`: the window from now on, or
        None when it stays (0 is dense)."""
        self.updates += 1
        c = self.cfg
        if c.mode != "schedule" or self.updates < c.warmup_steps:
            return None
        if self.updates == c.warmup_steps:  # warm-up over: the starting window
            new = self._from_log()
        else:
            tail = stats.get(f"mismatch/{c.quantile}")
            if not isinstance(tail, (int, float)) or not math.isfinite(tail):
                return None  # nothing measured this step (no engine log-probs in it)
            error = math.log(max(-tail, FLOOR * -c.target) / -c.target)  # > 0: more mismatch than wanted
            step = c.gain * max(-MAX_ERROR, min(MAX_ERROR, error))
            self.log_window = min(math.log(c.max_window), max(math.log(c.min_window), self.log_window + step))
            new = self._from_log()
        if new == self.window:
            return None
        self.window = new
        return new

    def state_dict(self) -> dict:
        return {"updates": self.updates, "log_window": self.log_window, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.log_window, self.window = state["updates"], state["log_window"], state["window"]
