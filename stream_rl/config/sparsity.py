"""The `sparsity` section: sparse rollouts (docs/sparse-rollouts.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from stream_rl.config.base import NonNegInt, PosFloat, PosInt, _Section


class SparsityConfig(_Section):
    # "off": dense attention. "fixed": every engine attends to the last
    # `window` tokens. "schedule": the window moves to hold the mismatch
    # monitor's `quantile` at `target` (ALGORITHMS.md §6).
    mode: Literal["off", "fixed", "schedule"] = "off"
    # The window ("fixed"), or the one the schedule starts from after warm-up.
    window: PosInt = 256
    # The lower-tail statistic the schedule holds: mismatch/q01 or /q05, in
    # nats (log π_rollout − log π_learner, negative in the tail).
    quantile: Literal["q01", "q05"] = "q05"
    # In nats; a multiple of the warm-up's dense tail (docs/sparse-rollouts.md: choosing it).
    target: Annotated[float, Meta(lt=0.0)] = -0.5
    # Steps of dense rollouts first: the tail from engine numerics and
    # staleness alone, before any sparsity.
    warmup_steps: NonNegInt = 5
    # How far log(tail / target) moves log(window) a step. The window sums
    # the steps' errors, so a small gain averages a noisy tail over more of
    # them; 0.5 chased the noise (docs/sparse-rollouts.md).
    gain: PosFloat = 0.2
    # The window stays within these; one at max_window or beyond is dense.
    min_window: PosInt = 16
    max_window: PosInt = 4096
